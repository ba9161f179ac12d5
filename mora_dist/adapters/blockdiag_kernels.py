"""Triton kernels for MoRA's block types on the merged-weight path (GPU; `blockdiag` dispatches).

The torch forms in `blockdiag` cost many small kernels per adapter (a GEMM per superblock run and
per partial chunk, fp32 adds, fills, folds): on the 1.1B model that was ~20 ms a step of mostly
launch-bound work for ~1 TFLOP. Here each adapter is one launch per direction, driven by a table
of work items (layer row of the chunk's row 0, chunk c, valid chunk rows [i0, i1)), one per
(adapter piece, chunk) pair, with wrapped input columns taken mod d_in inside the kernel:

- `add_blocks_`: W[row0 + i, (c rh + k) mod d_in] += W_c[i, k] (fp32 add, one rounding);
- `block_grads`: dW_c = sum over c's items of g[:, row0 + i]^T x[:, (c rh + k) mod d_in], tokens
  split over programs (each writes its own partial, summed after: deterministic, no atomics).

Needs rh <= d_in (every (row, column) of W written once); `blockdiag` keeps the torch path
otherwise and on the CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BI = BK = 64  # chunk-row / chunk-column tile
BT = 64  # tokens per step of the reduction


@triton.jit
def _add_kernel(w_ptr, wc_ptr, tab_ptr, sw, d_in, rh, ACC: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr):
    item = tl.program_id(0)
    tile = tl.program_id(1)
    row0 = tl.load(tab_ptr + 4 * item)
    c = tl.load(tab_ptr + 4 * item + 1)
    i0 = tl.load(tab_ptr + 4 * item + 2)
    i1 = tl.load(tab_ptr + 4 * item + 3)
    nk = tl.cdiv(rh, BK)
    oi = (tile // nk) * BI + tl.arange(0, BI)
    ok = (tile % nk) * BK + tl.arange(0, BK)
    m = ((oi >= i0) & (oi < i1))[:, None] & (ok < rh)[None, :]
    ptr = w_ptr + (row0 + oi)[:, None] * sw + ((c * rh + ok) % d_in)[None, :]
    cur = tl.load(ptr, mask=m, other=0.0).to(ACC)
    add = tl.load(wc_ptr + c * rh * rh + oi[:, None] * rh + ok[None, :], mask=m, other=0.0).to(ACC)
    tl.store(ptr, (cur + add).to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _grad_kernel(g_ptr, x_ptr, out_ptr, tab_ptr, start_ptr, T, sg, sx, d_in, rh, n_used,
                 MAX_ITEMS: tl.constexpr, STEPS: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr,
                 BI: tl.constexpr, BK: tl.constexpr):
    c = tl.program_id(0)
    tile = tl.program_id(1)
    sp = tl.program_id(2)
    nk = tl.cdiv(rh, BK)
    oi = (tile // nk) * BI + tl.arange(0, BI)
    ok = (tile % nk) * BK + tl.arange(0, BK)
    mk = ok < rh
    xcol = (c * rh + ok) % d_in
    t_lo = sp * (STEPS * BT)
    t_hi = tl.minimum(t_lo + STEPS * BT, T)
    acc = tl.zeros((BI, BK), dtype=ACC)
    first = tl.load(start_ptr + c)
    n_items = tl.load(start_ptr + c + 1) - first
    for j in range(0, MAX_ITEMS):  # chunk c's items (constexpr bounds: the interpreter needs them)
        it = first + tl.minimum(j, n_items - 1)
        row0 = tl.load(tab_ptr + 4 * it)
        i0 = tl.load(tab_ptr + 4 * it + 2)
        i1 = tl.where(j < n_items, tl.load(tab_ptr + 4 * it + 3), 0)
        mi = (oi >= i0) & (oi < i1)
        for step in range(0, STEPS):
            ot = t_lo + step * BT + tl.arange(0, BT)
            mt = ot < t_hi
            a = tl.load(g_ptr + ot[:, None] * sg + (row0 + oi)[None, :], mask=mt[:, None] & mi[None, :], other=0.0)
            b = tl.load(x_ptr + ot[:, None] * sx + xcol[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
            acc = tl.dot(tl.trans(a), b, acc, out_dtype=ACC)
    m = (oi < rh)[:, None] & mk[None, :]
    tl.store(out_ptr + ((sp * n_used + c) * rh + oi[:, None]) * rh + ok[None, :], acc, mask=m)


_TABLES: dict = {}


def _tables(items: tuple, n_used: int, device):
    """(item table [n, 4] int32 sorted by chunk, chunk start offsets [n_used + 1], most items of a
    chunk) on `device`,
    made once per layout (never inside a CUDA graph capture: the warm-up passes fill this)."""
    key = (items, n_used, str(device))
    if key not in _TABLES:
        items = sorted(items, key=lambda it: it[1])
        tab = torch.tensor(items, dtype=torch.int32).reshape(-1, 4)
        counts = torch.bincount(tab[:, 1].long(), minlength=n_used)
        start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
        _TABLES[key] = (tab.to(device), start.to(device), int(counts.max()))
    return _TABLES[key]


def _acc(dtype):
    """Accumulation type: fp32, or fp64 for float64 inputs (the CPU checks against float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tiles(rh: int) -> int:
    return triton.cdiv(rh, BI) * triton.cdiv(rh, BK)


def add_blocks_(W: torch.Tensor, Wc: torch.Tensor, items: tuple, rh: int) -> None:
    tab = _tables(items, Wc.shape[0], W.device)[0]
    _add_kernel[(tab.shape[0], _tiles(rh))](W, Wc.contiguous(), tab, W.stride(0), W.shape[1], rh, ACC=_acc(W.dtype),
                                                BI=BI, BK=BK)


def block_grad(g2: torch.Tensor, x2: torch.Tensor, items: tuple, n_used: int, rh: int, dtype) -> torch.Tensor:
    tab, start, max_items = _tables(items, n_used, g2.device)
    T = g2.shape[0]
    # enough programs for ~2 waves on an H100 (132 SMs), at least 4 reduction steps each
    split = max(1, min(triton.cdiv(264, n_used * _tiles(rh)), T // (4 * BT)))
    steps = triton.cdiv(triton.cdiv(T, split), BT)
    split = triton.cdiv(T, steps * BT)
    acc = torch.float64 if g2.dtype == torch.float64 else torch.float32
    part = torch.empty(split, n_used, rh, rh, device=g2.device, dtype=acc)
    _grad_kernel[(n_used, _tiles(rh), split)](g2, x2, part, tab, start, T, g2.stride(0), x2.stride(0), x2.shape[1],
                                             rh, n_used, MAX_ITEMS=max_items, STEPS=steps, ACC=_acc(g2.dtype),
                                             BT=BT, BI=BI, BK=BK)
    return (part[0] if split == 1 else part.sum(0)).to(dtype)
