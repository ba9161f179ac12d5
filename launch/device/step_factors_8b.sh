# Issue 15, 2026-12-01 (eleventh session): the adapters' factors cast once a step (fixed_adapters' step_factors,
# reused by every micro-batch's forward and backward) on one H200 (repo root, wheels in .bench/, $OUT set):
# a 1.1B canary with accumulation (LoRA, VeRA, MoRA sharing / rotation, ALLoRA: build_graph_diff), the 8B rows,
# LoRA with the casts per forward (the A/B, --cast-per-forward), PEFT + Liger, then PEFT if time is left (the
# 1.1B table's steps have one micro-batch: no fixed_adapters scope, nothing changed there). The first call of
# this script (call 3) failed the micro-batch captures of LoRA and sharing: the cast nodes were made on the
# default stream (fixed since: wrappers._node_stream).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
left() { echo $(( $1 - $(date +%s) + S )); }
B8="launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --modes graph --no-peer --steps 6"
B1="launch/bench.py --size 1b --seq 2048 --mbs 4 --modes graph --no-peer"
timeout 120 python3 $B1 --accum 2 --steps 3 --rows lora,vera,mora-sharing,mora-rotation,allora --json $OUT/b1_acc.json > $OUT/b1_acc.log 2>&1
# the canary failed: the 8B rows with the casts per forward (the table says which), no A/B
CPF=""; grep -q '"error"' $OUT/b1_acc.json && CPF="--cast-per-forward"
timeout $(left 300) python3 $B8 $CPF --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b8.json > $OUT/b8.log 2>&1
[ -z "$CPF" ] && timeout $(left 355) python3 $B8 --cast-per-forward --rows lora --json $OUT/b8_cpf.json > $OUT/b8_cpf.log 2>&1
timeout $(left 460) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
[ $(left 500) -gt 100 ] && timeout $(left 500) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/peft.log 2>&1
grep "^|" $OUT/b1_acc.log; grep "^|" $OUT/b8.log; grep -h "^| lora" $OUT/b8_cpf.log 2>/dev/null
grep -h build_graph_diff $OUT/*.json | head -20
echo "elapsed $(( $(date +%s) - S )) s"
grep -h "^{\"method\|tokens_per_s" $OUT/liger.log $OUT/peft.log 2>/dev/null | tail -4
