"""Row layout of megatron's fused `linear_qkv` and `linear_fc1` per tensor-parallel shard.

The single source of truth for which local row of a fused shard is which canonical projection
(q/k/v, gate/up) and which global row of it. HF import/export and the adapters on canonical
targets all index through these helpers, so the layout convention lives in one place.

linear_qkv (global, before sharding) is interleaved per query group g = 0..ng-1:
    [q rows of the np/ng heads in g | k rows of g | v rows of g], each head hn rows.
ColumnParallelLinear gives TP rank r the contiguous global rows of groups
[r*ng/tp, (r+1)*ng/tp), so the rank's q, k and v rows are each a contiguous range of the
canonical projection. linear_fc1 (gated) holds on rank r [gate rows of r ; up rows of r],
each ffn/tp rows: concatenating shards does NOT give [gate; up].
"""
from __future__ import annotations

from typing import Dict, NamedTuple

import torch


class Rows(NamedTuple):
    """`shard[local]` holds `projection[glob]` (both LongTensors of equal length)."""

    local: torch.Tensor
    glob: torch.Tensor

    def span(self) -> tuple:
        """(start, stop) of `glob` as a contiguous range (it always is, see module doc)."""
        return int(self.glob[0]), int(self.glob[-1]) + 1


def _check_tp(name: str, total: int, tp_size: int, tp_rank: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad tensor-parallel rank {tp_rank} of size {tp_size}")
    if total % tp_size:
        raise ValueError(f"{name} ({total}) is not divisible by tensor-parallel size {tp_size}")


def qkv_row_index(num_heads: int, num_query_groups: int, head_dim: int, tp_size: int = 1,
                  tp_rank: int = 0) -> Dict[str, Rows]:
    """For TP rank `tp_rank`: {"q": Rows, "k": Rows, "v": Rows} over its linear_qkv shard.

    Rows.local indexes the shard's (np/tp + 2*ng/tp)*hn rows; Rows.glob indexes the canonical
    projection (q: num_heads*hn rows, k/v: num_query_groups*hn rows), in increasing order.
    """
    _check_tp("num_query_groups", num_query_groups, tp_size, tp_rank)
    if num_heads % num_query_groups:
        raise ValueError(f"num_heads ({num_heads}) is not a multiple of num_query_groups ({num_query_groups})")
    per_group_q = num_heads // num_query_groups * head_dim
    group_rows = per_group_q + 2 * head_dim
    local_groups = num_query_groups // tp_size
    first = tp_rank * local_groups
    parts = {"q": ([], []), "k": ([], []), "v": ([], [])}
    for lg in range(local_groups):
        g = first + lg
        base = lg * group_rows
        spans = {
            "q": (base, g * per_group_q, per_group_q),
            "k": (base + per_group_q, g * head_dim, head_dim),
            "v": (base + per_group_q + head_dim, g * head_dim, head_dim),
        }
        for name, (loc, glob, n) in spans.items():
            parts[name][0].append(torch.arange(loc, loc + n))
            parts[name][1].append(torch.arange(glob, glob + n))
    return {k: Rows(torch.cat(l), torch.cat(g)) for k, (l, g) in parts.items()}


def fc1_row_index(ffn_hidden_size: int, tp_size: int = 1, tp_rank: int = 0) -> Dict[str, Rows]:
    """For TP rank `tp_rank`: {"gate": Rows, "up": Rows} over its gated linear_fc1 shard."""
    _check_tp("ffn_hidden_size", ffn_hidden_size, tp_size, tp_rank)
    n = ffn_hidden_size // tp_size
    glob = torch.arange(tp_rank * n, (tp_rank + 1) * n)
    return {"gate": Rows(torch.arange(n), glob), "up": Rows(torch.arange(n, 2 * n), glob.clone())}


def split_rows(shard: torch.Tensor, index: Dict[str, Rows]) -> Dict[str, torch.Tensor]:
    """Fused shard (weight [rows, in] or bias [rows]) -> {projection: its local rows}."""
    return {k: shard.index_select(0, r.local) for k, r in index.items()}


def fuse_rows(parts: Dict[str, torch.Tensor], index: Dict[str, Rows]) -> torch.Tensor:
    """Inverse of `split_rows`: place each projection's local rows into a fused shard."""
    first = next(iter(parts.values()))
    n = sum(len(r.local) for r in index.values())
    out = first.new_empty((n,) + tuple(first.shape[1:]))
    for k, r in index.items():
        if parts[k].shape[0] != len(r.local):
            raise ValueError(f"{k}: expected {len(r.local)} rows for this shard, got shape {tuple(parts[k].shape)}")
        out.index_copy_(0, r.local, parts[k])
    return out
