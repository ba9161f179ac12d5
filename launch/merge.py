"""Merge a checkpoint's adapters into the base; write Megatron + Hugging Face checkpoints.

    torchrun --nproc_per_node=N launch/merge.py --checkpoint runs/x/ckpt [--out runs/x/merged]
           [--tp T --pp P [--vpp V]] [--dtype bf16|fp32] [--overwrite]

--checkpoint may be a checkpoint directory (`step_N`) or the run's checkpoint root (uses `latest`).
The checkpoint is checked whole before any work (a damaged one is named, never merged); the output
is written beside --out and renamed into place, and an existing non-empty --out is refused unless
--overwrite. The world size must equal tp * pp (defaults: the training layout; a --pp without --vpp
merges without virtual pipeline stages).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out")
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--vpp", type=int, help="virtual pipeline stages per rank (parallel.vpp)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"])
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = ap.parse_args(argv)
    import torch

    path = args.checkpoint
    if not os.path.isdir(path):
        print(f"merge: checkpoint not found: {path}", file=sys.stderr)
        return 2
    from mora_dist.utils.atomic_dir import check_output
    from mora_dist.checkpoint.integrity import STEP_RE, CheckpointError, problem, select_resume

    if not STEP_RE.match(os.path.basename(os.path.normpath(path))):  # a run's checkpoint root
        try:
            found, warnings = select_resume(path)
        except CheckpointError as e:
            print(f"merge: {e}", file=sys.stderr)
            return 2
        if found is None:
            print(f"merge: no checkpoint in {path} (no latest file, no step_N folder)", file=sys.stderr)
            return 2
        if warnings:  # never merge an older checkpoint than the user expects without being told to
            print(f"merge: {warnings[0]}; the newest intact one is {found}: pass --checkpoint {found} to merge it",
                  file=sys.stderr)
            return 2
        path = found

    why = problem(path)
    if why:
        print(f"merge: checkpoint {path} is unusable: {why}; pass --checkpoint with an intact step_N folder",
              file=sys.stderr)
        return 2
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "merged")
    try:
        check_output(out, args.overwrite, "merge: --out")
    except FileExistsError as e:
        print(e, file=sys.stderr)
        return 2
    from mora_dist.export.merge import config_from_checkpoint, merge_and_export
    from mora_dist.parallel.state import destroy_distributed, env_from_slurm, init_distributed

    env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", 1))
    from mora_dist.compat import mcore_cpu

    mcore_cpu.apply()
    cfg = config_from_checkpoint(path, args.tp, args.pp, args.vpp)
    if world != cfg.parallel.tp * cfg.parallel.pp:
        print(f"merge: world size {world} must equal tp*pp = {cfg.parallel.tp}*{cfg.parallel.pp} "
              "(pass --tp/--pp or change --nproc_per_node)", file=sys.stderr)
        return 2
    init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    res = merge_and_export(cfg, path, out, dtype, overwrite=args.overwrite)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(json.dumps(res))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
