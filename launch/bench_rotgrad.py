"""Time MoRA's block gradient kernels (`mora_dist.kernels.blockdiag.block_grad`, issue 15) at the
Llama-3-8B (or, with --size 1b, the 1.1B) projection shapes on one GPU: both implementations (v9, new) and the one `grad_impl`
picks per shape (dispatch), side by side:

    python3 launch/bench_rotgrad.py                      # rotation, T = 8192 tokens (mbs 2 x seq 4096)
    python3 launch/bench_rotgrad.py --decouple --reps 50
    python3 launch/bench_rotgrad.py --size 1b            # the 1.1B shapes (T = 8192: mbs 4 x seq 2048)
    python3 launch/bench_rotgrad.py --cfg '{"IMPL": "new", "num_stages": 4, "maxnreg": null}' --cfg '{"IMPL": "new", "TP": 2048}'
    python3 launch/bench_rotgrad.py --tilesum            # MoRA sharing's block sums: kernel vs torch
    python3 launch/bench_rotgrad.py --sharing            # MoRA sharing's build and parameter gradients a layer

Each row: one adapter's dM from bf16 g [T, n_out] and x [T, d_in] as the merged path calls it
(items from the fused layer's row layout: q/k/v one piece per query group of linear_qkv, gate/up
in linear_fc1), partial sums included; mean of --reps calls between CUDA events after warm-up.
`pick`: the implementation the dispatch uses; `library`: `blockdiag.block_grads` as the merged path calls
it (gate / up: g folded over their row tiles first, `blockdiag.folded`, then the dispatched kernel). Each --cfg (JSON overriding `grad_config`'s keys,
plus IMPL, TP = tokens a program and PAIR for new, TB / UPP for v9) adds a column with those
settings. `err` columns: max |dM - ref| / max |ref| against an fp32 reference summed per item with
torch (the float64 checks are tests/test_adapters.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mora_dist.adapters import AdapterConfig, Shard, blockdiag, build_adapter, mora_rank, tiles  # noqa: E402
from mora_dist.kernels import blockdiag as kern  # noqa: E402
from mora_dist.utils.gpu_time import cuda_ms as timed  # noqa: E402


# --- shapes ------------------------------------------------------------------------------------
SHAPES = {"8b": dict(hidden=4096, ffn=14336, heads=32, groups=8),  # Llama-3-8B
          "1b": dict(hidden=2048, ffn=5632, heads=32, groups=4)}   # the 1.1B (TinyLlama) shape of bench.py


def projections(hidden=4096, ffn=14336, heads=32, groups=8, r=8):
    """(name, d_in, d_out, layer rows n_out, segments) of a layer's adapters as the model places
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="8b", help="layer shape (1b: grad_impl's rule was fitted on 8b)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--decouple", action="store_true", help="decouple (R_c = I) instead of rotation")
    ap.add_argument("--cfg", action="append", default=[], help="JSON overrides of grad_config: an extra column")
    ap.add_argument("--tilesum", action="store_true", help="time MoRA sharing's block sums (kernel vs torch) instead")
    ap.add_argument("--sharing", action="store_true", help="time MoRA sharing's weight build and M gradients a layer instead")
    args = ap.parse_args()
    if args.tilesum:
        return tilesum_table(args)
    if args.sharing:
        return sharing_table(args)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.size}, T = {args.tokens}, {'decouple' if args.decouple else 'rotation'}, r = {args.r}")
    gen = torch.Generator(device=dev).manual_seed(0)
    variants = [("v9", {"IMPL": "v9"}), ("new", {"IMPL": "new"}), ("dispatch", None), ("library", "lib")] + \
        [(f"cfg{i}", json.loads(c)) for i, c in enumerate(args.cfg, 1)]
    head = ["proj", "rh", "items", "GFLOP", "pick"] + [f"{n} ms" for n, _ in variants] + ["x v9"] + \
        [f"{n} TF/s" for n, _ in variants] + [f"{n} err" for n, _ in variants]
    rows, tot = [], [0.0] * len(variants)
    x_cache = {}
    for name, d_in, d_out, n_out, segs in projections(r=args.r, **SHAPES[args.size]):
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
        M = torch.zeros(rh, rh, device=dev)
        fns = [(lambda: blockdiag.block_grads(g, x, [(geo, segs)], [M], [rot], [True])[0]) if cfg == "lib" else
               (lambda cfg=cfg: kern.block_grad(g, x, rot, items, rh, torch.float32, cfg)) for _, cfg in variants]
        ms = [timed(f, args.reps) for f in fns]
        errs = [((f() - ref).abs().max() / ref.abs().max()).item() for f in fns]
        tot = [a + b for a, b in zip(tot, ms)]
        rows.append([name, rh, len(items), f"{flops:.1f}", kern.grad_impl(rh)] + [f"{t:.3f}" for t in ms] +
                    [f"{ms[0] / ms[1]:.2f}"] + [f"{flops / t:.0f}" for t in ms] + [f"{e:.1e}" for e in errs])
        del g
    rows.append(["layer", "", "", "", ""] + [f"{t:.3f}" for t in tot] + [f"{tot[0] / tot[1]:.2f}"] +
                [""] * len(tot) * 2)
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(v).rjust(n) for v, n in zip(r, w)))


