"""Run the same training as launch/train.py through Ray Train (TorchTrainer): one worker per GPU,
or CPU workers with gloo. Submit to a cluster with

    ray job submit --working-dir . -- python launch/ray_job.py --config configs/cpt_biomed.yaml \
        --workers 16 --gpus [overrides ...]

or run against an existing cluster directly: python launch/ray_job.py --address HOST:PORT ...
Ray Train creates the torch process group; each worker then sets up megatron's parallel state and
runs the normal loop, so checkpoints, resume and metrics are exactly those of a torchrun run
(checkpoint.dir must be on storage every worker sees).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(args: dict) -> None:
    import ray.train

    from mora_dist.compat import mcore_cpu
    from mora_dist.training.config import load_config
    from mora_dist.training.run import run

    mcore_cpu.apply()  # megatron on a CPU-only torch (no-op with CUDA)
    cfg = load_config(args["config"], args["overrides"])
    result = run(cfg, {})
    ray.train.report({k: v for k, v in result.items() if k in ("step", "loss")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL); default CPU workers (gloo)")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from mora_dist.training.config import ConfigError, load_config

    try:  # validate with the world size the workers will have, before starting any of them
        os.environ["WORLD_SIZE"] = str(args.workers)
        load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {k: os.environ.get(k, v) for k, v in dict(OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0",
                                                    TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                                                    NVSHMEM_DISABLE_NVLS="1").items()}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + os.environ.get("PYTHONPATH", "")
    ray.init(address=args.address, runtime_env={"env_vars": env})
    trainer = TorchTrainer(
        _worker,
        train_loop_config=dict(config=os.path.abspath(args.config) if args.config else None,
                               overrides=args.overrides),
        torch_config=TorchConfig(backend="nccl" if args.gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpus),
        run_config=RunConfig(name="mora_dist", storage_path=os.path.abspath("runs/ray_results")),
    )
    result = trainer.fit()
    print(json.dumps(dict(result.metrics or {}, ok=result.error is None)))
    return 0 if result.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
