"""Process-group and megatron parallel-state setup shared by training, tests and tools."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from mora_dist.compat import mcore_cpu


def env_from_slurm() -> None:
    """Under `srun` (one task per GPU) take the torchrun variables from Slurm's, where unset.
    MASTER_ADDR/MASTER_PORT come from the batch script (first node of the allocation)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 0, timeout_s: int = 600, vpp: int = 1) -> None:
    """Initialise torch.distributed and megatron's parallel state. On GPU the default group is
    "cpu:gloo,cuda:nccl": CUDA tensors go through NCCL, the few CPU tensors the loop reduces
    (loss/signal flags, counts) through gloo, so the same code runs on CPU and GPU.

    vpp > 1: that many virtual pipeline stages per rank (megatron's interleaved schedule; pp > 1).
    Reads the usual torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).
    On a CPU-only torch the process's entry point must have applied `mora_dist.compat.mcore_cpu`.
    """
    mcore_cpu.require()
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel ({tp}) * pipeline_parallel ({pp})"
        )
    if not ps.model_parallel_is_initialized():
        if vpp > 1 and pp < 2:
            raise ValueError(f"virtual pipeline stages (vpp={vpp}) need pipeline_parallel > 1 (got {pp})")
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
