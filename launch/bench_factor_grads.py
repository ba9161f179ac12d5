"""Time LoRA's parameter gradients in the merged path (`merged._factor_grads`, issue 15) per fused layer
at the Llama-3-8B (or --size 1b) shape on one GPU: g Q and g^T H as two cuBLAS GEMMs each streaming g
(MORA_DIST_NO_KERNEL=dualmm) vs one pass over g (`kernels/dualmm.py`), and that kernel alone at several
tile configs against the GEMM pair:

    python3 launch/bench_factor_grads.py                 # T = 8192 tokens (mbs 2 x seq 4096), r = 8
    python3 launch/bench_factor_grads.py --size 1b --reps 50

Layers hold the adapters as the model does: linear_qkv three terms interleaved per query group, linear_fc1
gate and up as row ranges, o and down one range each. `grads` columns: the whole `_factor_grads` call (x P^T and
dH^T x included); `pair` / config columns: (g Qf, g^T H) alone; `GB/s`: g's bytes once over the best config.
Times: GPU ms a call, replayed from a CUDA graph (as the graphed step runs them; eager timing of these
0.05-0.3 ms calls measures the CPU's launches).
`err`: max |kernel - GEMMs| / max |GEMMs| of both products.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.bench_rotgrad import SHAPES, projections  # noqa: E402
from mora_dist.kernels import dualmm  # noqa: E402
from mora_dist.parallel import merged  # noqa: E402
from mora_dist.utils.gpu_time import cuda_graph_ms as timed  # noqa: E402

LAYERS = {"qkv": ("q", "k", "v"), "o": ("o",), "fc1": ("gate", "up"), "fc2": ("down",)}
CONFIGS = [(256, 64, 8, 3), (128, 64, 4, 3), (512, 32, 8, 3), (256, 128, 8, 2), (128, 128, 8, 3), (256, 64, 8, 4),
           (128, 64, 4, 4), (64, 128, 4, 3)]


def _rows(segs, d_out, dev):
    if len(segs) == 1:
        return merged.RowRange(segs[0][2], segs[0][2] + d_out)
    G, w = len(segs), segs[0][1] - segs[0][0]
    stride, off = segs[1][2] - segs[0][2], segs[0][2]
    pos = (off + stride * torch.arange(G)[:, None] + torch.arange(w)[None, :]).reshape(-1).to(dev)
    return merged.RowBlocks(G, stride, off, w, pos)


def _with_kernel(on: bool, fn):
    old = os.environ.get("MORA_DIST_NO_KERNEL")
    os.environ["MORA_DIST_NO_KERNEL"] = "" if on else "dualmm"
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("MORA_DIST_NO_KERNEL")
        else:
            os.environ["MORA_DIST_NO_KERNEL"] = old


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, device=dev, generator=gen) * 0.1).to(torch.bfloat16)  # noqa: E731
    torch.set_grad_enabled(False)  # as in the backward
    projs = {p[0]: p for p in projections(r=args.r, **SHAPES[args.size])}
    head = ["layer", "n_out", "grads GEMMs ms", "grads 1-pass ms", "pair ms"] + [
        "/".join(str(int(v)) for v in c) + " ms" for c in CONFIGS] + ["GB/s", "err"]
    rows, tot = [], [0.0] * (3 + len(CONFIGS))
    for layer, names in LAYERS.items():
        d_in, n_out = projs[names[0]][1], projs[names[0]][3]
        terms = tuple(merged.Term(_rows(projs[n][4], projs[n][2], dev), i, None) for i, n in enumerate(names))
        Ps = [rnd(args.r, d_in) for _ in names]
        Qs = [rnd(projs[n][2], args.r) for n in names]
        plan = merged.Plan(len(names), terms, ())
        ts = Ps + [v for Q in Qs for v in (None, Q)]
        need = [True] * len(Ps) + [False, True] * len(Qs)
        g, x = rnd(args.tokens, n_out), rnd(args.tokens, d_in)
        grads = lambda: merged._factor_grads(g, x, plan, ts, need)  # noqa: E731
        ms = [_with_kernel(False, lambda: timed(grads, args.reps)), _with_kernel(True, lambda: timed(grads, args.reps))]
        Qf = merged._stacked_q(n_out, [(t.rows, Q) for t, Q in zip(terms, Qs)], g)
        H = rnd(args.tokens, args.r * len(names))
        ms.append(timed(lambda: (g @ Qf, g.t() @ H), args.reps))
        ref = [t.float() for t in (g @ Qf, g.t() @ H)]
        err = 0.0
        for c in CONFIGS:
            ms.append(timed(lambda: dualmm.dual_mm(g, Qf, H, c), args.reps))
            got = dualmm.dual_mm(g, Qf, H, c)
            err = max(err, *((a.float() - b).abs().max().item() / b.abs().max().item() for a, b in zip(got, ref)))
        tot = [t + m for t, m in zip(tot, ms)]
        gbs = g.numel() * 2 / min(ms[3:]) / 1e6
        rows.append([layer, n_out] + [f"{m:.3f}" for m in ms] + [f"{gbs:.0f}", f"{err:.1e}"])
    rows.append(["layer sum", ""] + [f"{t:.3f}" for t in tot] + ["", ""])
    print(f"T = {args.tokens}, r = {args.r}, {args.size}, {torch.cuda.get_device_name()}, kernel serves k <= {dualmm.MAX_K}")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(v).rjust(n) for v, n in zip(r, w)))


if __name__ == "__main__":
    main()
