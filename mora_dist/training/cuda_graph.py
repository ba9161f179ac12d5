"""One micro-batch's forward and backward as a CUDA graph (`train.cuda_graph: true`).

Why: the eager adapter step is CPU-bound on a GPU. On the 1.1B model of docs/design.md section 5 (H100,
docs/performance.md) a LoRA step's kernels take ~108 ms but launching them from Python (megatron's
layers, ~150 adapters, autograd bookkeeping) takes ~230 ms; replaying a graph issues the same
kernels with one launch.

What is captured: the model forward, the masked mean loss and its backward on static input
buffers; megatron DDP's gradient hooks add each parameter's gradient into its fp32 main-grad
buffer inside the graph. Outside it, eagerly: copying the batch into the static buffers, the DP
gradient reduction, the grad norm, clipping and the optimizer step (a few fused kernels).
Capture follows PyTorch's whole-network recipe: warm-up iterations on a side stream (their
gradients are discarded), then capture. Reductions over one-rank groups (megatron's
vocab-parallel loss at TP=1) are identities and are skipped so that only kernels are captured.
A graph records tensor addresses: anything that replaces a tensor the forward reads (a ReMoRA
type switch rebuilds MoRA's index maps, merging changes the path) must call `invalidate()`; the
Trainer does after every restart. The merged adapter weights are built outside the micro-batch graph,
once a step, into buffers whose addresses stay fixed (`inject.fixed_adapters`), by a graph of their
own (`BuildGraph`).

Under pipeline parallelism a stage interleaves micro-batches (1F1B: several forwards in flight), so
one micro-batch's graph does not fit; `ScheduleGraph` captures the whole schedule of a step instead
(every micro-batch's forward and backward and the P2P transfers between stages), as megatron's
full-iteration graph does. Under `parallel.vpp` it captures the interleaved schedule the same way (the
Trainer hands every chunk an iterator over the static micro-batches); on two H200s eager and graphed
losses were identical (launch/device/vpp_graph_check.py).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


@contextlib.contextmanager
def skip_single_rank_collectives():
    """all_reduce over a one-rank group is the identity: skip it (nothing to capture)."""
    all_reduce = dist.all_reduce

    def all_reduce_or_skip(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        if dist.get_world_size(group) == 1:
            return None
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce_or_skip
    try:
        yield
    finally:
        dist.all_reduce = all_reduce


def graph_safe_rng(seed: int) -> None:
    """Megatron's CUDA RNG tracker in its graph-safe form (the same seeds). Under SP megatron forks
    the tracker's state around the embedding's dropout inside the forward; the plain tracker sets
    the generator's seed, which CUDA graph capture refuses."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=True, force_reset_rng=True)


def _register_rng_states(graph) -> None:
    """Let the graph see the graph-safe RNG states megatron's tracker may switch to."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    if getattr(tracker, "use_cudagraphable_rng", False):
        for state in tracker.get_states().values():
            graph.register_generator_state(state)


def _release(graph) -> None:
    """Free a captured graph now (not whenever Python drops it): a graph holding captured NCCL work
    keeps its communicators from being destroyed, and `destroy_process_group` then never returns
    (pytorch/pytorch#115388): TP and PP runs hung at exit after their last step."""
    if graph is not None:
        torch.cuda.synchronize()
        graph.reset()


class MicrobatchGraph:
    """`loss = fwd_bwd(batch)` as a replayable graph; `fwd_bwd` must return the detached loss."""

    def __init__(self, fwd_bwd, zero_grads, warmup: int = 2):
        self.fwd_bwd, self.zero_grads, self.warmup = fwd_bwd, zero_grads, warmup
        self.graph = None
        self.static = None
        self.loss = None

    def invalidate(self) -> None:
        _release(self.graph)
        self.graph = self.static = self.loss = None

    def __call__(self, batch: dict, first_of_step: bool) -> torch.Tensor:
        if self.graph is None:
            if not first_of_step:  # capture needs gradients that are zero before it
                return self.fwd_bwd(batch)
            self._capture(batch)
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.loss.clone()

    def _capture(self, batch: dict) -> None:
        dev = torch.cuda.current_device()
        self.static = {k: v.to(dev).clone() for k, v in batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), skip_single_rank_collectives():
            for _ in range(self.warmup):
                self.fwd_bwd(self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.zero_grads()  # warm-up gradients are not part of any step
        graph = torch.cuda.CUDAGraph()
        _register_rng_states(graph)
        with skip_single_rank_collectives(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.loss = self.fwd_bwd(self.static)
        self.graph = graph


class BuildGraph:
    """`build()` (every adapted layer's W0 + dW into its step buffer: `inject.fixed_adapters`) as one
    replayable graph. Why: eagerly each layer's build is a few small kernels and a Triton launch from
    Python, and the GPU idles while the CPU issues them (8B LoRA, 128 layer builds a step: step time
    minus kernel time 33 ms against the frozen step's 12). The first `warmup` calls run eagerly (they
    allocate the step buffers); the next is captured, then every call replays. Call `invalidate()`
    whenever the plan or the adapter tensors are replaced (restarts), as for the step's graph."""

    def __init__(self, warmup: int = 1):
        self.warmup = warmup
        self.graph = None
        self.eager_calls = 0

    def invalidate(self) -> None:
        _release(self.graph)
        self.graph = None
        self.eager_calls = 0

    def __call__(self, build) -> None:
        if self.graph is None and self.eager_calls < self.warmup:
            self.eager_calls += 1
            build()
            return
        if self.graph is None:  # capture runs no kernel: the replay below does the build
            graph = torch.cuda.CUDAGraph()
            with skip_single_rank_collectives(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                build()
            self.graph = graph
        self.graph.replay()


class ScheduleGraph:
    """`losses = run(batches)` (a step's whole pipeline schedule over the list of micro-batches) as
    one replayable graph. The first `warmup` steps run eagerly (they are real steps; NCCL's P2P
    communicators, compiled kernels and cuBLAS workspaces are made there, outside the capture); the
    next is captured (capture runs no kernel, so no gradient is counted twice) and replayed."""

    def __init__(self, run, warmup: int = 2):
        self.run, self.warmup = run, warmup
        self.graph = self.static = self.out = None
        self.eager_steps = 0

    def invalidate(self) -> None:
        _release(self.graph)
        self.graph = self.static = self.out = None
        self.eager_steps = 0

    def __call__(self, batches: list) -> list:
        if self.graph is None and self.eager_steps < self.warmup:
            self.eager_steps += 1
            return self.run(batches)
        if self.graph is None:
            self._capture(batches)
        else:
            for st, b in zip(self.static, batches):
                for k, v in b.items():
                    st[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return [{k: v.clone() for k, v in d.items()} for d in self.out]

    def _capture(self, batches: list) -> None:
        dev = torch.cuda.current_device()
        self.static = [{k: v.to(dev).clone() for k, v in b.items()} for b in batches]
        torch.cuda.synchronize()
        dist.barrier()  # every stage captures the same schedule of matching sends and receives
        graph = torch.cuda.CUDAGraph()
        _register_rng_states(graph)
        with skip_single_rank_collectives(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.out = self.run(self.static)
        torch.cuda.synchronize()
        self.graph = graph
