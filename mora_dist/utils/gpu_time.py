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


def cuda_graph_ms(fn, reps: int, calls: int = 10) -> float:
    """ms per call of fn() replayed from a CUDA graph of `calls` calls: GPU time without the CPU's launch
    cost (what a graphed training step pays), for kernels too short to time eagerly."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, allocator pools) off the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_ms(graph.replay, reps) / calls
