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
  each program owns a tile of dM, one item (so one chunk c) and a contiguous run of tokens, and
  keeps one fp32 accumulator acc = G^T X; the rotation is a per-column fp32 scale of that
  product, applied once in the epilogue: dM[:, k] += acc[:, k] cos_c[k] + s(k^h) acc[:, k^h]
  sin_c[k^h]. Where h keeps the loads' alignment a tile's columns are BK/2 chunk columns a and
  their partners a + h (two contiguous runs of x), so the rotated tile is stored in place; else
  (odd h) tiles are contiguous and the sin part lands on k^h in a second partial. Programs write
  partials, summed after (deterministic, no atomics); `token_splits` sizes the token runs.
  It replaces, per adapter, batched GEMMs over aligned superblocks (2x the FLOPs at rh = 180),
  dense GEMMs for partial chunks, gathers of wrapped columns, fp32 adds per chunk and the
  autograd graph of W_c = M R_c (~30 kernels). Issue 15 (v9 -> this): v9's programs ran several
  (item, token block) units, each scaled into cos and sin accumulators: three 128 x 128 fp32
  tiles, 253-255 registers a thread on sm_90a, one pipeline fill per 2048 tokens, and rotation
  partials in two slots (8B: 257 MiB of fp32 partials a layer and micro-batch; here 103). Rotating x at load
  instead (x' = x cos + partner(x) sin, then one dot) was not taken: the dot would read x'
  rounded to bf16 (dM no longer the fp32 sum of exact products), and wgmma reads its B operand
  from shared memory, so x' would take a register round trip every step plus the partner loads.
  v9 (`_grad_kernel_v9`) stays as a second implementation of the same sum, faster at the 8B
  q/k/v/o shapes (rh <= 256, H200): `grad_impl` picks one per adapter, cfg["IMPL"] forces it.

Why this is fast where a first version (27-37 ms a step) was not: every offset is a multiple of
ALIGN (gcd of the table, rh and 8), declared with `tl.multiple_of`, and masks only cut at such
offsets, so loads are 8- or 16-byte vectors and the loop pipelines; the earlier kernel took input
columns mod d_in per element (scalar loads). On the H100 the 1.1B model's rotation step went from
111.2 to 98.8 ms with this (LoRA: 99.8; docs/performance.md, v9). Needs rh <= d_in (every (row, column) of W written
once by the add); `blockdiag` keeps the torch form otherwise and on the CPU.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

ADD_TILE = 64  # chunk rows x chunk columns per program of the add
NF = tl.constexpr(7)  # fields of a work item


def grad_impl(rh: int) -> str:
    """Which of block_grad's two kernels serves an adapter of rank rh: "v9" (`_grad_kernel_v9`) for
    rh <= 256, "new" (`_grad_kernel`) above. From `launch/bench_rotgrad.py` on an H200 at the 8B
    shapes (results/perf/s5_call1/rotgrad.txt; T = 8,192, r = 8), ms per layer and micro-batch:

        proj (rh, items)  q (256, 16)  k (202, 13)  v (202, 13)  o (256, 16)  gate/up (384, 41)  down (384, 11)
        rotation  v9      0.061        0.094        0.095        0.077        0.264 / 0.265      0.087
                  new     0.108        0.125        0.113        0.089        0.195 / 0.191      0.079
        decouple  v9      0.067        0.115        0.110        0.110        0.230 / 0.232      0.113
                  new     0.120        0.119        0.114        0.114        0.192 / 0.194      0.097

    v9 wins every rh <= 256 projection (q/k/v/o), new every rh 384 one (gate/up/down): rotation 0.943
    (v9) / 0.899 (new) -> 0.792 ms a layer, decouple 0.976 / 0.950 -> 0.885, if the rule holds in the
    step (in the step: rotation +5.5% -> +5.4% over frozen, level with LoRA). The new kernel's (item, tile)
    program count separates the table the same way (52-64 vs 99-369); the layer's width does not (o and
    down both write 4,096 rows). At 1.1B (rh 136, 180, 248) this picks v9 everywhere, and the dispatched
    layer is the fastest there too (`bench_rotgrad.py --size 1b`: rotation 0.883 ms vs v9 0.966 / new 0.931)."""
    return "v9" if rh <= 256 else "new"


def grad_config(rh: int, itemsize: int = 2, pair: bool = True, impl: str = "new") -> dict:
    """block_grad's tiling for sm_90 (H100/H200): dM tile BI x BK (paired rotation: BK/2 chunk
    columns and their BK/2 partners), tokens a step BT, launch options. rh > 160: 128 x 128 tiles
    with 8 warps (each warpgroup one m64n128k16 wgmma a k-step; the fp32 accumulator is 64
    registers a thread), 64-token steps. bf16 with the paired rotation or decouple: 3 stages of 32
    KiB and registers capped at 128 (no spills on sm_90a: ptxas -v of an offline compile), so two
    programs fit an SM and one's epilogue and pipeline fill overlap the other's dots; the unpaired
    rotation (odd h) takes 140-240 registers: one program an SM, 4 stages. 4-byte inputs (fp32
    checks): 2 stages. rh <= 160 (k/v at 1.1B, rh 136): 64 x 64 with 4 warps, where 128-wide tiles
    would be mostly masked. v9 (picked on the H100 over the 1.1B model's adapters): the same tiles,
    4 stages (2 for 4-byte inputs) at rh > 160, plus TB tokens a unit and UPP units a program."""
    if impl == "v9":
        if rh <= 160:
            return dict(BI=64, BK=64, BT=64, TB=1024, UPP=4, num_warps=4, num_stages=3, maxnreg=None)
        return dict(BI=128, BK=128, BT=64, TB=2048, UPP=2, num_warps=8, num_stages=4 if itemsize <= 2 else 2,
                    maxnreg=None)
    if rh <= 160:
        return dict(BI=64, BK=64, BT=64, num_warps=4, num_stages=3 if itemsize <= 2 else 2, maxnreg=None)
    if itemsize > 2:
        return dict(BI=128, BK=128, BT=64, num_warps=8, num_stages=2, maxnreg=None)
    if pair:
        return dict(BI=128, BK=128, BT=64, num_warps=8, num_stages=3, maxnreg=128)
    return dict(BI=128, BK=128, BT=64, num_warps=8, num_stages=4, maxnreg=None)


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
def _meets(a0, a1, b0, b1):
    """Whether [a0, a1) and [b0, b1) overlap."""
    return tl.maximum(a0, b0) < tl.minimum(a1, b1)


@triton.jit
def _dot_tokens(acc, g_ptr, x_ptr, sg, sx, T, t0, row0, oi, mi, xcol0, ok, mk,
                ACC: tl.constexpr, BT: tl.constexpr, STEPS: tl.constexpr):
    """acc + G^T X over tokens [t0, t0 + STEPS BT) (< T): G the layer rows row0 + oi of g (mask mi),
    X the columns xcol0 + ok of x (mask mk)."""
    for s in range(STEPS):
        ot = t0 + s * BT + tl.arange(0, BT)
        mt = ot < T
        a = tl.load(g_ptr + ot[:, None] * sg + (row0 + oi)[None, :], mask=mt[:, None] & mi[None, :], other=0.0)
        b = tl.load(x_ptr + ot[:, None] * sx + (xcol0 + ok)[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, out_dtype=ACC)
    return acc


@triton.jit
def _store_rot(base, ok, m, a_cos, a_sin, RH: tl.constexpr, ACC: tl.constexpr):
    """Unpaired rotation epilogue: dM[:, k] += a_cos[:, k] (slot 0), dM[:, k^h] += s(k) a_sin[:, k]
    (slot 1, RH * RH on), a_cos / a_sin the tile's product already scaled by cos_c / sin_c."""
    kp, sgn = _partner(ok, RH, ACC)
    tl.store(base + ok[None, :], a_cos, mask=m)
    tl.store(base + RH * RH + kp[None, :], a_sin * sgn[None, :], mask=m)


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
def _grad_kernel(g_ptr, x_ptr, cos_ptr, sin_ptr, tab_ptr, part_ptr, T, sg, sx, NS,
                 RH: tl.constexpr, ROT: tl.constexpr, PAIR: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                 BI: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, TP: tl.constexpr):
    """Program (tile, sp): item sp // NS over tokens [t0, t0 + TP), t0 = (sp % NS) TP, into one
    accumulator acc = G^T X over the tile's rows and columns, rotated in the epilogue (the item's
    chunk c is fixed) and stored into partial sp. PAIR (rotation, h = RH/2 keeps ALIGN): the tile's
    BK columns are BK/2 chunk columns a and their partners a + h, so both sides of each rotation
    pair are in acc and the rotated tile is stored in place (partials [n, RH, RH]); else columns are
    contiguous and the sin part goes to its partner columns in a second slot ([n, 2, RH, RH])."""
    tile = tl.program_id(0)
    sp = tl.program_id(1)
    BK2: tl.constexpr = BK // 2
    H: tl.constexpr = RH // 2
    if PAIR:
        nk = tl.cdiv(H, BK2)
    else:
        nk = tl.cdiv(RH, BK)
    ti = tile // nk
    tk = tile % nk
    oi = ti * BI + tl.arange(0, BI)
    q = tl.arange(0, BK)
    if PAIR:  # column q of the tile: chunk column a = tk BK2 + q mod BK2, + h in the second half
        ok = tk * BK2 + q + tl.where(q < BK2, 0, H - BK2)
        okv = (tk * BK2 + q % BK2) < H
    else:
        ok = tk * BK + q
        okv = ok < RH
    row0, c, i0, i1, k0, k1, xcol0 = _item(tab_ptr, sp // NS, ALIGN)
    mi = (oi >= i0) & (oi < i1)
    mk = okv & (ok >= k0) & (ok < k1)
    # an item that misses the tile (a piece's partial rows, a wrapped chunk's other side) runs no tokens
    hit = _meets(i0, i1, ti * BI, ti * BI + BI)
    if PAIR:
        a0 = tk * BK2
        a1 = tl.minimum(a0 + BK2, H)
        hit = hit & (_meets(k0, k1, a0, a1) | _meets(k0, k1, a0 + H, a1 + H))
    else:
        hit = hit & _meets(k0, k1, tk * BK, tk * BK + BK)
    acc = tl.zeros((BI, BK), dtype=ACC)
    if hit:  # TP: a multiple of BT
        acc = _dot_tokens(acc, g_ptr, x_ptr, sg, sx, T, (sp % NS) * TP, row0, oi, mi, xcol0, ok, mk, ACC, BT, TP // BT)
    m = (oi < RH)[:, None] & okv[None, :]
    base = part_ptr + sp * (1 if PAIR or not ROT else 2) * RH * RH + oi[:, None] * RH
    if ROT:
        if PAIR:  # dM[:, a] = acc[:, a] cos[a] - acc[:, a+h] sin[a+h], dM[:, a+h] = acc[:, a+h] cos[a+h]
            # + acc[:, a] sin[a] (s = +1 below h, -1 above)
            acc_a, acc_b = tl.split(tl.permute(tl.reshape(acc, (BI, 2, BK2)), (0, 2, 1)))  # no data movement
            ka = tk * BK2 + tl.arange(0, BK2)
            cs_a, sn_a = _cos_sin(cos_ptr, sin_ptr, c, ka, RH, ACC)
            cs_b, sn_b = _cos_sin(cos_ptr, sin_ptr, c, ka + H, RH, ACC)
            out = tl.join(acc_a * cs_a[None, :] - acc_b * sn_b[None, :], acc_b * cs_b[None, :] + acc_a * sn_a[None, :])
            tl.store(base + ok[None, :], tl.reshape(tl.permute(out, (0, 2, 1)), (BI, BK)), mask=m)
        else:  # dM[:, k] += acc[:, k] cos[k] (slot 0), dM[:, k^h] += s(k) acc[:, k] sin[k] (slot 1)
            cs, sn = _cos_sin(cos_ptr, sin_ptr, c, ok, RH, ACC)
            _store_rot(base, ok, m, acc * cs[None, :], acc * sn[None, :], RH, ACC)
    else:
        tl.store(base + ok[None, :], acc, mask=m)


@triton.jit
def _grad_kernel_v9(g_ptr, x_ptr, cos_ptr, sin_ptr, tab_ptr, part_ptr, T, sg, sx, n_units, NTB,
                    RH: tl.constexpr, ROT: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                    BI: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, TB: tl.constexpr, UPP: tl.constexpr):
    """The kernel before issue 15's change (`grad_impl` says where it is faster): program (tile, sp)
    runs units sp UPP .. sp UPP + UPP - 1 of the n_units (item, token block) units (unit u: item
    u // NTB, tokens [(u % NTB) TB, + TB)); each unit's product is scaled into a cos and (rotation)
    a sin accumulator, stored into partial sp after the last unit (slot 1: the sin part on k^h).
    Columns contiguous (no pairing)."""
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
        u = tl.minimum(sp * UPP + j, n_units - 1)
        row0, c, i0, i1, k0, k1, xcol0 = _item(tab_ptr, u // NTB, ALIGN)
        if (sp * UPP + j < n_units) & _meets(i0, i1, ti * BI, ti * BI + BI) & _meets(k0, k1, tk * BK, tk * BK + BK):
            mi = (oi >= i0) & (oi < i1)
            mk = (ok >= k0) & (ok < k1)
            acc = _dot_tokens(tl.zeros((BI, BK), dtype=ACC), g_ptr, x_ptr, sg, sx, T, (u % NTB) * TB, row0, oi, mi,
                              xcol0, ok, mk, ACC, BT, TB // BT)
            if ROT:
                cs, sn = _cos_sin(cos_ptr, sin_ptr, c, ok, RH, ACC)
                tot += acc * cs[None, :]
                tot2 += acc * sn[None, :]
            else:
                tot += acc
    m = (oi < RH)[:, None] & (ok < RH)[None, :]
    base = part_ptr + sp * (2 if ROT else 1) * RH * RH + oi[:, None] * RH
    if ROT:
        _store_rot(base, ok, m, tot, tot2, RH, ACC)
    else:
        tl.store(base + ok[None, :], tot, mask=m)


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


@functools.lru_cache(maxsize=None)
def _sms(device: str) -> int:
    """The GPU's SM count; 1 off the GPU (the interpreter: no token split for occupancy)."""
    d = torch.device(device)
    return torch.cuda.get_device_properties(d).multi_processor_count if d.type == "cuda" else 1


def token_splits(T: int, programs: int, sms: int, min_tokens: int = 1024) -> int:
    """How many token ranges (>= min_tokens each, or 1) each (item, tile) program is split into: the
    fewest that give >= 1.5 programs an SM. Fitted to `launch/bench_rotgrad.py` on an H200 at 8B (T =
    8,192, 132 SMs; results/perf/s4_call3/rotgrad.txt): q/k/v/o (52-64 programs) ran fastest at 4
    ranges (q 0.104 ms vs 0.145 at 2), gate/up (369) at 1 (0.192 vs 0.237 at 4), down (99) the same at
    2 and 4; more ranges cost fp32 partials written and summed."""
    want = -(-3 * sms // (2 * max(programs, 1)))
    return max(1, min(T // min_tokens, want))


def block_grad(g2: torch.Tensor, x2: torch.Tensor, rot, items: tuple, rh: int, dtype, cfg: dict | None = None):
    """dM [rh, rh] (in `dtype`) of one block adapter from the layer's output gradient g2 and input x2,
    by the kernel `grad_impl` picks for rh. `cfg` overrides grad_config's keys; IMPL ("v9" / "new")
    the kernel; for "new" TP (tokens a program; default from `token_splits`) and PAIR (paired
    rotation columns; default where h keeps the alignment), for "v9" TB and UPP."""
    cfg = cfg or {}
    tab, align = _table(items, rh, g2.device)
    T = g2.shape[0]
    n_items = tab.shape[0]
    rot_ = rot is not None
    impl = cfg.get("IMPL") or grad_impl(rh)
    assert impl in ("v9", "new"), impl
    # rotation pairs in one tile, unless h = rh/2 would cut the loads' alignment (odd h: 2-byte x
    # loads); cfg["PAIR"] forces either form (the tests run both); v9 never pairs
    pair = rot_ and impl == "new" and cfg.get("PAIR", math.gcd(align, rh // 2) == align)
    cfg = {**grad_config(rh, g2.element_size(), pair or not rot_, impl), **cfg}
    BT = cfg["BT"]
    if impl == "v9":
        tiles = triton.cdiv(rh, cfg["BI"]) * triton.cdiv(rh, cfg["BK"])
        TB = min(cfg["TB"], triton.next_power_of_2(max(T, BT)))
        ntb = triton.cdiv(T, TB)
        progs = triton.cdiv(n_items * ntb, cfg["UPP"])
        kernel, args, consts = _grad_kernel_v9, (n_items * ntb, ntb), dict(TB=TB, UPP=cfg["UPP"])
    else:
        if pair:
            tiles = triton.cdiv(rh, cfg["BI"]) * triton.cdiv(rh // 2, cfg["BK"] // 2)
        else:
            tiles = triton.cdiv(rh, cfg["BI"]) * triton.cdiv(rh, cfg["BK"])
        TP = cfg.get("TP")
        if TP is None:
            n = token_splits(T, tiles * n_items, _sms(str(g2.device)))
            TP = triton.cdiv(T, n)
        TP = max(BT, triton.cdiv(TP, BT) * BT)
        ns = max(1, triton.cdiv(T, TP))
        progs = n_items * ns
        kernel, args, consts = _grad_kernel, (ns,), dict(PAIR=pair, TP=TP)
    acc = torch.float64 if g2.dtype == torch.float64 else torch.float32
    part = torch.empty(progs, 2 if rot_ and not pair else 1, rh, rh, device=g2.device, dtype=acc)
    cos, sin = rot if rot_ else (part, part)
    opts = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and g2.is_cuda else {}
    kernel[(tiles, progs)](g2, x2, cos, sin, tab, part, T, g2.stride(0), x2.stride(0), *args, RH=rh, ROT=rot_,
                           ALIGN=align, ACC=_acc(g2.dtype), BI=cfg["BI"], BK=cfg["BK"], BT=BT,
                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **consts, **opts)
    return part.sum((0, 1)).to(dtype)
