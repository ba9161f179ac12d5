"""Train adapters on a megatron-core GPTModel (torchrun-compatible).

    torchrun --nproc_per_node=N launch/train.py --config configs/tiny_cpu.yaml [key.sub=value ...]

The config is validated (every key typed; world size vs TP*PP; data paths) before distributed
start-up, so a bad config fails on every rank at once with the offending key named. Checkpoints
are written every `checkpoint.every` steps and when SIGTERM or SIGUSR1 arrives (Slurm's
pre-emption warning): the current step finishes, a checkpoint is saved, the process exits 0 and a
restarted job resumes from `checkpoint.dir/latest` (or, when that one is damaged, from the newest
intact checkpoint, with a warning). Before training, rank 0 locks `run.out_dir` and `checkpoint.dir`
(one run per folder), checks the checkpoint's configuration against this one and the token ids
against the model vocabulary; a problem stops every rank with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 parallel.tp=2")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from mora_dist.parallel.state import env_from_slurm
    from mora_dist.training.config import ConfigError, load_config

    env_from_slurm()

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from mora_dist.compat import mcore_cpu
    from mora_dist.training.preflight import RunError
    from mora_dist.training.run import run

    mcore_cpu.apply()  # megatron on a CPU-only torch (no-op with CUDA)
    stop = {"signal": None}

    def _handler(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _handler)
    try:
        result = run(cfg, stop)
    except RunError as e:  # every rank raises the same one; one line is enough
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if result.get("rank0"):
        print(json.dumps({k: v for k, v in result.items() if k != "rank0"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
