# The round-2 research studies of docs/results/README.md (issue 20), run from the repo root on an
# nvidia-h200 device machine with the megatron-core wheel in .bench/ and $OUT set. The raw runs come
# back as one archive (the device runner returns at most 8 files).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/r2
python3 launch/research/round2.py /tmp/r2 --budget ${BUDGET:-420} "$@" 2>&1 | grep -v -i warn > $OUT/round2.log
tar czf $OUT/round2.tgz -C /tmp r2
tail -60 $OUT/round2.log
