"""Time RoPE at the Llama-3-8B shape on one GPU: megatron's `_apply_rotary_pos_emb_bshd` under
torch.compile (what the model ran before) against the one-pass kernel (`mora_dist/kernels/rope.py`),
forward and backward, for q (32 heads) and k (8 heads):

    python3 launch/bench_rope.py                 # seq 4096, micro-batch 2
    python3 launch/bench_rope.py --seq 8192 --mbs 1

GB/s counts one read of t (or g) and one write of the result; err: max |kernel - compiled| / max |compiled|.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mora_dist.kernels import rope  # noqa: E402
from mora_dist.utils.gpu_time import cuda_ms as timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    from megatron.core.models.common.embeddings import rope_utils

    compiled = torch.compile(rope_utils._apply_rotary_pos_emb_bshd, dynamic=False)
    dev, d = torch.device("cuda"), 128
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(args.seq, device=dev, dtype=torch.float32), inv)
    freqs = torch.cat([f, f], -1).view(args.seq, 1, 1, d)
    print(f"{torch.cuda.get_device_name()}, seq {args.seq}, mbs {args.mbs}, head dim {d}")
    print("   t  heads  pass      compiled ms  kernel ms  compiled GB/s  kernel GB/s  x   err")
    tot = [0.0, 0.0]
    for name, heads in (("q", 32), ("k", 8)):
        t = torch.randn(args.seq, args.mbs, heads, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(t)
        gb = 2 * t.numel() * t.element_size() / 1e9
        for pas in ("forward", "backward"):
            if pas == "forward":
                fa, fb = (lambda: compiled(t, freqs)), (lambda: rope.apply(t, freqs))
                ya, yb = fa(), fb()
            else:
                oa, ob = compiled(t, freqs), rope.apply(t, freqs)
                fa = lambda: torch.autograd.grad(oa, t, g, retain_graph=True)[0]  # noqa: E731
                fb = lambda: torch.autograd.grad(ob, t, g, retain_graph=True)[0]  # noqa: E731
                ya, yb = fa(), fb()
            ms = [timed(fa, args.reps), timed(fb, args.reps)]
            tot = [x + y for x, y in zip(tot, ms)]
            err = ((yb.float() - ya.float()).abs().max() / ya.float().abs().max()).item()
            print(f"{name:>4}  {heads:5d}  {pas:8s}  {ms[0]:11.3f}  {ms[1]:9.3f}  {gb / ms[0] * 1e3:13.0f}  "
                  f"{gb / ms[1] * 1e3:11.0f}  {ms[0] / ms[1]:4.2f}  {err:.1e}")
    print(f"layer (q + k, both passes): compiled {tot[0]:.3f} ms, kernel {tot[1]:.3f} ms; "
          f"x 32 layers x micro-batches a step")


if __name__ == "__main__":
    main()
