"""Time megatron's SwiGLU backward at the Llama-3-8B MLP shape on one GPU: the torch.compile'd
`swiglu_back` (what megatron runs with bias_activation_fusion) against the one-pass kernel the model
runs (`mora_dist/kernels/swiglu.py`), at its default tiling and at each --back-tile:

    python3 launch/bench_swiglu.py                          # T = 8192 (mbs 2 x seq 4096), F = 14336, bf16
    python3 launch/bench_swiglu.py --reps 50 --back-tile 2,2048,8 --back-tile 16,512,4

Mean of --reps calls between CUDA events after warm-up; GB: y and the incoming gradient read once, g
written once (T x 2F + T x F + T x 2F bf16); GB/s = that / time; err: max |kernel - compiled| / max |compiled|.
(The fused SwiGLU + factor-gradient kernels this script timed before lost 4x to the unfused path and were
removed: docs/performance.md, 8B section.)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mora_dist.kernels import swiglu as one  # noqa: E402
from mora_dist.utils.gpu_time import cuda_ms as timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches an optimizer step")
    ap.add_argument("--back-tile", action="append", default=[],
                    help="BLOCK_T,BLOCK_F,num_warps of kernels/swiglu.py: one more row each")
    args = ap.parse_args()
    from megatron.core.fusions.fused_bias_swiglu import swiglu_back

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    T, F = args.tokens, args.ffn
    default = f"{one.BLOCK_T},{one.BLOCK_F},{one.NUM_WARPS}"
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"T = {T}, F = {F}, bf16; default tiling {default}")
    gen = torch.Generator(device=dev).manual_seed(0)
    y = (torch.randn(T, 2 * F, device=dev, generator=gen) * 2).to(torch.bfloat16)
    dact = (torch.randn(T, F, device=dev, generator=gen) * 0.01).to(torch.bfloat16)
    gb = (T * 2 * F + T * F + T * 2 * F) * 2 / 1e9
    want = swiglu_back(dact, y)
    err = lambda x: ((x.float() - want.float()).abs().max() / want.float().abs().max()).item()  # noqa: E731
    t_a = timed(lambda: swiglu_back(dact, y), args.reps)
    rows = [("compiled swiglu_back", t_a, 0.0)]
    for tile in [default] + args.back_tile:
        one.BLOCK_T, one.BLOCK_F, one.NUM_WARPS = (int(v) for v in tile.split(","))
        rows.append((f"kernel {tile}", timed(lambda: one.swiglu_back(dact, y), args.reps), err(one.swiglu_back(dact, y))))
    print("path                       ms    GB   GB/s  err      saved ms a step")
    for name, ms, e in rows:
        print(f"{name:22s}  {ms:6.3f}  {gb:4.2f}  {gb / ms * 1e3:5.0f}  {e:.0e}  "
              f"{(t_a - ms) * args.layers * args.micro:8.1f}")


if __name__ == "__main__":
    main()
