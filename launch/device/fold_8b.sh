# Issue 15, 2026-12-01: MoRA's tile fold (block types' g summed over their row tiles before the block
# products, `blockdiag.folded`) and the one-pass block sums (`kernels/tilesum.py`; sharing's q/k/v by
# query group), in one nvidia-h200-x2 call (repo root, wheels in .bench/, the previous code's tree in
# .bench/old (`git archive eb66145 mora_dist launch bench`), $OUT set; ~8 min).
# GPU 0: the kernel microbenches, our 8B rows (4 micro-batches of 2 a step, graphed), then rotation +
# sharing with the previous code on the same GPU (the A/B). GPU 1 meanwhile: the peer (PEFT + Liger,
# PEFT, LoRA at micro-batch 2, their best), then our 1.1B rows.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
left() { echo $(( $1 - $(date +%s) + S )); }
mkdir -p $OUT/g0 $OUT/g1
B8="launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --modes graph --no-peer --steps 6"
(export CUDA_VISIBLE_DEVICES=0
 timeout 150 python3 launch/bench_rotgrad.py > $OUT/g0/kernels.txt 2>&1
 timeout 60 python3 launch/bench_rotgrad.py --tilesum >> $OUT/g0/kernels.txt 2>&1
 timeout $(left 430) python3 $B8 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/g0/b8.json > $OUT/g0/b8.log 2>&1
 (cd .bench/old && PYTHONPATH=/tmp/site:$PWD timeout $(left 560) python3 $B8 --rows mora-rotation,mora-sharing \
   --json $OUT/g0/b8_old.json > $OUT/g0/b8_old.log 2>&1)) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 200 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/g1/liger.log 2>&1
 timeout 170 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/g1/peft.log 2>&1
 timeout $(left 560) python3 launch/bench.py --size 1b --seq 2048 --mbs 4 --rows frozen,lora,mora-rotation,mora-sharing \
   --modes graph --no-peer --json $OUT/g1/b1.json > $OUT/g1/b1.log 2>&1) &
wait
echo "elapsed $(( $(date +%s) - S )) s"
cat $OUT/g0/kernels.txt; grep "^|" $OUT/g0/b8.log; grep -h "^| mora" $OUT/g0/b8_old.log; grep "^|" $OUT/g1/b1.log
grep -h "^{\"method" $OUT/g1/liger.log $OUT/g1/peft.log
tail -2 $OUT/g0/b8_old.log $OUT/g1/liger.log
# the device returns only a few files: GPU 1's logs travel as one archive
tar czf $OUT/g1.tgz -C $OUT g1 && rm -rf $OUT/g1
