"""SwiGLU fused with the factor adapters' skinny products of the MLP (issue 15). Called by
`models/kernels.swiglu_back_dispatch` (the g-only backward, in place of megatron's `swiglu_back`)
and by the opt-in fused MLP (`parallel/mlp.py`); neither timed on a GPU yet.

Why: on the merged-weight path (parallel/merged.py) a factor adapter's whole cost is the skinny
GEMMs of `merged._factor_grads`, and they are bandwidth-bound: each streams its big operand once
at ~4 TB/s for a few FLOPs a byte. The MLP's biggest such operands are made by SwiGLU itself:
linear_fc1's output gradient g = [g_gate | g_up] [T, 2F] (written by SwiGLU's backward, then read
twice: E = g_i^T H and g_i Q for the gate and up adapters) and linear_fc2's input act = silu(y1) y2
[T, F] (written by SwiGLU's forward, then read by H = act P^T in the forward and dP = Z^T act in
the backward). A standalone kernel has to read them again and loses to cuBLAS, which already
streams them near bandwidth (docs/performance.md); here the products are taken from the values
in registers while SwiGLU computes them, so those reads disappear: 2 T 2F + 2 T F elements,
1.41 GB per layer and micro-batch at the Llama-3-8B shape (T = 8192, F = 14336, bf16).

One kernel serves three calls (constexpr switches): the forward (act and H = act Pd^T), the
backward (megatron's fused swiglu backward, the gate/up adapters' E and Z, and the down adapter's
dP from act recomputed from y, which the backward reads anyway) and dP alone.

Numerics: the elementwise math is done in fp32 (fp64 for fp64 inputs) and rounded once to y's
dtype, as megatron's torch.compile'd `swiglu_back` is. The products use the rounded values, i.e.
exactly the g / act that the unfused path writes and its GEMMs read, with bf16 tensor-core dots
and fp32 accumulation, as cuBLAS does. Triton's interpreter (TRITON_INTERPRET=1, the CPU tests)
computes bf16 dots wrongly (triton 3.6), so under it the bf16-rounded operands go to an fp32 dot
(the same products; only the summation order differs).

Tiling and reductions: a program owns a tile of TP tokens x FP columns of F and walks it in
BT x BF sub-tiles, columns outer and tokens inner. E-type products (reduced over tokens: H^T g,
Z^T act, i.e. E^T and dP) accumulate in registers over the token loop and are stored once per
column sub-tile into an fp32 partial buffer with one slot per token range; Z-type products
(reduced over columns: g Q, act P^T) go to a buffer with one slot per column range,
read-added-written by the one program that owns those rows (a barrier orders its store and the
next column sub-tile's load). The slots are summed after by torch: deterministic, run to run and for any grid, which
atomics (tl.atomic_add into one fp32 output) would not be; the partials are small against what
the fusion removes (8B shape, default tiling: 8 token slots x 3 E products x F x r and 28 column
slots x 2 Z products x T x r fp32 at r = 8: 26 MB written and read back once by the sum, ~4% of
the 1.41 GB removed; larger TP / FP shrink it, at fewer programs). Offsets are int32: T x 2F < 2^31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mora_dist.kernels import interpreted

_INTERPRET = interpreted()
# Default tiling, untimed (launch/bench_swiglu.py sweeps others): TP x FP = 1024 x 512 gives 8 x 28 =
# 224 programs at the 8B shape. Sub-tiles of 32 x 64 with 8 warps: the backward compiles to 214
# registers without spills for sm_90a (64 x 128 spills: launch/kernel_aot.py), one program a SM;
# maxnreg (None: ptxas' choice) trades spills for a second one. Both products take the tile as
# their B operand (E^T = H^T g, Z^T = Q^T g^T, accumulators [R, .]): with g as the A operand
# (E = g^T H, Z = g Q) the backward needed 255 registers and 50% more instructions.
CONFIG = dict(BT=32, BF=64, TP=1024, FP=512, num_warps=8, num_stages=2, maxnreg=None)


@triton.jit
def _round(x, DT: tl.constexpr, BITS: tl.constexpr):
    """x rounded to DT, to nearest even; BITS: by integer ops, fp32 to bf16 (the interpreter's cast
    truncates, triton 3.6; NaN / inf not handled, as the tests need none)."""
    if BITS:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _e_acc(acc, tile, h_ptr, r, ot, mt, R: tl.constexpr, DOT: tl.constexpr):
    """acc [R, BF] += H[ot, :r]^T [R, BT] @ tile [BT, BF] (H [T, r] contiguous; zero past r and T)."""
    ok = tl.arange(0, R)
    h = tl.load(h_ptr + ok[:, None] + ot[None, :] * r, mask=(ok < r)[:, None] & mt[None, :], other=0.0)
    return tl.dot(h.to(DOT), tile, acc, out_dtype=acc.dtype)


@triton.jit
def _e_store(acc, e_ptr, r, of, mf, s_f, s_r, R: tl.constexpr):
    ok = tl.arange(0, R)
    tl.store(e_ptr + ok[:, None] * s_r + of[None, :] * s_f, acc, mask=(ok < r)[:, None] & mf[None, :])


@triton.jit
def _z_add(tile, q_ptr, z_ptr, r, of, mf, ot, mt, fi, R: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr):
    """Z[ot, :r] (this program's slot, [T, r]) += (Q[of, :r]^T [R, BF] @ tile^T [BF, BT])^T (Q [F, r]
    contiguous); the first column sub-tile (fi = 0) writes without reading."""
    ok = tl.arange(0, R)
    mr = (ok < r)[:, None]
    q = tl.load(q_ptr + ok[:, None] + of[None, :] * r, mask=mr & mf[None, :], other=0.0)
    ptrs = z_ptr + ok[:, None] + ot[None, :] * r
    m = mr & mt[None, :]
    z = tl.load(ptrs, mask=m & (fi > 0), other=0.0)
    tl.store(ptrs, tl.dot(q.to(DOT), tl.trans(tile), z, out_dtype=ACC), mask=m)


@triton.jit
def _swiglu_kernel(y_ptr, d_ptr, o_ptr, ha_ptr, hb_ptr, hc_ptr, qa_ptr, qb_ptr, qc_ptr,
                   ea_ptr, eb_ptr, ec_ptr, za_ptr, zb_ptr, zc_ptr,
                   T, F, s_y, s_d, s_o, ra, rb, rc, sc_f, sc_r,
                   BWD: tl.constexpr, STORE_ACT: tl.constexpr, NEED_ACT: tl.constexpr,
                   EA: tl.constexpr, EB: tl.constexpr, EC: tl.constexpr,
                   ZA: tl.constexpr, ZB: tl.constexpr, ZC: tl.constexpr,
                   ACC: tl.constexpr, DOT: tl.constexpr, RND: tl.constexpr, R: tl.constexpr,
                   BT: tl.constexpr, BF: tl.constexpr, TP: tl.constexpr, FP: tl.constexpr):
    """Sources: A = g_gate, B = g_up (BWD: from d = dL/d act and y), C = act. E-type products
    (A: H = ha, B: hb, C: hc, reduced over tokens) go to e*_ptr [n_t, F, r] (C: strides sc_f, sc_r,
    i.e. dP [n_t, r, F]), Z-type (Q = qa, qb, qc) to z*_ptr [n_f, T, r]."""
    pid = tl.program_id(0)
    n_f = tl.cdiv(F, FP)
    pt, pf = pid // n_f, pid % n_f
    t0, f0 = pt * TP, pf * FP
    # compile-time trip counts (the interpreter takes no loop bound derived from program_id): in a
    # last, short range the sub-tiles past T or F run fully masked (none at the 8B shape)
    for fi in range(FP // BF):
        of = f0 + fi * BF + tl.arange(0, BF)
        mf = of < F
        ea = tl.zeros((R, BF), dtype=ACC)
        eb = tl.zeros((R, BF), dtype=ACC)
        ec = tl.zeros((R, BF), dtype=ACC)
        for ti in range(TP // BT):
            ot = t0 + ti * BT + tl.arange(0, BT)
            mt = ot < T
            m = mt[:, None] & mf[None, :]
            yp = y_ptr + ot[:, None] * s_y + of[None, :]
            y1 = tl.load(yp, mask=m, other=0.0).to(ACC)
            y2 = tl.load(yp + F, mask=m, other=0.0).to(ACC)
            s = 1.0 / (1.0 + tl.exp(-y1))
            silu = y1 * s
            if NEED_ACT:
                act = _round(silu * y2, y_ptr.dtype.element_ty, RND)
                if STORE_ACT:
                    tl.store(o_ptr + ot[:, None] * s_o + of[None, :], act, mask=m)
                act = act.to(DOT)
                if EC:
                    ec = _e_acc(ec, act, hc_ptr, rc, ot, mt, R, DOT)
                if ZC:
                    _z_add(act, qc_ptr, zc_ptr + pf * T * rc, rc, of, mf, ot, mt, fi, R, DOT, ACC)
            if BWD:
                d = tl.load(d_ptr + ot[:, None] * s_d + of[None, :], mask=m, other=0.0).to(ACC)
                op = o_ptr + ot[:, None] * s_o + of[None, :]
                ga = _round(d * s * (1.0 + y1 * (1.0 - s)) * y2, o_ptr.dtype.element_ty, RND)
                gb = _round(d * silu, o_ptr.dtype.element_ty, RND)
                tl.store(op, ga, mask=m)
                tl.store(op + F, gb, mask=m)
                ga, gb = ga.to(DOT), gb.to(DOT)
                if EA:
                    ea = _e_acc(ea, ga, ha_ptr, ra, ot, mt, R, DOT)
                if EB:
                    eb = _e_acc(eb, gb, hb_ptr, rb, ot, mt, R, DOT)
                if ZA:
                    _z_add(ga, qa_ptr, za_ptr + pf * T * ra, ra, of, mf, ot, mt, fi, R, DOT, ACC)
                if ZB:
                    _z_add(gb, qb_ptr, zb_ptr + pf * T * rb, rb, of, mf, ot, mt, fi, R, DOT, ACC)
        if EA:
            _e_store(ea, ea_ptr + pt * F * ra, ra, of, mf, ra, 1, R)
        if EB:
            _e_store(eb, eb_ptr + pt * F * rb, rb, of, mf, rb, 1, R)
        if EC:
            _e_store(ec, ec_ptr + pt * F * rc, rc, of, mf, sc_f, sc_r, R)
        if ZA or ZB or ZC:
            tl.debug_barrier()  # the Z slots' stores before the next column sub-tile loads them


def _run(y, dact, out, E, Z, cfg=None):
    """E / Z: {source: (operand, rank)} for sources 'a' (g_gate), 'b' (g_up), 'c' (act); E operands
    [T, r], Z operands [F, r]. Returns {('e'|'z', source): fp32 (fp64) result}; E of 'c' as [r, F]."""
    cfg = {**CONFIG, **(cfg or {})}
    T, F = y.shape[0], y.shape[1] // 2
    assert y.dim() == 2 and y.shape[1] == 2 * F and y.stride(1) == 1
    assert dact is None or (dact.shape == (T, F) and dact.stride(1) == 1)
    fp64 = y.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    dot = tl.float64 if fp64 else (tl.float32 if _INTERPRET or y.dtype == torch.float32 else
                                   {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[y.dtype])
    BT, BF, TP, FP = cfg["BT"], cfg["BF"], cfg["TP"], cfg["FP"]
    assert TP % BT == 0 and FP % BF == 0
    n_t, n_f = triton.cdiv(T, TP), triton.cdiv(F, FP)
    ranks = [op.shape[1] for op in (*E.values(), *Z.values())]
    R = max(16, triton.next_power_of_2(max(ranks, default=1)))
    ops, bufs, rk = {}, {}, {}
    for kind, prods, n, rows in (("e", E, n_t, F), ("z", Z, n_f, T)):
        for src, op in prods.items():
            ops[kind, src] = op.to(y.dtype).contiguous()
            rk[src] = op.shape[1]
            shape = (n, op.shape[1], rows) if (kind, src) == ("e", "c") else (n, rows, op.shape[1])
            bufs[kind, src] = torch.empty(shape, dtype=acc, device=y.device)
    fwd = dact is None and out is not None  # the forward: act stored
    opts = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and y.is_cuda else {}
    get = lambda d, k: d.get(k, y)  # noqa: E731  (a dummy pointer where a product is off)
    _swiglu_kernel[(n_t * n_f,)](
        y, y if dact is None else dact, y if out is None else out,
        *(get(ops, ("e", s)) for s in "abc"), *(get(ops, ("z", s)) for s in "abc"),
        *(get(bufs, ("e", s)) for s in "abc"), *(get(bufs, ("z", s)) for s in "abc"),
        T, F, y.stride(0), 0 if dact is None else dact.stride(0), 0 if out is None else out.stride(0),
        rk.get("a", 1), rk.get("b", 1), rk.get("c", 1), 1, F,
        BWD=dact is not None, STORE_ACT=fwd, NEED_ACT=fwd or "c" in E or "c" in Z,
        EA="a" in E, EB="b" in E, EC="c" in E, ZA="a" in Z, ZB="b" in Z, ZC="c" in Z,
        ACC=tl.float64 if fp64 else tl.float32, DOT=dot, RND=_INTERPRET and y.dtype == torch.bfloat16, R=R,
        BT=BT, BF=BF, TP=TP, FP=FP,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **opts)
    return {k: b[0] if b.shape[0] == 1 else b.sum(0) for k, b in bufs.items()}


def swiglu_forward_lora(y: torch.Tensor, Pd: torch.Tensor | None = None, cfg: dict | None = None):
    """act = silu(y1) * y2 [T, F] in y's dtype (y = [y1 | y2] [T, 2F], linear_fc1's output) and the
    down adapter's H = act @ Pd^T [T, r] in fp32 (None without Pd [r, F])."""
    T, F = y.shape[0], y.shape[1] // 2
    act = torch.empty(T, F, dtype=y.dtype, device=y.device)
    res = _run(y, None, act, {}, {} if Pd is None else {"c": Pd.t()}, cfg)
    return act, res.get(("z", "c"))


