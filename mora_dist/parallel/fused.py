"""Canonical adapter targets inside megatron's fused linears.

q, k, v live in the fused `linear_qkv` and gate, up in the gated `linear_fc1`; each gets an
adapter over the canonical projection's shape that writes to that projection's rows of the rank's
local output. The row layout itself is defined once, in `mora_dist.models.layout`.
"""
from __future__ import annotations

PARTS = ("q", "k", "v", "gate", "up")


def part(module, target: str):
    """(d_in, d_out, global rows, local positions) of canonical `target` in a fused megatron linear."""
    from megatron.core import parallel_state as ps

    from mora_dist.models.layout import fc1_row_index, qkv_row_index

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = module.config
    if target in ("q", "k", "v"):
        hd = cfg.kv_channels
        d_out = (cfg.num_attention_heads if target == "q" else cfg.num_query_groups) * hd
        rows = qkv_row_index(cfg.num_attention_heads, cfg.num_query_groups, hd, tp, rank)[target]
        return module.input_size, d_out, rows.glob, rows.local
    if not cfg.gated_linear_unit:
        raise ValueError("gate/up adapter targets need a gated MLP (gated_linear_unit=True); target "
                         "linear_fc1 with a glob pattern instead")
    ffn = module.output_size // 2
    rows = fc1_row_index(ffn, tp, rank)[target]
    return module.input_size, ffn, rows.glob, rows.local