def tilesum_table(args):
    """ms of MoRA sharing's block sums a layer and micro-batch: g Q (decompress, each projection's rows;
    q/k/v by query group) and x P^T (strided compress, wrapping), the kernel with 1 / 2 / 4 column blocks a
    loop step (`kernels/tilesum.UNROLL`) vs torch (MORA_DIST_NO_KERNEL=tilesum); the fold of the block
    types' gate / up g (L = 4,224 at 8B) too."""
    from mora_dist.kernels import tilesum

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    unrolls = (1, 2, 4)
    user_off = os.environ.get("MORA_DIST_NO_KERNEL")  # restored after the table (set here per column)
    rows, tot = [], [0.0] * (len(unrolls) + 1)
    for name, d_in, d_out, n_out, segs in projections(r=args.r, **SHAPES[args.size]):
        n = mora_rank(d_in, d_out, args.r)
        g = (torch.randn(args.tokens, n_out, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
        x = torch.randn(args.tokens, d_in, device=dev, generator=gen).to(torch.bfloat16)
        cols = [(d0, f1 - f0) for f0, f1, d0 in segs]
        cases = [(f"{name} g Q", lambda: tiles.tile_sum_groups(g, cols, n, n), sum(w for _, w in cols)),
                 (f"{name} x P^T", lambda: tiles.tile_sum(x, n, n, wrap=True), d_in)]
        if name in ("gate", "up"):  # the block types' fold (rh 384 at 8B: L = 11 * 384)
            Lf = -(-d_in // (n - n % 2)) * (n - n % 2)
            d0 = segs[0][2]
            cases.append((f"{name} fold", lambda: tiles.tile_sum(g[:, d0:d0 + d_out], Lf, Lf), d_out))
        for label, f, ncols in cases:
            ms = []
            for u in unrolls:
                tilesum.UNROLL = u
                ms.append(timed(f, args.reps))
            os.environ["MORA_DIST_NO_KERNEL"] = "tilesum"
            ms.append(timed(f, args.reps))
            ref = f().float()
            os.environ["MORA_DIST_NO_KERNEL"] = ""
            err = ((f().float() - ref).abs().max() / ref.abs().max()).item()
            gb = args.tokens * ncols * 2 / 1e9  # bytes read
            tot = [t + m for t, m in zip(tot, ms)]
            best = min(ms[:-1])
            rows.append([label, n] + [f"{m:.3f}" for m in ms] + [f"{gb / best:.2f}", f"{err:.1e}"])
    if user_off is None:
        os.environ.pop("MORA_DIST_NO_KERNEL")
    else:
        os.environ["MORA_DIST_NO_KERNEL"] = user_off
    tilesum.UNROLL = None
    rows.append(["layer", ""] + [f"{t:.3f}" for t in tot] + ["", ""])
    head = ["sum", "n"] + [f"U={u} ms" for u in unrolls] + ["torch ms", "best TB/s", "err"]
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(v).rjust(n) for v, n in zip(r, w)))


def sharing_layers(size: str, r: int, dev):
    """(layer, n_out, d_in, merged.Plan, tensors) of each fused layer with MoRA sharing on its projections
    (bf16 factors, M random), laid out as parallel/wrappers.py lays them out."""
    from mora_dist.parallel import merged

    layers: dict = {}
    for name, d_in, d_out, n_out, segs in projections(r=r, **SHAPES[size]):
        layer = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "fc1", "up": "fc1"}.get(name, name)
        a = build_adapter(AdapterConfig("mora", r=r, mora_type="sharing"), Shard(d_in, d_out)).to(dev)
        with torch.no_grad():
            a.M.normal_(0, 0.02)
        fac = a.factors(torch.bfloat16)
        pos = torch.cat([torch.arange(d0, d0 + f1 - f0) for f0, f1, d0 in segs]).to(dev)
        if len(segs) == 1:
            rows = merged.RowRange(segs[0][2], segs[0][2] + d_out)
        else:
            w = segs[0][1] - segs[0][0]
            rows = merged.RowBlocks(len(segs), segs[1][2] - segs[0][2], segs[0][2], w, pos)
        layers.setdefault(layer, (n_out, d_in, []))[2].append((rows, fac))
    for layer, (n_out, d_in, parts) in layers.items():
        keys, Ps, tiles_, terms, pairs = {}, [], [], [], []
        for rows, fac in parts:
            if fac.p_key not in keys:
                keys[fac.p_key] = len(Ps)
                Ps.append(fac.P)
                tiles_.append(fac.p_tile)
            terms.append(merged.Term(rows, keys[fac.p_key], None, fac.q_tile))
            pairs += [fac.mid, fac.Q]
        yield layer, n_out, d_in, merged.Plan(len(Ps), tuple(terms), (), tuple(tiles_)), [*Ps, *pairs]


