"""Time the two skinny products of a LoRA layer's output gradient at the Llama-3-8B shape on one GPU:
cuBLAS's two GEMMs (E = g^T H, then D = g Q: what merged.py runs without the kernel, each a read of g)
against the one-read kernel (`mora_dist/kernels/skinny.py`) at its default tiling and each --tile:

    python3 launch/bench_skinny.py                          # T = 8192 (mbs 2 x seq 4096), bf16
    python3 launch/bench_skinny.py --reps 50 --tile 128,128,8,3,0 --tile 64,128,4,3,1
    python3 launch/bench_skinny.py --tokens 16384 --tp 2    # a TP=2 shard under SP at micro-batch 4

Layers (LoRA r=8 on every projection): qkv (N 6,144, K 24: three terms), o and down (N 4,096, K 8),
gate + up (N 28,672, K 16). Mean of --reps replays of a CUDA graph of 10 calls between CUDA events; GB: g read once
(T x N bf16); GB/s = that / time; err: max |kernel - cuBLAS| / max |cuBLAS| over E and D; saved: ms a
step of 32 layers x --micro micro-batches against cuBLAS.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mora_dist.kernels import skinny  # noqa: E402
from mora_dist.utils.gpu_time import cuda_ms  # noqa: E402

LAYERS = (("qkv", 6144, 24, 1), ("o", 4096, 8, 1), ("gate+up", 28672, 16, 1), ("down", 4096, 8, 1))


def timed(fn, reps: int) -> float:
    """ms a call of fn replayed from a CUDA graph of 10 calls (the o / down products take ~20 us: launch
    time would hide the kernels; the training step replays them from a graph too)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    return cuda_ms(graph.replay, reps) / 10


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches an optimizer step")
    ap.add_argument("--tp", type=int, default=1, help="column-parallel shards: N / tp")
    ap.add_argument("--tile", action="append", default=[],
                    help="BLOCK_T,BLOCK_N,num_warps,num_stages,GB (kernels/skinny.TILES): one more row each")
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    T = args.tokens
    default = tuple(int(v) for v in skinny.TILES)
    tiles = [default] + [tuple(int(v) for v in t.split(",")) for t in args.tile]
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"T = {T}, TP = {args.tp}, bf16; default tiling {','.join(map(str, default))}")
    print("layer     N      K  path                  ms     GB    GB/s   err     saved ms a step")
    total = {}
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, N, K, _ in LAYERS:
        N //= args.tp
        g = (torch.randn(T, N, device=dev, generator=gen) * 0.01).to(torch.bfloat16)
        H = torch.randn(T, K, device=dev, generator=gen).to(torch.bfloat16)
        Q = (torch.randn(N, K, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
        gb = T * N * 2 / 1e9
        E0, D0 = g.t() @ H, g @ Q
        t_ref = timed(lambda: (g.t() @ H, g @ Q), args.reps)
        print(f"{name:8s} {N:6d} {K:3d}  cuBLAS two GEMMs    {t_ref:6.3f}  {gb:5.3f}  {gb / t_ref * 1e3:5.0f}  -")
        total.setdefault("cuBLAS", 0.0)
        total["cuBLAS"] += t_ref
        for tile in tiles:
            tile = (*tile[:4], bool(tile[4]))
            E, D = skinny.both_products(g, H, Q, tile)
            err = max(((E - E0.float()).abs().max() / E0.float().abs().max()).item(),
                      ((D - D0.float()).abs().max() / D0.float().abs().max()).item())
            ms = timed(lambda: skinny.both_products(g, H, Q, tile), args.reps)
            label = "kernel " + ",".join(str(int(v)) for v in tile)
            total[label] = total.get(label, 0.0) + ms
            print(f"{name:8s} {N:6d} {K:3d}  {label:19s} {ms:6.3f}  {gb:5.3f}  {gb / ms * 1e3:5.0f}  {err:.0e}  "
                  f"{(t_ref - ms) * args.layers * args.micro:8.1f}", flush=True)
    print("a layer (all four), ms:", ", ".join(f"{k} {v:.3f}" for k, v in total.items()))
    print("a step saved against cuBLAS, ms:", ", ".join(f"{k} {(total['cuBLAS'] - v) * args.layers * args.micro:.1f}"
                                                        for k, v in total.items() if k != "cuBLAS"))


if __name__ == "__main__":
    main()
