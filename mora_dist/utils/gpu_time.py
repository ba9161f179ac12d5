"""Mean milliseconds of a GPU callable between CUDA events: the kernel microbenches' one timer."""
from __future__ import annotations

import torch


def cuda_ms(fn, reps: int, warmup: int = 3) -> float:
    """fn() run `warmup` times, then `reps` times between two CUDA events; ms per call."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
