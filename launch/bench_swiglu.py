"""Time SwiGLU fused with the MLP adapters' skinny products (`mora_dist.kernels.swiglu_grads`, issue
15) against what the model runs today, at the Llama-3-8B MLP shape on one GPU:

    python3 launch/bench_swiglu.py                       # T = 8192 (mbs 2 x seq 4096), F = 14336, r = 8, bf16
    python3 launch/bench_swiglu.py --reps 50 --cfg '{"BT": 32, "BF": 32, "num_warps": 4}' --cfg '{"maxnreg": 128}'

(a) unfused: megatron's swiglu / swiglu_back (the torch.compile'd functions `bias_swiglu_impl` runs
with bias_activation_fusion) and the torch GEMMs `merged._factor_grads` runs for LoRA on gate, up
(linear_fc1, H = x P^T of both in one [T, 2r] product, sliced) and down (linear_fc2):
forward H_d = act P_d^T; backward E_i = g_i^T H_i and Z_i = g_i Q_i for the halves g_i of fc1's
output gradient, dP_d = Z_d^T act. (b) fused: `swiglu_forward_lora`, `swiglu_backward_lora` (with
the default tiling, then one row pair per --cfg, JSON overriding `swiglu_grads.CONFIG`).
Rows `... only`: the elementwise part alone (megatron's, and the fused kernel with every product
off): the floor of each. Mean of --reps calls between CUDA events after warm-up; GB: the bytes each
must move (bf16 tensors of T x F or T x 2F, once per read or write; partial buffers included for
(b)), GB/s = that / time. `saved`: (a) - (b) a layer and micro-batch, and for an 8B step (--layers
32 x --micro 4). Errors: max |x - ref| / max |ref| of (b) against (a), and of both against fp32
math from the same bf16 inputs (the float64 checks are tests/test_swiglu_grads.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as Fn
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mora_dist.kernels import swiglu_grads as sw  # noqa: E402
from mora_dist.utils.gpu_time import cuda_ms as timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches an optimizer step")
    ap.add_argument("--back-tile", action="append", default=["4,1024,8"],
                    help="BLOCK_T,BLOCK_F,num_warps of kernels/swiglu.py's backward: one row each")
    ap.add_argument("--cfg", action="append", default=[], help="JSON overrides of swiglu_grads.CONFIG: more rows")
    args = ap.parse_args()
    from megatron.core.fusions.fused_bias_swiglu import swiglu, swiglu_back

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    T, F, r = args.tokens, args.ffn, args.r
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"T = {T}, F = {F}, r = {r}, bf16; default tiling {sw.CONFIG}")
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *sh, s=1.0: (torch.randn(*sh, device=dev, generator=gen) * s).to(torch.bfloat16)  # noqa: E731
    y, dact = rnd(T, 2 * F, s=2.0), rnd(T, F, s=0.01)
    H1 = rnd(T, 2 * r)  # fc1's x [P_gate; P_up]^T: one GEMM, sliced per adapter as _factor_grads does
    Hg, Hu = H1[:, :r], H1[:, r:]
    Qg, Qu, Pd = rnd(F, r, s=0.02), rnd(F, r, s=0.02), rnd(r, F, s=0.02)
    Zd = rnd(T, r, s=0.01)

    def fwd_a():
        act = swiglu(y)
        return act, act @ Pd.t()

    act_a = fwd_a()[0]

    def bwd_a():
        g = swiglu_back(dact, y)
        g1, g2 = g[:, :F], g[:, F:]
        return g, g1.t() @ Hg, g2.t() @ Hu, g1 @ Qg, g2 @ Qu, Zd.t() @ act_a

    # fp32 math from the same bf16 inputs (the products from the fp32 g / act, not rounded)
    y1, y2, d32 = y[:, :F].float(), y[:, F:].float(), dact.float()
    s = torch.sigmoid(y1)
    act32 = Fn.silu(y1) * y2
    g1_32, g2_32 = d32 * s * (1 + y1 * (1 - s)) * y2, d32 * Fn.silu(y1)
    ref = dict(act=act32, H=act32 @ Pd.float().t(), g=torch.cat([g1_32, g2_32], 1), Eg=g1_32.t() @ Hg.float(),
               Eu=g2_32.t() @ Hu.float(), Zg=g1_32 @ Qg.float(), Zu=g2_32 @ Qu.float(), dP=Zd.float().t() @ act32)
    del y1, y2, d32, s, act32, g1_32, g2_32
    names = ("act", "H", "g", "Eg", "Eu", "Zg", "Zu", "dP")
    out_a = dict(zip(names, (*fwd_a(), *bwd_a())))
    err = lambda x, w: ((x.float() - w.float()).abs().max() / w.float().abs().max()).item()  # noqa: E731

    e2 = 2  # bytes a bf16 element
    gb = dict(
        fwd_a=(T * 2 * F + T * F + T * F) * e2, fwd0=(T * 2 * F + T * F) * e2,
        bwd_a=(T * 2 * F + T * F + T * 2 * F + 2 * T * 2 * F + T * F) * e2, bwd0=(T * 2 * F + T * F + T * 2 * F) * e2)
    gb = {k: v / 1e9 for k, v in gb.items()}

    def partials(cfg):  # GB of (b)'s fp32 partial slots, written and read back by the sum: (fwd, bwd)
        n_t, n_f = triton.cdiv(T, cfg["TP"]), triton.cdiv(F, cfg["FP"])
        return 2 * n_f * T * r * 4 / 1e9, 2 * (3 * n_t * F * r + 2 * n_f * T * r) * 4 / 1e9

    rows = [["call", "path", "ms", "GB", "GB/s"]]

    def row(call, path, ms, nbytes):
        rows.append([call, path, f"{ms:.3f}", f"{nbytes:.2f}", f"{nbytes / ms * 1e3:.0f}"])

    t_fa, t_ba = timed(fwd_a, args.reps), timed(bwd_a, args.reps)
    row("fwd", "(a) swiglu + H_d", t_fa, gb["fwd_a"])
    row("fwd", "(a) swiglu only", timed(lambda: swiglu(y), args.reps), gb["fwd0"])
    row("bwd", "(a) swiglu_back + E, Z x2 + dP_d", t_ba, gb["bwd_a"])
    row("bwd", "(a) swiglu_back only", timed(lambda: swiglu_back(dact, y), args.reps), gb["bwd0"])
    from mora_dist.kernels import swiglu as one

    g_a = swiglu_back(dact, y)
    for tile in args.back_tile:  # the one-pass backward (kernels/swiglu.py, what the model runs) at its tilings
        one.BLOCK_T, one.BLOCK_F, one.NUM_WARPS = (int(v) for v in tile.split(","))
        row("bwd", f"(c) one pass {tile}", timed(lambda: one.swiglu_back(dact, y), args.reps), gb["bwd0"])
        rows[-1][1] += f" err {err(one.swiglu_back(dact, y), g_a):.0e}"
    summary, errs = [], []
    for i, over in enumerate([{}] + [json.loads(c) for c in args.cfg]):
        cfg = {**sw.CONFIG, **over}
        tag = "default" if i == 0 else f"cfg{i}"
        fwd_b = lambda cfg=cfg: sw.swiglu_forward_lora(y, Pd, cfg=cfg)  # noqa: E731
        bwd_b = lambda cfg=cfg: sw.swiglu_backward_lora(y, dact, Hg, Qg, Hu, Qu, Zd, cfg=cfg)  # noqa: E731
        t_fb, t_bb = timed(fwd_b, args.reps), timed(bwd_b, args.reps)
        p_fwd, p_bwd = partials(cfg)
        row("fwd", f"(b) {tag}", t_fb, gb["fwd0"] + p_fwd)
        row("fwd", f"(b) {tag}, act only", timed(lambda cfg=cfg: sw.swiglu_forward_lora(y, cfg=cfg), args.reps),
            gb["fwd0"])
        row("bwd", f"(b) {tag}", t_bb, gb["bwd0"] + p_bwd)
        row("bwd", f"(b) {tag}, g only", timed(lambda cfg=cfg: sw.swiglu_backward_lora(y, dact, cfg=cfg), args.reps),
            gb["bwd0"])
        saved = (t_fa + t_ba) - (t_fb + t_bb)
        summary.append(f"{tag} {json.dumps(over) if over else ''}: saved {t_fa - t_fb:.3f} ms fwd + "
                       f"{t_ba - t_bb:.3f} ms bwd = {saved:.3f} ms a layer and micro-batch, "
                       f"{saved * args.layers * args.micro:.1f} ms an 8B step ({args.layers} layers x {args.micro} "
                       "micro-batches)")
        out_b = dict(zip(names, (*fwd_b(), *bwd_b())))
        errs.append((tag, out_b))
    w = [max(len(str(rw[i])) for rw in rows) for i in range(len(rows[0]))]
    for rw in rows:
        print("  ".join(str(v).rjust(n) if j >= 2 else str(v).ljust(n) for j, (v, n) in enumerate(zip(rw, w))))
    print("\n".join(summary))
    print("max rel err  " + "  ".join(f"{n:>8s}" for n in names))
    for tag, out_b in errs:
        print(f"(b) {tag:7s} vs (a)    " + "  ".join(f"{err(out_b[n], out_a[n]):8.1e}" for n in names))
        print(f"(b) {tag:7s} vs fp32   " + "  ".join(f"{err(out_b[n], ref[n]):8.1e}" for n in names))
    print("(a)         vs fp32   " + "  ".join(f"{err(out_a[n], ref[n]):8.1e}" for n in names))


if __name__ == "__main__":
    main()
