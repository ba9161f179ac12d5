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
     what arrived (`Pull.wait`).
The barriers and copies are stream work, so the whole exchange is captured in CUDA graphs like NCCL's.
Results are bit-identical to `overlap.py`'s NCCL path: the same GEMMs on the same blocks, the partial
sums added in the same order. GPUs only (symmetric memory has no CPU backend); the CPU tests run
the NCCL path's code over gloo, and `launch/device/p2p_check.py` checks this one against it on GPUs.
"""
from __future__ import annotations

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


class Pull:
    """One exchange in flight: `send(j)` is this rank's outgoing block for rank j (a view of its
    workspace, to be written by the caller on the current stream before `start`); `start(recv)`
    pulls rank j's block for this rank into recv[j] for every other rank j; `wait()` makes the
    current stream wait for the pulls."""

    def __init__(self, group, shape, dtype, per_peer: bool):
        """`per_peer`: each rank sends a different block to each other rank (its workspace holds
        world - 1 blocks, in rank order without itself); else one block to all."""
        self.n, self.r = dist.get_world_size(group), dist.get_rank(group)
        self.shape, self.dtype, self.per_peer = tuple(shape), dtype, per_peer
        numel = 1
        for s in self.shape:
            numel *= s
        self.numel = numel
        slots = self.n - 1 if per_peer else 1
        dev = torch.device("cuda", torch.cuda.current_device())
        self.buf, self.handle, self.stream = _workspace(group, slots * numel * torch.finfo(dtype).bits // 8, dev)

    def _slot(self, owner: int, dest: int) -> int:
        return (dest if dest < owner else dest - 1) if self.per_peer else 0

    def _view(self, owner: int, dest: int) -> torch.Tensor:
        return self.handle.get_buffer(owner, self.shape, self.dtype, self._slot(owner, dest) * self.numel)

    def send(self, dest: int = -1) -> torch.Tensor:
        """This rank's outgoing block for `dest` (any rank when not per_peer)."""
        return self._view(self.r, dest if self.per_peer else 0)

    def start(self, recv: dict) -> None:
        """recv: {rank j: tensor of `shape`} for every other rank j."""
        cur = torch.cuda.current_stream()
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            self.handle.barrier(channel=0)
            for j, out in recv.items():
                out.copy_(self._view(j, self.r))
            self.handle.barrier(channel=1)

    def wait(self) -> None:
        torch.cuda.current_stream().wait_stream(self.stream)


def gather_mm(a: torch.Tensor, B: torch.Tensor, group, mm) -> tuple:
    """(A @ B, A) for A = a's rows all-gathered over `group`, the peers' rows pulled by the copy
    engines while this rank multiplies its own (`mm(x, B, out)`: the caller's GEMM)."""
    n, r, m = dist.get_world_size(group), dist.get_rank(group), a.shape[0]
    p = Pull(group, a.shape, a.dtype, per_peer=False)
    p.send().copy_(a)
    A = a.new_empty(n * m, a.shape[1])
    p.start({j: A[j * m:(j + 1) * m] for j in range(n) if j != r})
    out = a.new_empty(n * m, B.shape[1])
    mm(a, B, out[r * m:(r + 1) * m])
    A[r * m:(r + 1) * m].copy_(a)
    p.wait()
    if r:
        mm(A[:r * m], B, out[:r * m])
    if r < n - 1:
        mm(A[(r + 1) * m:], B, out[(r + 1) * m:])
    return out, A


def gather(a: torch.Tensor, group) -> torch.Tensor:
    """a's rows all-gathered over `group` (rank-major)."""
    n, r, m = dist.get_world_size(group), dist.get_rank(group), a.shape[0]
    p = Pull(group, a.shape, a.dtype, per_peer=False)
    p.send().copy_(a)
    A = a.new_empty(n * m, a.shape[1])
    p.start({j: A[j * m:(j + 1) * m] for j in range(n) if j != r})
    A[r * m:(r + 1) * m].copy_(a)
    p.wait()
    return A


def mm_scatter(a: torch.Tensor, B: torch.Tensor, group, m: int, mm, overlap=None) -> torch.Tensor:
    """This rank's rows of (a @ B) summed over `group`: the other ranks' row blocks multiplied
    straight into this rank's workspace, pulled by them while this rank multiplies its own block and
    runs `overlap()`; the pulled partial sums are added in rank order (as overlap.mm_scatter does)."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    p = Pull(group, (m, B.shape[1]), a.dtype, per_peer=True)
    for j in range(n):
        if j != r:
            mm(a[j * m:(j + 1) * m], B, p.send(j))
    recv = a.new_empty((n - 1) * m, B.shape[1])
    others = [j for j in range(n) if j != r]
    p.start({j: recv[i * m:(i + 1) * m] for i, j in enumerate(others)})
    own = a[r * m:(r + 1) * m] @ B
    if overlap is not None:
        overlap()
    p.wait()
    return own.add_(recv.view(n - 1, m, -1).sum(0) if n > 2 else recv)
