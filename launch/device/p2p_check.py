"""The copy-engine transport (`parallel/p2p.py`) against NCCL's on GPUs: exact equality of every exchange
of `parallel/overlap.py` (eager and replayed from a CUDA graph) and the time of each at the 8B TP=2 + SP
shapes, one layer's exchange per row, both transports side by side.

    torchrun --nproc_per_node=2 launch/device/p2p_check.py [--mbs 2,4] [--json F]

Rows (T = seq x mbs tokens, m = T / 2 a rank): q/k/v and gate+up forward (gather_mm: this rank's rows
[m, 4096] all-gathered, times its columns of W^T), o and down forward (mm_scatter: [T, d_in/2] times
W^T's rows, reduce-scattered), and the row-parallel backward's gather of the output gradient (gather_mm
of g with W). Times: CUDA-graph replays of 20 calls, median of 5, ms a call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from mora_dist.parallel import overlap  # noqa: E402

H, FFN, KV = 4096, 14336, 1024  # Llama-3-8B


def shapes(T: int, n: int):
    m = T // n
    qkv = (H + 2 * KV) // n
    return [  # (name, kind, a shape, B shape)
        ("qkv fwd", "gather_mm", (m, H), (H, qkv)),
        ("gate+up fwd", "gather_mm", (m, H), (H, 2 * FFN // n)),
        ("o fwd", "mm_scatter", (T, H // n), (H // n, H)),
        ("down fwd", "mm_scatter", (T, FFN // n), (FFN // n, H)),
        ("down bwd dx", "gather_mm", (m, H), (H, FFN // n)),
        ("gather g", "gather", (m, H), None),
    ]


def call(kind, a, B, group):
    if kind == "gather_mm":
        return overlap.gather_mm(a, B, group)[0]
    if kind == "mm_scatter":
        return overlap.mm_scatter(a, B, group)
    return overlap.gather(a, group)


def timed(fn, reps: int = 20, rounds: int = 5) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(rounds):
        dist.barrier()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / reps)
    g.reset()
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbs", default="2,4")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    group = dist.new_group(list(range(dist.get_world_size())))
    n = dist.get_world_size(group)
    from mora_dist.parallel import p2p

    ok, why = p2p.supported(group)
    if not ok:
        raise SystemExit(f"copy engine transport unsupported: {why}")
    rows, worst = [], 0
    for mbs in [int(x) for x in a.mbs.split(",")]:
        T = a.seq * mbs
        for name, kind, sa, sb in shapes(T, n):
            gen = torch.Generator(device="cuda").manual_seed(1000 * rank + len(rows))
            x = torch.randn(sa, device="cuda", dtype=torch.bfloat16, generator=gen)
            B = torch.randn(sb, device="cuda", dtype=torch.bfloat16, generator=gen) / sb[0] ** 0.5 if sb else None
            res = {}
            for t in ("nccl", "copy_engine"):
                overlap.set_transport(t)
                eager = call(kind, x, B, group).clone()
                # the same exchange replayed from a graph must give the same bits
                out = {}
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    call(kind, x, B, group)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out["y"] = call(kind, x, B, group)
                g.replay()
                torch.cuda.synchronize()
                graphed_equal = bool(torch.equal(out["y"], eager))
                g.reset()
                res[t] = (eager, graphed_equal, timed(lambda: call(kind, x, B, group)))
            equal = bool(torch.equal(res["nccl"][0], res["copy_engine"][0]))
            worst += (not equal) + (not res["nccl"][1]) + (not res["copy_engine"][1])
            row = dict(mbs=mbs, row=name, kind=kind, a=list(sa), B=list(sb) if sb else None,
                       nccl_ms=round(res["nccl"][2], 4), copy_engine_ms=round(res["copy_engine"][2], 4),
                       equal=equal, graph_equal_nccl=res["nccl"][1], graph_equal_ce=res["copy_engine"][1])
            rows.append(row)
            if rank == 0:
                print(f"mbs {mbs} {name:12s} nccl {row['nccl_ms']:.3f} ms  copy_engine {row['copy_engine_ms']:.3f} ms"
                      f"  ({row['copy_engine_ms'] / row['nccl_ms']:.2f}x)  equal {equal}  graphs equal "
                      f"{row['graph_equal_nccl']}/{row['graph_equal_ce']}", flush=True)
    if rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    flag = torch.tensor([worst], device="cuda")
    dist.all_reduce(flag)
    dist.destroy_process_group()
    if flag.item():
        raise SystemExit(f"{flag.item()} mismatches")


if __name__ == "__main__":
    main()
