"""Canonical projections inside megatron's fused linears, per TP shard.

`linear_qkv` (column-parallel) stores, for each query group g, the q rows of g's heads, then g's k
rows, then g's v rows; TP ranks own contiguous runs of whole groups. `linear_fc1` with a gated
linear unit stores, on each rank, that rank's shard of gate followed by its shard of up. For a
canonical projection (HF's q_proj, ..., up_proj) we need, on this rank, the global rows of that
projection the rank computes and their positions in the rank's local output.
"""
from __future__ import annotations

import torch

PARTS = ("q", "k", "v", "gate", "up")


def qkv_rows(num_heads: int, num_groups: int, head_dim: int, tp_size: int, tp_rank: int) -> dict:
    """{q|k|v: (global rows of the canonical projection, positions in the local linear_qkv output)}."""
    if num_groups % tp_size:
        raise ValueError(f"num_query_groups={num_groups} is not divisible by tensor_parallel={tp_size}")
    qpg = num_heads // num_groups
    block = (qpg + 2) * head_dim
    groups_local = num_groups // tp_size
    out = {k: ([], []) for k in "qkv"}
    for lg in range(groups_local):
        g = tp_rank * groups_local + lg
        base = lg * block
        j = torch.arange(qpg * head_dim)
        out["q"][0].append(g * qpg * head_dim + j)
        out["q"][1].append(base + j)
        j = torch.arange(head_dim)
        out["k"][0].append(g * head_dim + j)
        out["k"][1].append(base + qpg * head_dim + j)
        out["v"][0].append(g * head_dim + j)
        out["v"][1].append(base + (qpg + 1) * head_dim + j)
    return {k: (torch.cat(r), torch.cat(p)) for k, (r, p) in out.items()}


def fc1_rows(ffn: int, tp_size: int, tp_rank: int) -> dict:
    """{gate|up: (global rows, positions in the local linear_fc1 output)} for a gated fc1."""
    if ffn % tp_size:
        raise ValueError(f"ffn_hidden_size={ffn} is not divisible by tensor_parallel={tp_size}")
    n = ffn // tp_size
    rows = torch.arange(tp_rank * n, (tp_rank + 1) * n)
    return {"gate": (rows, torch.arange(n)), "up": (rows, torch.arange(n, 2 * n))}


def part(module, target: str):
    """(d_in, d_out, global rows, local positions) of canonical `target` in a fused megatron linear."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = module.config
    if target in ("q", "k", "v"):
        hd = cfg.kv_channels
        d_out = (cfg.num_attention_heads if target == "q" else cfg.num_query_groups) * hd
        rows, pos = qkv_rows(cfg.num_attention_heads, cfg.num_query_groups, hd, tp, rank)[target]
        return module.input_size, d_out, rows, pos
    if not cfg.gated_linear_unit:
        raise ValueError("gate/up adapter targets need a gated MLP (gated_linear_unit=True); use 'up' via "
                         "a glob pattern on linear_fc1 instead")
    ffn = module.output_size // 2
    rows, pos = fc1_rows(ffn, tp, rank)[target]
    return module.input_size, ffn, rows, pos
