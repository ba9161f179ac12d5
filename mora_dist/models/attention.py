"""Core attention on `torch.nn.functional.scaled_dot_product_attention`.

megatron's local `DotProductAttention` materialises the [b, np, s, s] scores (and a copy for the
softmax): 12.7k tokens/s at micro-batch 1 and out of memory at micro-batch 4 for a 1.1B model at
seq 2048 on an H100. SDPA dispatches to flash / memory-efficient / cuDNN kernels that never form
the score matrix. Same constructor and forward contract as `DotProductAttention`, so it drops into
the local layer spec's `core_attention` slot.

Masks follow megatron's convention (True = masked out). The fast path is taken when the mask is
None or exactly the causal mask: then `is_causal=True` and no mask reaches the kernel. Any other
mask (document masking, sliding window) is passed to SDPA as a boolean "may attend" mask.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """q [s, b, np, hn], k/v [s, b, ng, hn] (local to the TP rank) -> context [s, b, np*hn]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPAttention does not support context parallelism (use TE)")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"SDPAttention supports softmax_type 'vanilla', not {config.softmax_type!r}")
        if config.apply_query_key_layer_scaling:
            raise NotImplementedError("SDPAttention does not support apply_query_key_layer_scaling")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = (
            config.window_size
            if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
            else None
        )
        self._causal_cache: dict = {}

    def _is_causal_mask(self, mask: torch.Tensor, sq: int, sk: int) -> bool:
        if mask.dim() != 4 or mask.shape[-2:] != (sq, sk) or mask.shape[1] != 1 or sq != sk:
            return False
        key = (sq, mask.device)
        ref = self._causal_cache.get(key)
        if ref is None:
            ref = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(1)
            self._causal_cache = {key: ref}
        return bool(torch.equal(mask.bool(), ref.expand_as(mask)))

    def _window_binds(self, sq: int, sk: int) -> bool:
        """False when the window admits every causal key (then the causal fast path is exact)."""
        left, right = self.window
        return right != 0 or (0 <= left < sk - 1)

    @staticmethod
    def _window_mask(window, sq: int, sk: int, device) -> torch.Tensor:
        """Boolean 'may attend' mask: keys within [i - left, i + right] of query i (megatron's window_size)."""
        left, right = window
        i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
        j = torch.arange(sk, device=device).unsqueeze(0)
        ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if right >= 0:
            ok = ok & (j <= i + right)
        if left >= 0:
            ok = ok & (j >= i - left)
        return ok

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention does not support packed sequences (use TE)")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support attention_bias")
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        if np_ != self.heads or key.shape[2] != self.groups:
            raise ValueError(
                f"SDPAttention expects {self.heads} query heads and {self.groups} kv groups per rank, "
                f"got query {tuple(query.shape)} key {tuple(key.shape)}"
            )
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        is_causal, mask = False, None
        if self.window is not None and self._window_binds(sq, sk):
            mask = self._window_mask(self.window, sq, sk, query.device)
            if attention_mask is not None:
                mask = mask & ~attention_mask.bool()
        elif attention_mask is None and sq != sk:
            # SDPA's is_causal aligns the diagonal top-left; megatron's causal mask is bottom-right
            mask = self._window_mask((-1, 0), sq, sk, query.device)
        elif attention_mask is None or self._is_causal_mask(attention_mask, sq, sk):
            is_causal = True
        else:
            mask = ~attention_mask.bool()
        gqa = np_ != self.groups
        if gqa and q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
            # enable_gqa is taken by the flash and math kernels only; fp32 would fall back to math
            # (materialised scores), so expand k/v instead and keep the memory-efficient kernel.
            k, v = (t.repeat_interleave(np_ // self.groups, dim=1) for t in (k, v))
            gqa = False
        dropout = self.dropout_p if self.training else 0.0
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=gqa,
            )
        # [b, np, s, hn] -> [s, b, np*hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

