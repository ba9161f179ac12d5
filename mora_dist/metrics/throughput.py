"""Per-step throughput, model TFLOP/s, MFU and peak memory.

Warm-up steps (compilation, allocator growth, NCCL set-up) are reported but flagged, and left out
of the averages. Averages are time-weighted (total tokens / total time), which is what a run's
wall clock delivers; an arithmetic mean of per-step rates would overweight fast steps.
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Optional

# The H100 peaks MFU is measured against, in FLOP/s, defined here only: the datasheet bf16 dense peak
# of one H100 SXM (the default of StepMeter and of run.peak_tflops), and the bf16 matmul peak measured
# on the anchors' H100 (docs/design.md section 5; launch/bench.py's MFU), the more honest denominator.
H100_BF16_DENSE_PEAK = 989e12
H100_BF16_MEASURED_PEAK = 772e12


def peak_memory_bytes() -> tuple[int, str]:
    """(bytes, source): the CUDA allocator's peak when CUDA is in use, else the process's max RSS."""
    torch = sys.modules.get("torch")  # do not import torch just to ask
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "rss"  # Linux reports KiB


def _cuda_sync():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepMeter:
    """Times training steps and turns them into throughput metrics.

    Use ``start()`` / ``stop()`` around a step (CUDA is synchronised so the time is the GPU's), or
    ``record(step_time)`` with a time measured elsewhere. ``tokens_per_step`` is the global batch
    in tokens (all data-parallel ranks); ``flops_per_token`` from :mod:`mora_dist.metrics.flops`.
    """

    def __init__(self, tokens_per_step: int, num_gpus: int, flops_per_token: float,
                 peak_flops: float = H100_BF16_DENSE_PEAK, warmup_steps: int = 2):
        if tokens_per_step <= 0 or num_gpus <= 0 or flops_per_token < 0 or peak_flops <= 0:
            raise ValueError("tokens_per_step, num_gpus and peak_flops must be positive, flops_per_token >= 0")
        if warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        self.tokens_per_step = tokens_per_step
        self.num_gpus = num_gpus
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.warmup_steps = warmup_steps
        self.steps = 0  # steps recorded by this meter (a resumed run warms up again)
        self._t0: Optional[float] = None
        self._time = 0.0  # post-warm-up totals
        self._counted = 0
        self._peak_mem = 0

    def start(self) -> None:
        _cuda_sync()
        self._t0 = time.perf_counter()

    def stop(self) -> dict:
        if self._t0 is None:
            raise RuntimeError("StepMeter.stop() called without start()")
        _cuda_sync()
        dt = time.perf_counter() - self._t0
        self._t0 = None
        return self.record(dt)

    def record(self, step_time: float, peak_mem_bytes: Optional[int] = None, exclude: bool = False) -> dict:
        """Metrics of one step that took ``step_time`` seconds. Memory is measured unless given.
        `exclude`: a step that is not representative (CUDA-graph warm-up or capture, a profiled
        step) is reported but kept out of the summary, like the first `warmup_steps`."""
        if not step_time > 0:
            raise ValueError(f"step_time must be positive, got {step_time!r}")
        mem = peak_memory_bytes()[0] if peak_mem_bytes is None else int(peak_mem_bytes)
        self._peak_mem = max(self._peak_mem, mem)
        self.steps += 1
        warm = exclude or self.steps <= self.warmup_steps
        if not warm:
            self._time += step_time
            self._counted += 1
        return dict(step_time=step_time, warmup=warm, **self._rates(step_time), peak_mem_gib=mem / 2**30)

    def _rates(self, seconds_per_step: float) -> dict:
        tok_s = self.tokens_per_step / seconds_per_step
        flops_gpu = tok_s * self.flops_per_token / self.num_gpus
        return dict(tokens_per_s=tok_s, tokens_per_s_per_gpu=tok_s / self.num_gpus,
                    tflops_per_gpu=flops_gpu / 1e12, mfu=flops_gpu / self.peak_flops)

    def summary(self) -> dict:
        """Time-weighted averages over the post-warm-up steps (rates are None if there were none)."""
        out = dict(steps=self.steps, counted_steps=self._counted, num_gpus=self.num_gpus,
                   peak_mem_gib=self._peak_mem / 2**30)
        if self._counted:
            out.update(mean_step_time=self._time / self._counted, **self._rates(self._time / self._counted))
        else:
            out.update(mean_step_time=None, tokens_per_s=None, tokens_per_s_per_gpu=None,
                       tflops_per_gpu=None, mfu=None)
        return out
