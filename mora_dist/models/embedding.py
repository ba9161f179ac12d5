"""A frozen word embedding under sequence parallelism, looked up without communication.

Why: megatron's vocab-parallel embedding looks up every token in the rank's vocabulary shard (zeros
elsewhere), transposes the whole [b, s, h] result and reduce-scatters it over TP to give each rank
its sequence block. At the 8B shape on two H200s that reduce-scatter (64 MiB a micro-batch, nothing
to hide behind at the start of the forward) took ~2 ms a micro-batch (docs/performance.md, "Two
GPUs"). A frozen table can be held whole on every TP rank instead (one all-gather of the shards when
the weights change: 1 GB at 8B), and each rank looks up only its own sequence block: the same values
(each token's row comes from one shard), no collective. A table that trains (full fine-tuning,
ReLoRA's embeddings) keeps megatron's path, whose backward gives the shard its gradient.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F


def replicate_when_frozen(emb) -> None:
    """Give megatron's VocabParallelEmbedding `emb` (TP > 1, `reduce_scatter_embeddings`) the
    replicated lookup whenever its weight does not require grad (checked per call)."""
    if emb.tp_group.size() == 1 or not emb.reduce_scatter_embeddings:
        return
    megatron_forward = emb.forward

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            return megatron_forward(input_ids)
        table = _full_table(self)
        tp, r = self.tp_group.size(), self.tp_group.rank()
        s = input_ids.shape[1]
        if s % tp:
            raise ValueError(f"sequence length {s} does not split over {tp} tensor-parallel ranks")
        block = input_ids[:, r * (s // tp):(r + 1) * (s // tp)]
        return F.embedding(block, table).transpose(0, 1).contiguous()  # [s / tp, b, h], as the reduce-scatter gives

    emb.forward = types.MethodType(forward, emb)


def _full_table(emb) -> torch.Tensor:
    """Every vocab shard of emb.weight, rank-major as megatron splits them, gathered once per weight
    version (loading a checkpoint or a restart that wrote the table bumps it)."""
    w = emb.weight
    key = (w.data_ptr(), w._version)
    cached = getattr(emb, "_replicated", None)
    if cached is None or cached[0] != key:
        full = w.new_empty(emb.tp_group.size() * w.shape[0], w.shape[1])
        dist.all_gather_into_tensor(full, w.detach().contiguous(), group=emb.tp_group)
        emb._replicated = cached = (key, full)
    return cached[1]
