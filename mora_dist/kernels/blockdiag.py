"""Triton kernels for MoRA's block types on the merged-weight path (GPU; `blockdiag` dispatches).

Both are driven by one table of work items (`blockdiag.items`: layer row of the chunk's row 0,
chunk c, valid chunk rows [i0, i1), chunk columns [k0, k1), x column of chunk column 0), one per
(adapter piece, chunk, side of an input wrap), so every access is contiguous, and both take M and
the rotation tables, so the chunk matrices W_c = M R_c are never materialised:

- `add_blocks_`: W[row0 + i, xcol0 + k] += W_c[i, k], W_c[i, k] = M[i, k] cos_c[k] + s(k) M[i, k^h]
  sin_c[k] (h = rh/2, k^h = k +- h, s = +1 below h, -1 above; decouple: W_c = M), fp32 add, one
  rounding: one launch per adapter instead of ~10 small torch kernels per piece.
- `block_grad`: dM = sum_c G_c^T (R_c X_c) (G_c, X_c: the item's rows of g and columns of x),
  i.e. the chunk-matrix gradients and their chain rule through R_c in one pass over g and x:
  each program owns a tile of dM and a run of (item, token block) units; a unit's product
  acc = G^T X is scaled by cos_c (and sin_c, into a second accumulator whose columns are permuted
  by k^h at the store), so the reduction stays a plain dot over tokens. Programs write partials,
  summed after (deterministic, no atomics). It replaces, per adapter, batched GEMMs over aligned
  superblocks (2x the FLOPs at rh = 180), dense GEMMs for partial chunks, gathers of wrapped
  columns, fp32 adds per chunk and the autograd graph of W_c = M R_c (~30 kernels).

Why this is fast where a first version (27-37 ms a step) was not: every offset is a multiple of
ALIGN (gcd of the table, rh and 8), declared with `tl.multiple_of`, and masks only cut at such
offsets, so loads are 8- or 16-byte vectors and the loop pipelines; the earlier kernel took input
columns mod d_in per element (scalar loads). On the H100 the 1.1B model's rotation step went from
111.2 to 98.8 ms with this (LoRA: 99.8; docs/performance.md, v9). Needs rh <= d_in (every (row, column) of W written
once by the add); `blockdiag` keeps the torch form otherwise and on the CPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

ADD_TILE = 64  # chunk rows x chunk columns per program of the add
NF = tl.constexpr(7)  # fields of a work item


def grad_config(rh: int, itemsize: int = 2) -> dict:
    """block_grad's tiling (dM tile BI x BK, tokens per dot BT, tokens per unit TB, units per
    program UPP, launch options), picked on the H100 in a CUDA graph over the 1.1B model's seven
    adapters (docs/performance.md): 128 x 128 tiles with 8 warps for rh > 160 (11.4 ms a step for
    all 154 adapters vs 13.8 with 64 x 64), 64 x 64 for small rh (k/v, rh 136: 0.51 vs 0.87 ms)."""
    if rh <= 160:
        return dict(BI=64, BK=64, BT=64, TB=1024, UPP=4, num_warps=4, num_stages=3)
    # 4-byte inputs (fp32 checks) need twice the shared memory a stage: 4 stages of 128-wide fp32
    # tiles ask 256 KiB, over the H100/H200 limit (227 KiB)
    return dict(BI=128, BK=128, BT=64, TB=2048, UPP=2, num_warps=8, num_stages=4 if itemsize <= 2 else 2)


@triton.jit
def _item(tab_ptr, it, ALIGN: tl.constexpr):
    e = tab_ptr + NF * it
    row0 = tl.multiple_of(tl.load(e), ALIGN)
    c = tl.load(e + 1)
    i0 = tl.multiple_of(tl.load(e + 2), ALIGN)
    i1 = tl.multiple_of(tl.load(e + 3), ALIGN)
    k0 = tl.multiple_of(tl.load(e + 4), ALIGN)
    k1 = tl.multiple_of(tl.load(e + 5), ALIGN)
    xcol0 = tl.multiple_of(tl.load(e + 6), ALIGN)
    return row0, c, i0, i1, k0, k1, xcol0


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, c, ok, RH: tl.constexpr, ACC: tl.constexpr):
    """Chunk c's cos_c[k], sin_c[k] at columns ok."""
    cs = tl.load(cos_ptr + c * RH + ok, mask=ok < RH, other=0.0).to(ACC)
    sn = tl.load(sin_ptr + c * RH + ok, mask=ok < RH, other=0.0).to(ACC)
    return cs, sn


