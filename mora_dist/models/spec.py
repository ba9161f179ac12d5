"""Layer/block specs for Llama-family decoders: TE when installed, otherwise SDPA attention.

The non-TE spec is megatron's local spec with two swaps: `core_attention` -> `SDPAttention`
(no materialised s x s scores) and the norms -> our SP-aware `RMSNorm`. `attention="local"`
keeps megatron's `DotProductAttention` (same norms), used as the numerical reference in tests.
"""
from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from mora_dist.models.attention import SDPAttention
from mora_dist.models.norm import RMSNorm

ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a TE build that fails to load its kernels
        return False
    return True


def resolve_attention(attention: str) -> str:
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if attention == "auto":
        return "te" if te_available() else "sdpa"
    if attention == "te" and not te_available():
        raise ImportError("attention='te' requested but transformer_engine is not importable")
    return attention


def llama_layer_spec(attention: str = "auto"):
    """ModuleSpec of one decoder layer for the resolved attention backend."""
    attention = resolve_attention(attention)
    if attention == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    sub.self_attention.submodules.core_attention = SDPAttention if attention == "sdpa" else DotProductAttention
    return spec


def llama_block_spec(config, attention: str = "auto", vp_stage=None) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage (explicit final norm: megatron's default is global state)."""
    attention = resolve_attention(attention)
    layer = llama_layer_spec(attention)
    if attention == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)
