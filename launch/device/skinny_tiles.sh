# The skinny-products kernel's tilings (kernels/skinny.py) at the 8B layers, TP=1 (mbs 2) and a TP=2 shard under
# SP (mbs 4: 16,384 tokens), against cuBLAS's two GEMMs; one GPU, ~2 min (repo root, $OUT set).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T="--tile 64,256,8,2,0 --tile 32,256,4,1,0 --tile 64,512,8,1,0 --tile 128,256,8,1,0 --tile 64,256,4,3,1 --tile 64,256,8,3,1 --tile 128,128,4,3,1 --tile 64,128,4,4,1 --tile 128,256,8,3,1 --tile 32,256,4,4,1 --tile 64,512,8,3,1"
timeout 150 python3 launch/bench_skinny.py --reps 30 $T > $OUT/skinny_tp1.txt 2>&1
timeout 150 python3 launch/bench_skinny.py --reps 30 --tokens 16384 --tp 2 $T > $OUT/skinny_tp2.txt 2>&1
grep -E "^(a layer|a step)" $OUT/skinny_tp1.txt $OUT/skinny_tp2.txt; grep -hE "^(qkv|o |gate|down)" $OUT/skinny_tp1.txt $OUT/skinny_tp2.txt