@triton.jit
def _partner(ok, RH: tl.constexpr, ACC: tl.constexpr):
    """The partner column k^h (k +- h, h = RH/2) and s(k) = +1 below h, -1 above, as in
    (M R_c)[:, k] = M[:, k] cos_c[k] + s(k) M[:, k^h] sin_c[k]."""
    h = RH // 2
    return tl.where(ok < h, ok + h, ok - h), tl.where(ok < h, 1.0, -1.0).to(ACC)


@triton.jit
def _add_kernel(w_ptr, m_ptr, cos_ptr, sin_ptr, tab_ptr, sw, RH: tl.constexpr, ROT: tl.constexpr,
                ALIGN: tl.constexpr, ACC: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr):
    item = tl.program_id(0)
    tile = tl.program_id(1)
    row0, c, i0, i1, k0, k1, xcol0 = _item(tab_ptr, item, ALIGN)
    nk = tl.cdiv(RH, BK)
    oi = (tile // nk) * BI + tl.arange(0, BI)
    ok = (tile % nk) * BK + tl.arange(0, BK)
    m = ((oi >= i0) & (oi < i1))[:, None] & ((ok >= k0) & (ok < k1))[None, :]
    mm = (oi < RH)[:, None] & (ok < RH)[None, :]
    add = tl.load(m_ptr + oi[:, None] * RH + ok[None, :], mask=mm, other=0.0).to(ACC)
    if ROT:
        cs, sn = _cos_sin(cos_ptr, sin_ptr, c, ok, RH, ACC)
        kp, sgn = _partner(ok, RH, ACC)
        part = tl.load(m_ptr + oi[:, None] * RH + kp[None, :], mask=mm, other=0.0).to(ACC)
        add = add * cs[None, :] + part * (sgn * sn)[None, :]
    ptr = w_ptr + (row0 + oi)[:, None] * sw + (xcol0 + ok)[None, :]
    cur = tl.load(ptr, mask=m, other=0.0).to(ACC)
    tl.store(ptr, (cur + add).to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _grad_kernel(g_ptr, x_ptr, cos_ptr, sin_ptr, tab_ptr, part_ptr, T, sg, sx, n_units, NTB,
                 RH: tl.constexpr, ROT: tl.constexpr, NSLOT: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, BI: tl.constexpr,
                 BK: tl.constexpr, BT: tl.constexpr, TB: tl.constexpr, UPP: tl.constexpr):
    tile = tl.program_id(0)
    sp = tl.program_id(1)
    nk = tl.cdiv(RH, BK)
    ti = tile // nk
    tk = tile % nk
    oi = ti * BI + tl.arange(0, BI)
    ok = tk * BK + tl.arange(0, BK)
    tot = tl.zeros((BI, BK), dtype=ACC)
    tot2 = tl.zeros((BI, BK), dtype=ACC)
    for j in range(UPP):
        u = sp * UPP + j
        it = tl.minimum(u, n_units - 1) // NTB
        t0 = (tl.minimum(u, n_units - 1) % NTB) * TB
        row0, c, i0, i1, k0, k1, xcol0 = _item(tab_ptr, it, ALIGN)
        lo_i = tl.maximum(i0, ti * BI)
        hi_i = tl.minimum(i1, ti * BI + BI)
        lo_k = tl.maximum(k0, tk * BK)
        hi_k = tl.minimum(k1, tk * BK + BK)
        if (u < n_units) & (lo_i < hi_i) & (lo_k < hi_k):  # the unit touches this tile
            mi = (oi >= i0) & (oi < i1)
            mk = (ok >= k0) & (ok < k1)
            acc = tl.zeros((BI, BK), dtype=ACC)
            for s in range(TB // BT):
                ot = t0 + s * BT + tl.arange(0, BT)
                mt = ot < T
                a = tl.load(g_ptr + ot[:, None] * sg + (row0 + oi)[None, :], mask=mt[:, None] & mi[None, :], other=0.0)
                b = tl.load(x_ptr + ot[:, None] * sx + (xcol0 + ok)[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
                acc = tl.dot(tl.trans(a), b, acc, out_dtype=ACC)
            if ROT:
                cs, sn = _cos_sin(cos_ptr, sin_ptr, c, ok, RH, ACC)
                tot += acc * cs[None, :]
                tot2 += acc * sn[None, :]
            else:
                tot += acc
    m = (oi < RH)[:, None] & (ok < RH)[None, :]
    base = part_ptr + sp * NSLOT * RH * RH + oi[:, None] * RH
    tl.store(base + ok[None, :], tot, mask=m)
    if ROT:  # dM[:, j] += s'(j) B[:, j^h]: column k of the sin accumulator lands on k^h with sign s(k)
        kp, sgn = _partner(ok, RH, ACC)
        tl.store(base + RH * RH + kp[None, :], tot2 * sgn[None, :], mask=m)


_TABLES: dict = {}


def _table(items: tuple, rh: int, device):
    """(item table [n, NF] int32 on `device`, ALIGN), made once per layout (never inside a CUDA
    graph capture: the warm-up passes fill this). ALIGN: the power of two (<= 8) dividing rh and
    every offset of the table, declared to the compiler for vector loads."""
    key = (items, str(device))
    if key not in _TABLES:
        align = 8
        for v in (rh, *(abs(f) for it in items for j, f in enumerate(it) if j != 1)):
            align = math.gcd(align, v)
        _TABLES[key] = (torch.tensor(items, dtype=torch.int32).reshape(len(items), NF.value).to(device), align)
    return _TABLES[key]


def _acc(dtype):
    """Accumulation type: fp32, or fp64 for float64 inputs (the CPU checks against float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def add_blocks_(W: torch.Tensor, M: torch.Tensor, rot, items: tuple, rh: int) -> None:
    tab, align = _table(items, rh, W.device)
    cos, sin = rot if rot is not None else (M, M)
    grid = (tab.shape[0], triton.cdiv(rh, ADD_TILE) ** 2)
    _add_kernel[grid](W, M.contiguous(), cos, sin, tab, W.stride(0), RH=rh, ROT=rot is not None, ALIGN=align,
                      ACC=_acc(W.dtype), BI=ADD_TILE, BK=ADD_TILE)


def block_grad(g2: torch.Tensor, x2: torch.Tensor, rot, items: tuple, rh: int, dtype, cfg: dict | None = None):
    """dM [rh, rh] (in `dtype`) of one block adapter from the layer's output gradient g2 and input x2."""
    cfg = cfg or grad_config(rh, g2.element_size())
    tab, align = _table(items, rh, g2.device)
    T = g2.shape[0]
    TB = min(cfg["TB"], triton.next_power_of_2(max(T, cfg["BT"])))
    ntb = triton.cdiv(T, TB)
    n_units = tab.shape[0] * ntb
    split = triton.cdiv(n_units, cfg["UPP"])
    acc = torch.float64 if g2.dtype == torch.float64 else torch.float32
    nslot = 2 if rot is not None else 1  # the sin accumulator's permuted columns go to slot 1
    part = torch.empty(split, nslot, rh, rh, device=g2.device, dtype=acc)
    cos, sin = rot if rot is not None else (part, part)
    grid = (triton.cdiv(rh, cfg["BI"]) * triton.cdiv(rh, cfg["BK"]), split)
    _grad_kernel[grid](g2, x2, cos, sin, tab, part, T, g2.stride(0), x2.stride(0), n_units, ntb, RH=rh,
                       ROT=rot is not None, NSLOT=nslot, ALIGN=align, ACC=_acc(g2.dtype), BI=cfg["BI"], BK=cfg["BK"],
                       BT=cfg["BT"], TB=TB, UPP=cfg["UPP"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return part.sum((0, 1)).to(dtype)
