"""Sequence parallelism's transfers on the GPU's copy engines: peer copies over NVLink through
symmetric memory (`parallel.tp_transport: copy_engine`).

Why (docs/performance.md, "Two GPUs"): NCCL's kernels run on SMs. Next to the GEMMs they are meant to
hide behind, both slow down (8B, TP=2 + SP: 32 MiB all-gathers take 150-290 us beside a GEMM against
~160 us alone), and the q/k/v and o transfers stay exposed, ~185 ms of a ~1.2 s step. A peer copy over
NVLink runs on a copy engine and takes no SM, so the GEMM beside it keeps the whole GPU.

How: every rank of the TP group maps one symmetric-memory workspace that all ranks can read (torch's
`_symmetric_memory`, CUDA P2P within one node). One transfer is
  1. the current stream writes what this rank sends into its own workspace;
  2. on a side stream: a barrier (every rank has written), each rank pulls the blocks meant for it
     from the others' workspaces (copy engine), a second barrier (every rank has pulled: the
     workspaces may be written again);
  3. the current stream does its own work meanwhile and waits for the side stream before it reads
     what arrived (`Exchange.wait`).
The barriers and copies are stream work, so the whole exchange is captured in CUDA graphs like NCCL's.
`overlap.py` runs the same GEMMs around either transport (`all_gather`, `all_to_all` here stand in for
NCCL's all-gather and all-to-all), so the results are bit-identical to its NCCL path. GPUs only (symmetric memory has no CPU backend); the CPU tests run
the NCCL path's code over gloo, and `launch/device/p2p_check.py` checks this one against it on GPUs.
"""
from __future__ import annotations

import math
import socket
import warnings

import torch
import torch.distributed as dist

_workspaces: dict = {}  # group name -> (symmetric buffer, its handle, side stream); grown, never shrunk
_retired: list = []  # outgrown workspaces: a graph captured earlier may still read them


def supported(group) -> tuple:
    """(True, "") when the copy-engine transport can serve `group`, else (False, why). A collective
    over `group` (every rank of it calls this)."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError:
        return False, f"torch {torch.__version__} has no symmetric memory"
    backend = str(dist.get_backend(group))  # "nccl", or "cpu:gloo,cuda:nccl" with a CPU backend beside
    if "nccl" not in backend:
        return False, f"the TP group's CUDA backend is {backend}, not nccl"
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) > 1:
        return False, f"the TP group spans {len(set(hosts))} hosts (peer copies need one node's NVLink)"
    return True, ""


def _workspace(group, nbytes: int, device):
    """This group's workspace of at least `nbytes` (made or grown here, eagerly: a rendezvous is a
    collective over the group and cannot happen inside a CUDA graph capture)."""
    from torch.distributed import _symmetric_memory as symm_mem

    name = group.group_name
    ws = _workspaces.get(name)
    if ws is not None and ws[0].numel() >= nbytes:
        return ws
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"p2p workspace of {nbytes} bytes first needed inside a CUDA graph capture; "
                           "run the step eagerly once before capturing (train.cuda_graph warms up first)")
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed by older torch, a deprecated no-op need in newer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable(name)
    size = max(nbytes, 2 * ws[0].numel() if ws is not None else 0)
    buf = symm_mem.empty(size, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buf, group)
    if ws is not None:
        _retired.append(ws)
    ws = (buf, handle, ws[2] if ws is not None else torch.cuda.Stream(device=device))
    _workspaces[name] = ws
    return ws


class Exchange:
    """One exchange in flight, with the `wait()` of a collective's work handle. `outgoing`: this rank's
    outgoing rows in its workspace (per_peer: the blocks for the other ranks in rank order, as
    all_to_all_single's input without this rank's own; else the one block every rank pulls), to be
    written on the current stream before `start`; `start(recv)` pulls, for every other rank j, rank
    j's block for this rank into recv[j]; `wait()` makes the current stream wait for the pulls."""

    def __init__(self, group, block_shape, dtype, per_peer: bool):
        self.n, self.r = dist.get_world_size(group), dist.get_rank(group)
        self.shape, self.dtype, self.per_peer = tuple(block_shape), dtype, per_peer
        self.numel = math.prod(self.shape)
        slots = self.n - 1 if per_peer else 1
        dev = torch.device("cuda", torch.cuda.current_device())
        self.buf, self.handle, self.stream = _workspace(group, slots * self.numel * dtype.itemsize, dev)
        self.outgoing = self.handle.get_buffer(self.r, (slots * self.shape[0], *self.shape[1:]), dtype, 0)

    def _incoming(self, owner: int) -> torch.Tensor:
        """Rank `owner`'s block for this rank, in owner's workspace."""
        slot = (self.r if self.r < owner else self.r - 1) if self.per_peer else 0
        return self.handle.get_buffer(owner, self.shape, self.dtype, slot * self.numel)

    def start(self, recv: dict) -> "Exchange":
        """recv: {rank j: tensor of the block shape} for every other rank j."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.handle.barrier(channel=0)
            for j, out in recv.items():
                out.copy_(self._incoming(j))
            self.handle.barrier(channel=1)
        return self

    def wait(self) -> None:
        torch.cuda.current_stream().wait_stream(self.stream)


def all_gather(A: torch.Tensor, a: torch.Tensor, group) -> Exchange:
    """Start A = a's rows all-gathered over `group` (rank-major; a contiguous): the other ranks' rows
    pulled by the copy engines, this rank's copied on the current stream. `wait()` before reading A."""
    n, r, m = dist.get_world_size(group), dist.get_rank(group), a.shape[0]
    ex = Exchange(group, a.shape, a.dtype, per_peer=False)
    ex.outgoing.copy_(a)
    ex.start({j: A[j * m:(j + 1) * m] for j in range(n) if j != r})
    A[r * m:(r + 1) * m].copy_(a)
    return ex


def all_to_all(recv: torch.Tensor, ex: Exchange) -> Exchange:
    """Start all_to_all_single(recv, ex.outgoing) with this rank's own block left out of both (recv:
    the other ranks' blocks for this rank, in rank order)."""
    m, others = ex.shape[0], [j for j in range(ex.n) if j != ex.r]
    return ex.start({j: recv[i * m:(i + 1) * m] for i, j in enumerate(others)})
