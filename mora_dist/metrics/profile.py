"""Kernel and CPU tables of a few training steps (torch.profiler), for `run.profile` and the bench.

Why: a throughput figure says how fast, not where the time went; the per-kernel table of a graphed
step and the CPU table of an eager one answer the two questions a slow layout raises (which kernels,
and whether the GPU waits on the host). torch is imported lazily (the package stays torch-free).
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def profiled(path: str, title: str, n_steps: int, cpu: bool = True):
    """Profile the enclosed steps; append to `path` the GPU kernel time per step and the top kernels
    (and, `cpu`, the top CPU ops). Yields a dict that gets `gpu_kernel_ms` (or `profile_error`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    result: dict = {}
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    with profile(activities=acts) as prof:
        yield result
        torch.cuda.synchronize()
    try:
        ka = prof.key_averages()
        attr = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
        busy = sum(getattr(e, attr) for e in ka if "CUDA" in str(getattr(e, "device_type", "CUDA"))) / n_steps / 1e3
        tables = [ka.table(sort_by=attr, row_limit=60, max_name_column_width=130)]
        if cpu:
            tables.append(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90))
        with open(path, "a") as f:
            f.write(f"=== {title}; GPU kernel time {busy:.1f} ms/step over {n_steps} steps\n" + "\n".join(tables) + "\n")
        result["gpu_kernel_ms"] = round(busy, 1)
    except Exception as e:  # noqa: BLE001 - a failed table must not fail the run it measured
        result["profile_error"] = repr(e)[:200]
