"""Model FLOPs per token of a Llama-family decoder, for MFU and TFLOP/s reporting.

"Model FLOPs" count the arithmetic the model needs, not what the hardware does: activation
recompute is not counted, so MFU stays comparable across recompute settings (the PaLM/Megatron
convention). The same formula is used by the peer benchmark (bench/peer_peft.py), so our
TFLOP/s numbers can be put side by side with the peer's.

Forward FLOPs per token, with ``P`` the matmul parameters and a multiply-add counted as 2::

    P       = L * (h*q + q*h + 2*h*kv + 3*h*f) + h*V    # q, o, k, v; gate, up, down; LM head
    attn    = L * 2 * 2 * s * q                          # QK^T and AV, causal counted full
    forward = 2 * P + attn

where ``q = heads * head_dim`` (= h for standard Llama) and ``kv = kv_groups * head_dim`` (GQA).
Embedding lookups, norms, RoPE, softmax and the loss are ignored (they are not matmuls).

* Full fine-tuning:  ``3 * forward``  (forward + input-grad backward + weight-grad backward).
* Frozen-base adapter step: ``2 * forward`` for the base (weight-grad GEMMs are skipped) plus
  the adapter's own work, ``3 * adapter_forward`` with ``adapter_forward ~= 2 * p_a`` for ``p_a``
  trainable adapter parameters, i.e. ``~6 * p_a``. That approximation is exact for LoRA; it
  under-counts adapters whose compute exceeds their parameter count (VeRA's frozen random
  matrices, MoRA's reshaped square matrix): pass ``adapter_fwd_flops`` to count those exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class DecoderShape:
    """The hyper-parameters the FLOP count depends on (seq is the training sequence length)."""

    hidden: int
    layers: int
    heads: int
    kv_groups: int
    ffn: int
    vocab: int
    seq: int
    head_dim: Optional[int] = None  # defaults to hidden // heads

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "kv_groups", "ffn", "vocab", "seq"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DecoderShape.{name} must be positive, got {getattr(self, name)!r}")
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}; pass head_dim")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: Any, seq: int) -> "DecoderShape":
        """Build from an HF config (object or dict: ``hidden_size``, ``num_hidden_layers``, ...) or
        from our ``LlamaSpec`` / training ``ModelConfig`` (``num_layers``, ``num_query_groups``, ...)."""

        def get(*names, default=None):
            for n in names:
                v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
                if v is not None:
                    return v
            if default is not None:
                return default
            raise ValueError(f"config has none of {names}")

        heads = get("num_attention_heads")
        return cls(
            hidden=get("hidden_size"),
            layers=get("num_hidden_layers", "num_layers"),
            heads=heads,
            kv_groups=get("num_key_value_heads", "num_query_groups", default=heads),
            ffn=get("intermediate_size", "ffn_hidden_size"),
            vocab=get("vocab_size"),
            seq=seq,
            head_dim=get("head_dim", default=0) or None,
        )


def matmul_params(shape: DecoderShape) -> int:
    """Parameters that take part in a matmul per token (embedding lookup excluded, LM head included)."""
    h, d = shape.hidden, shape.dim_head
    q, kv = shape.heads * d, shape.kv_groups * d
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * shape.ffn
    return shape.layers * per_layer + h * shape.vocab


def forward_flops_per_token(shape: DecoderShape) -> int:
    attn = shape.layers * 2 * 2 * shape.seq * shape.heads * shape.dim_head
    return 2 * matmul_params(shape) + attn


def full_ft_flops_per_token(shape: DecoderShape) -> int:
    """Full fine-tuning: forward, input-grad and weight-grad passes (3x forward)."""
    return 3 * forward_flops_per_token(shape)


def adapter_flops_per_token(shape: DecoderShape, adapter_params: int = 0,
                            adapter_fwd_flops: Optional[int] = None) -> int:
    """Frozen-base adapter step: 2x the base forward (no weight-grad GEMMs) plus 3x the adapter's
    forward, which defaults to ``2 * adapter_params`` (so ``~6 * p_a`` in all)."""
    if adapter_params < 0 or (adapter_fwd_flops is not None and adapter_fwd_flops < 0):
        raise ValueError("adapter FLOPs/params must be non-negative")
    fwd = 2 * adapter_params if adapter_fwd_flops is None else adapter_fwd_flops
    return 2 * forward_flops_per_token(shape) + 3 * fwd


def flops_per_token(shape: DecoderShape, full_finetune: bool, adapter_params: int = 0,
                    adapter_fwd_flops: Optional[int] = None) -> int:
    """Dispatch on the training mode (full fine-tuning ignores the adapter arguments)."""
    if full_finetune:
        return full_ft_flops_per_token(shape)
    return adapter_flops_per_token(shape, adapter_params, adapter_fwd_flops)
