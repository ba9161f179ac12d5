"""Bandwidth of the collectives sequence parallelism issues (all-gather and reduce-scatter of a
[tokens, hidden] bf16 activation) under the NCCL settings in the environment, eager and inside a
CUDA graph (as `train.cuda_graph` runs them). Run with torchrun on the GPUs of one node:

    NCCL_PROTO=Simple torchrun --nproc_per_node=2 launch/nccl_probe.py --shape 8192,4096

Prints one JSON line (rank 0): per collective the time per call and the bus bandwidth
((n-1)/n x bytes of the gathered tensor / time, NCCL's tests' definition).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def probe(t: int, h: int, n: int, iters: int) -> dict:
    """Time per call and bus bandwidth of all-gather / reduce-scatter of a [t, h] bf16 tensor."""
    full = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    part = torch.randn(t // n, h, device="cuda", dtype=torch.bfloat16)
    ops = {"all_gather": lambda: dist.all_gather_into_tensor(full, part),
           "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full)}
    out = {}
    for name, op in ops.items():
        for mode in ("eager", "graph"):
            for _ in range(3):
                op()
            run = op
            if mode == "graph":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    op()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    op()
                run = g.replay
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(iters):
                run()
            e1.record()
            torch.cuda.synchronize()
            us = e0.elapsed_time(e1) * 1e3 / iters
            out[f"{name}_{mode}_us"] = round(us, 1)
            out[f"{name}_{mode}_busbw_gbs"] = round(full.numel() * 2 * (n - 1) / n / us / 1e3, 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192,4096", help="tokens,hidden of the gathered activation; several: a;b")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    out = dict(world=n, env={k: v for k, v in os.environ.items() if k.startswith("NCCL_")})
    for shape in a.shape.split(";"):
        out[shape] = probe(*(int(v) for v in shape.split(",")), n, a.iters)
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
