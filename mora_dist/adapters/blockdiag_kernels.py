"""Triton kernel adding MoRA's block-diagonal updates into the merged weight (GPU; `blockdiag`
dispatches).

The torch form in `blockdiag.add_blocks_` costs several small kernels per adapter piece (a strided
add per run of chunks, block_diag, slices and an index_add per partial or wrapped chunk): ~4 ms a
step of launch-bound work on the 1.1B model. Here each adapter is one launch, driven by a table
of work items (`blockdiag.items`: layer row of the chunk's row 0, chunk c, valid chunk rows
[i0, i1), chunk columns [k0, k1), x column of chunk column 0), one per (adapter piece, chunk,
side of an input wrap), so every access is contiguous:
W[row0 + i, xcol0 + k] += W_c[i, k] (fp32 add, one rounding). Needs rh <= d_in (every (row,
column) of W written once); `blockdiag` keeps the torch form otherwise and on the CPU.

The same table drove a split-token Triton kernel for the block-diagonal dW; on the H100 it ran
at 27-37 ms a step against ~12 ms for cuBLAS's batched GEMMs on strided views (unaligned chunk
columns defeat vectorised loads; docs/performance.md), so the gradient stays on cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ADD_TILE = 64  # chunk rows x chunk columns per program


@triton.jit
def _add_kernel(w_ptr, wc_ptr, tab_ptr, sw, rh, NF: tl.constexpr, ACC: tl.constexpr, BI: tl.constexpr,
                BK: tl.constexpr):
    item = tl.program_id(0)
    tile = tl.program_id(1)
    e = tab_ptr + NF * item
    row0, c, i0, i1 = tl.load(e), tl.load(e + 1), tl.load(e + 2), tl.load(e + 3)
    k0, k1, xcol0 = tl.load(e + 4), tl.load(e + 5), tl.load(e + 6)
    nk = tl.cdiv(rh, BK)
    oi = (tile // nk) * BI + tl.arange(0, BI)
    ok = (tile % nk) * BK + tl.arange(0, BK)
    m = ((oi >= i0) & (oi < i1))[:, None] & ((ok >= k0) & (ok < k1))[None, :]
    ptr = w_ptr + (row0 + oi)[:, None] * sw + (xcol0 + ok)[None, :]
    cur = tl.load(ptr, mask=m, other=0.0).to(ACC)
    add = tl.load(wc_ptr + c * rh * rh + oi[:, None] * rh + ok[None, :], mask=m, other=0.0).to(ACC)
    tl.store(ptr, (cur + add).to(w_ptr.dtype.element_ty), mask=m)


_TABLES: dict = {}


def _table(items: tuple, device) -> torch.Tensor:
    """The item table [n, 7] int32 on `device`, made once per layout (never inside a CUDA graph
    capture: the warm-up passes fill this)."""
    key = (items, str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(items, dtype=torch.int32).reshape(len(items), -1).to(device)
    return _TABLES[key]


def _acc(dtype):
    """Accumulation type: fp32, or fp64 for float64 inputs (the CPU checks against float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def add_blocks_(W: torch.Tensor, Wc: torch.Tensor, items: tuple, rh: int) -> None:
    tab = _table(items, W.device)
    grid = (tab.shape[0], triton.cdiv(rh, ADD_TILE) ** 2)
    _add_kernel[grid](W, Wc.contiguous(), tab, W.stride(0), rh, NF=tab.shape[1], ACC=_acc(W.dtype), BI=ADD_TILE, BK=ADD_TILE)
