"""Time MoRA's block gradient kernel (`mora_dist.kernels.blockdiag.block_grad`, issue 15) at the
Llama-3-8B projection shapes, against the v9 kernel it replaced (a copy below), on one GPU:

    python3 launch/bench_rotgrad.py                      # rotation, T = 8192 tokens (mbs 2 x seq 4096)
    python3 launch/bench_rotgrad.py --decouple --reps 50
    python3 launch/bench_rotgrad.py --cfg '{"num_stages": 4, "maxnreg": null}' --cfg '{"TP": 2048}'

Each row: one adapter's dM from bf16 g [T, n_out] and x [T, d_in] as the merged path calls it
(items from the fused layer's row layout: q/k/v one piece per query group of linear_qkv, gate/up
in linear_fc1), partial sums included; mean of --reps calls between CUDA events after warm-up.
Each --cfg (JSON overriding `grad_config`'s keys, plus TP = tokens a program and PAIR) adds a
column of the new kernel with those settings. `err` columns: max |dM - ref| / max |ref| against an fp32
reference summed per item with torch (the float64 checks are tests/test_adapters.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mora_dist.adapters import AdapterConfig, Shard, blockdiag, build_adapter, mora_rank  # noqa: E402
from mora_dist.kernels import blockdiag as kern  # noqa: E402
from mora_dist.kernels.blockdiag import _acc, _cos_sin, _item, _partner, _table  # noqa: E402


# --- the v9 kernel (main before issue 15's change), kept here for the comparison only --------
@triton.jit
def _grad_kernel_v9(g_ptr, x_ptr, cos_ptr, sin_ptr, tab_ptr, part_ptr, T, sg, sx, n_units, NTB,
                    RH: tl.constexpr, ROT: tl.constexpr, NSLOT: tl.constexpr, ALIGN: tl.constexpr,
                    ACC: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, TB: tl.constexpr,
                    UPP: tl.constexpr):
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
        if (u < n_units) & (lo_i < hi_i) & (lo_k < hi_k):
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
    if ROT:
        kp, sgn = _partner(ok, RH, ACC)
        tl.store(base + RH * RH + kp[None, :], tot2 * sgn[None, :], mask=m)


def block_grad_v9(g2, x2, rot, items, rh, dtype):
    if rh <= 160:
        cfg = dict(BI=64, BK=64, BT=64, TB=1024, UPP=4, num_warps=4, num_stages=3)
    else:
        cfg = dict(BI=128, BK=128, BT=64, TB=2048, UPP=2, num_warps=8, num_stages=4 if g2.element_size() <= 2 else 2)
    tab, align = _table(items, rh, g2.device)
    T = g2.shape[0]
    TB = min(cfg["TB"], triton.next_power_of_2(max(T, cfg["BT"])))
    ntb = triton.cdiv(T, TB)
    n_units = tab.shape[0] * ntb
    split = triton.cdiv(n_units, cfg["UPP"])
    nslot = 2 if rot is not None else 1
    part = torch.empty(split, nslot, rh, rh, device=g2.device, dtype=torch.float32)
    cos, sin = rot if rot is not None else (part, part)
    grid = (triton.cdiv(rh, cfg["BI"]) * triton.cdiv(rh, cfg["BK"]), split)
    _grad_kernel_v9[grid](g2, x2, cos, sin, tab, part, T, g2.stride(0), x2.stride(0), n_units, ntb, RH=rh,
                          ROT=rot is not None, NSLOT=nslot, ALIGN=align, ACC=_acc(g2.dtype), BI=cfg["BI"],
                          BK=cfg["BK"], BT=cfg["BT"], TB=TB, UPP=cfg["UPP"], num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
    return part.sum((0, 1)).to(dtype)


# --- shapes ------------------------------------------------------------------------------------
def projections(hidden=4096, ffn=14336, heads=32, groups=8, r=8):
    """(name, d_in, d_out, layer rows n_out, segments) of the 8B layer's adapters as the model places
    them: linear_qkv holds per query group [q rows; k rows; v rows], linear_fc1 [gate; up]."""
    hd = hidden // heads
    qw, kw = hidden // groups, hd  # q / k rows a group
    stride = qw + 2 * kw
    qkv = groups * stride
    yield "q", hidden, hidden, qkv, tuple((g * qw, (g + 1) * qw, g * stride) for g in range(groups))
    yield "k", hidden, groups * kw, qkv, tuple((g * kw, (g + 1) * kw, g * stride + qw) for g in range(groups))
    yield "v", hidden, groups * kw, qkv, tuple((g * kw, (g + 1) * kw, g * stride + qw + kw) for g in range(groups))
    yield "o", hidden, hidden, hidden, ((0, hidden, 0),)
    yield "gate", hidden, ffn, 2 * ffn, ((0, ffn, 0),)
    yield "up", hidden, ffn, 2 * ffn, ((0, ffn, ffn),)
    yield "down", ffn, hidden, hidden, ((0, hidden, 0),)


def reference(g, x, rot, items, rh, n_used):
    """fp32 dM: dW_c summed per item with torch, then the adjoint of W_c = M R_c."""
    dWc = torch.zeros(n_used, rh, rh, device=g.device)
    for row0, c, i0, i1, k0, k1, xcol0 in items:
        dWc[c, i0:i1, k0:k1] += g[:, row0 + i0:row0 + i1].float().t() @ x[:, xcol0 + k0:xcol0 + k1].float()
    return blockdiag.chunk_mats_grad(dWc, rot)


def timed(fn, reps, warmup=3):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--decouple", action="store_true", help="decouple (R_c = I) instead of rotation")
    ap.add_argument("--cfg", action="append", default=[], help="JSON overrides of grad_config: an extra column")
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"T = {args.tokens}, {'decouple' if args.decouple else 'rotation'}, r = {args.r}")
    gen = torch.Generator(device=dev).manual_seed(0)
    variants = [("new", None)] + [(f"cfg{i}", json.loads(c)) for i, c in enumerate(args.cfg, 1)]
    head = ["proj", "rh", "items", "GFLOP", "v9 ms"] + [f"{n} ms" for n, _ in variants] + ["x v9", "v9 TF/s"] + \
        [f"{n} TF/s" for n, _ in variants] + ["v9 err"] + [f"{n} err" for n, _ in variants]
    rows, tot = [], [0.0] * (1 + len(variants))
    x_cache = {}
    for name, d_in, d_out, n_out, segs in projections(r=args.r):
        rh = mora_rank(d_in, d_out, args.r)
        rh -= rh % 2
        ad = build_adapter(AdapterConfig("mora", r=args.r, mora_type="decouple" if args.decouple else "rotation"),
                           Shard(d_in, d_out), rh=rh)
        geo, _, rot = ad.block_operator()
        rot = None if rot is None else tuple(t.to(dev) for t in rot)
        items = blockdiag.items(geo, segs)
        if d_in not in x_cache:
            x_cache[d_in] = torch.randn(args.tokens, d_in, device=dev, generator=gen).to(torch.bfloat16)
        x = x_cache[d_in]
        g = (torch.randn(args.tokens, n_out, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
        ref = reference(g, x, rot, items, rh, geo.n_used)
        flops = 2 * args.tokens * sum((i1 - i0) * (k1 - k0) for _, _, i0, i1, k0, k1, _ in items) / 1e9
        fns = [lambda: block_grad_v9(g, x, rot, items, rh, torch.float32)]
        for _, cfg in variants:
            fns.append(lambda cfg=cfg: kern.block_grad(g, x, rot, items, rh, torch.float32, cfg))
        ms = [timed(f, args.reps) for f in fns]
        errs = [((f() - ref).abs().max() / ref.abs().max()).item() for f in fns]
        tot = [a + b for a, b in zip(tot, ms)]
        rows.append([name, rh, len(items), f"{flops:.1f}"] + [f"{t:.3f}" for t in ms] + [f"{ms[0] / ms[1]:.2f}"] +
                    [f"{flops / t:.0f}" for t in ms] + [f"{e:.1e}" for e in errs])
        del g
    rows.append(["layer", "", "", ""] + [f"{t:.3f}" for t in tot] + [f"{tot[0] / tot[1]:.2f}"] + [""] * len(tot) * 2)
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(v).rjust(n) for v, n in zip(r, w)))


if __name__ == "__main__":
    main()