@torch.no_grad()
def sharing_table(args):
    """ms a layer, replayed from a CUDA graph (what a graphed step pays): MoRA sharing's weight build
    (`merged.build_weight` into a step buffer: `kernels/build.tile_add` vs the product with the tile maps,
    MORA_DIST_NO_KERNEL=tilebuild) and its M gradients from one micro-batch's g and x (`merged._factor_grads`:
    block sums of g and x, q/k/v's g one launch for all query groups), with the bytes each moves."""
    from mora_dist.parallel import merged
    from mora_dist.utils.gpu_time import cuda_graph_ms

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    user_off = os.environ.get("MORA_DIST_NO_KERNEL")
    head = ["layer", "n_out", "d_in", "build ms", "product ms", "build TB/s", "grads ms", "grads TB/s", "build err"]
    rows, tot = [], [0.0, 0.0, 0.0]
    for layer, n_out, d_in, plan, ts in sharing_layers(args.size, args.r, dev):
        W0 = (torch.randn(n_out, d_in, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        buf = torch.empty_like(W0)
        ms, outs = [], []
        for off in ("", "tilebuild"):
            os.environ["MORA_DIST_NO_KERNEL"] = off
            ms.append(cuda_graph_ms(lambda: merged.build_weight(W0, plan, ts, out=buf), args.reps))
            outs.append(merged.build_weight(W0, plan, ts).float())
        os.environ["MORA_DIST_NO_KERNEL"] = ""
        err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
        g = (torch.randn(args.tokens, n_out, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
        x = torch.randn(args.tokens, d_in, device=dev, generator=gen).to(torch.bfloat16)
        need = [False] * plan.n_p + [v for _ in plan.terms for v in (True, False)]
        gms = cuda_graph_ms(lambda: merged._factor_grads(g, x, plan, ts, need), args.reps)
        wb = 2 * W0.numel() * 2 / 1e12
        gb = (g.numel() + x.numel() * plan.n_p) * 2 / 1e12  # g once, x once a distinct compress
        tot = [tot[0] + ms[0], tot[1] + ms[1], tot[2] + gms]
        rows.append([layer, n_out, d_in, f"{ms[0]:.3f}", f"{ms[1]:.3f}", f"{wb / ms[0] * 1e3:.2f}", f"{gms:.3f}",
                     f"{gb / gms * 1e3:.2f}", f"{err:.1e}"])
        del g, x, W0, buf
    if user_off is None:
        os.environ.pop("MORA_DIST_NO_KERNEL")
    else:
        os.environ["MORA_DIST_NO_KERNEL"] = user_off
    rows.append(["layer", "", "", f"{tot[0]:.3f}", f"{tot[1]:.3f}", "", f"{tot[2]:.3f}", "", ""])
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(v).rjust(n) for v, n in zip(r, w)))


if __name__ == "__main__":
    main()