def swiglu_backward_lora(y: torch.Tensor, dact: torch.Tensor, Hg=None, Qg=None, Hu=None, Qu=None, Zd=None,
                         cfg: dict | None = None):
    """megatron's swiglu backward, g = [g_gate | g_up] [T, 2F] in y's dtype from dact [T, F] and
    y [T, 2F], with the skinny products taken from it in registers, fp32, None where an operand
    is None:  E_gate = g_gate^T Hg, E_up = g_up^T Hu [F, r]; Zg = g_gate Qg, Zu = g_up Qu [T, r];
    dPd = Zd^T act [r, F] (act recomputed from y: the down adapter's dP without reading act).
    Returns (g, E_gate, E_up, Zg, Zu, dPd)."""
    T, F = y.shape[0], y.shape[1] // 2
    g = torch.empty(T, 2 * F, dtype=y.dtype, device=y.device)
    E = {s: op for s, op in (("a", Hg), ("b", Hu), ("c", Zd)) if op is not None}
    Z = {s: op for s, op in (("a", Qg), ("b", Qu)) if op is not None}
    res = _run(y, dact, g, E, Z, cfg)
    return (g, res.get(("e", "a")), res.get(("e", "b")), res.get(("z", "a")), res.get(("z", "b")),
            res.get(("e", "c")))


def swiglu_down_dp(y: torch.Tensor, Zd: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """dPd = Zd^T act [r, F] fp32 with act recomputed from y (Zd [T, r]). Alone it reads y (2F a
    token) instead of act (F a token): a loss; the win is `swiglu_backward_lora(..., Zd=Zd)`,
    which reads y anyway. Kept for tests and for a backward that cannot take Zd."""
    return _run(y, None, None, {"c": Zd}, {}, cfg)["e", "c"]
