# parallel.vpp with train.cuda_graph on an nvidia-h200-x2 machine (repo root, megatron wheel in .bench/, $OUT set):
# launch/device/vpp_graph_check.py, eager vs graphed losses at PP=2 x VPP=2.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
timeout 400 python3 -m torch.distributed.run --nproc_per_node=2 launch/device/vpp_graph_check.py > $OUT/vpp_graph.log 2>&1
echo "rc $?"; grep '^{' $OUT/vpp_graph.log || tail -40 $OUT/vpp_graph.log
