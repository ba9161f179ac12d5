"""Llama-family decoders on megatron-core: builder, SDPA layer spec, fused-layer layout, HF I/O."""
from mora_dist.models.config import LlamaSpec, UnsupportedModelError, rope_inv_freq
from mora_dist.models.layout import Rows, fc1_row_index, fuse_rows, qkv_row_index, split_rows

__all__ = [
    "LlamaSpec", "UnsupportedModelError", "rope_inv_freq", "Rows", "qkv_row_index", "fc1_row_index",
    "split_rows", "fuse_rows", "build_model", "transformer_config", "padded_vocab_size",
    "llama_layer_spec", "SDPAttention", "load_hf_checkpoint", "export_hf", "SafetensorsDir",
]


def __getattr__(name):
    """Megatron-dependent parts load lazily, so config/layout work without importing megatron."""
    if name in ("build_model", "transformer_config", "padded_vocab_size"):
        from mora_dist.models import builder

        return getattr(builder, name)
    if name in ("llama_layer_spec",):
        from mora_dist.models import spec

        return spec.llama_layer_spec
    if name == "SDPAttention":
        from mora_dist.models.attention import SDPAttention

        return SDPAttention
    if name in ("load_hf_checkpoint", "export_hf", "SafetensorsDir"):
        from mora_dist.models import hf_io

        return getattr(hf_io, name)
    raise AttributeError(f"module 'mora_dist.models' has no attribute {name!r}")
