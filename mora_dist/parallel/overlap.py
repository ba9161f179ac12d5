"""Sequence parallelism's all-gather and reduce-scatter overlapped with the GEMM next to them.

Why (docs/performance.md, "Two GPUs"): under TP + SP every adapted layer all-gathers its input
before its GEMM (column-parallel) or reduce-scatters its output after it (row-parallel), and the
backward does the mirror image; run back to back, at the 8B shape on two H200s these collectives
were ~210 ms of a 1,246 ms step with the GPU's compute idle. Both decompose over the sequence
blocks the ranks own (rows of the [tokens, features] matrices, rank-major as megatron splits [s, b, h]):

- `gather_mm`: (all-gather a) @ B. The rank's own rows are already here, so their GEMM runs while
  the others' rows arrive; the rest follows the gather.
- `mm_scatter`: reduce-scatter of a @ B. The GEMMs for the other ranks' rows run first and go out
  in one all-to-all (no self copy); the rank's own rows, and any `overlap` work (the adapters'
  parameter gradients in the backward), run while they travel; the received partial sums are added.

Both are plain collectives on the TP group (capturable in CUDA graphs like megatron's own), exact
up to the order of the partial sums (a reduce-scatter adds them in its own order too).

SM carveout (`parallel.overlap_sm_carveout`, off by default until timed): Hopper's persistent cuBLAS
GEMMs launch one block per SM; with NCCL's kernels holding some SMs their blocks run in two waves and
the collective waits for SMs too (the 8B TP=2 profile: 32 MiB all-gathers at 150-290 us next to GEMMs).
`set_sm_carveout(n)` makes the GEMMs that run beside a collective here (and only those) leave n SMs
free, through cuBLASLt's SM-count target (torch's experimental carveout flag).

Transport (`parallel.tp_transport`, `choose_transport`): `nccl` (the collectives above) or `copy_engine`
(`p2p.py`: the same exchanges as NVLink peer copies that take no SM; GPUs of one node only); `auto`
(the default) takes the copy engines where they serve. Same results bit for bit; on two H200s at the 8B
shape the copy engines made the TP=2 + SP step 6% faster (docs/performance.md).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_carveout = 0  # set_sm_carveout
TRANSPORTS = ("auto", "nccl", "copy_engine")  # parallel.tp_transport
_transport = "nccl"  # set_transport


def set_sm_carveout(n: int) -> None:
    """SMs left free by the GEMMs that run beside a collective (`parallel.overlap_sm_carveout`; 0 = off)."""
    global _carveout
    _carveout = int(n)


def set_transport(name: str) -> None:
    """How SP's exchanges travel from now on: nccl | copy_engine (`p2p.py`)."""
    global _transport
    if name not in TRANSPORTS[1:]:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS[1:])}, got {name!r}")
    _transport = name


def choose_transport(setting: str, group) -> str:
    """Resolve and set `parallel.tp_transport` for the TP `group` (a collective over it when the copy
    engines are asked for): auto takes copy_engine where `p2p.supported`, else nccl; copy_engine where
    it cannot serve is a ValueError that says why. Returns the transport set."""
    if setting not in TRANSPORTS:
        raise ValueError(f"parallel.tp_transport must be one of {', '.join(TRANSPORTS)}, got {setting!r}")
    name = "nccl"
    if setting != "nccl" and dist.get_world_size(group) > 1:
        from mora_dist.parallel import p2p

        ok, why = p2p.supported(group)
        if setting == "copy_engine" and not ok:
            raise ValueError(f"parallel.tp_transport: copy_engine cannot serve this run ({why}); "
                             "set parallel.tp_transport=auto or nccl")
        name = "copy_engine" if ok else "nccl"
    set_transport(name)
    return name


def _p2p(a: torch.Tensor):
    """`p2p` when the copy-engine transport is on and `a` lives on a GPU, else None."""
    if _transport != "copy_engine" or not a.is_cuda:
        return None
    from mora_dist.parallel import p2p

    return p2p


@contextlib.contextmanager
def _beside_collective():
    """GEMMs in this block run while a collective travels: with a carveout, through cuBLASLt leaving
    `_carveout` SMs free (both flags are read when a GEMM is launched, so a captured graph keeps them)."""
    if not _carveout or not torch.cuda.is_available():
        yield
        return
    lib = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(_carveout)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(lib)


def _blocks(n_rows: int, group) -> tuple:
    """(world, rank, rows per rank) of a rank-major row split over `group`."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if n_rows % n:
        raise ValueError(f"{n_rows} rows do not split over {n} tensor-parallel ranks")
    return n, r, n_rows // n


def _gather_start(A: torch.Tensor, a: torch.Tensor, group):
    """Start A = a's rows all-gathered over `group` (a contiguous) on the transport; returns what to
    `wait()` on before reading A."""
    p2p = _p2p(a)
    if p2p is not None:
        return p2p.all_gather(A, a, group)
    return _all_gather(A, a, group=group, async_op=True)


def gather(a: torch.Tensor, group) -> torch.Tensor:
    """a's rows all-gathered over `group` (rank-major)."""
    A = a.new_empty(dist.get_world_size(group) * a.shape[0], a.shape[1])
    _gather_start(A, a.contiguous(), group).wait()
    return A


def gather_mm(a: torch.Tensor, B: torch.Tensor, group) -> tuple:
    """(A @ B, A) for A = a's rows all-gathered over `group` (a: [rows, k], this rank's block)."""
    n = dist.get_world_size(group)
    r, m = dist.get_rank(group), a.shape[0]
    A = a.new_empty(n * m, a.shape[1])
    work = _gather_start(A, a.contiguous(), group)
    out = a.new_empty(n * m, B.shape[1])
    with _beside_collective():
        torch.mm(a, B, out=out[r * m:(r + 1) * m])
    work.wait()
    if r:
        torch.mm(A[:r * m], B, out=out[:r * m])
    if r < n - 1:
        torch.mm(A[(r + 1) * m:], B, out=out[(r + 1) * m:])
    return out, A


def mm_scatter(a: torch.Tensor, B: torch.Tensor, group, overlap: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """This rank's rows of (a @ B) summed over `group` (a: [rows, k], every rank's partial), i.e.
    reduce-scatter(a @ B); `overlap()` runs while the partial sums travel."""
    n, r, m = _blocks(a.shape[0], group)
    p2p = _p2p(a)  # copy engines: the partial sums are multiplied straight into this rank's workspace
    ex = p2p.Exchange(group, (m, B.shape[1]), a.dtype, per_peer=True) if p2p is not None else None
    send = ex.outgoing if ex is not None else a.new_empty((n - 1) * m, B.shape[1])
    if r:
        torch.mm(a[:r * m], B, out=send[:r * m])
    if r < n - 1:
        torch.mm(a[(r + 1) * m:], B, out=send[r * m:])
    recv = a.new_empty(send.shape)
    if ex is not None:
        work = p2p.all_to_all(recv, ex)
    else:
        split = [0 if j == r else m for j in range(n)]
        work = dist.all_to_all_single(recv, send, split, split, group=group, async_op=True)
    with _beside_collective():
        own = a[r * m:(r + 1) * m] @ B
        if overlap is not None:
            overlap()
    work.wait()
    return own.add_(recv.view(n - 1, m, -1).sum(0) if n > 2 else recv)
