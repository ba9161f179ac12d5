"""Model for training: a Llama-style megatron-core GPTModel for this pipeline stage."""
from __future__ import annotations

import torch


def build_for_training(mcfg, pcfg, recompute: bool, pre_process: bool, post_process: bool, seq_length: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.parallel import mcore_cpu

    dtype = torch.bfloat16 if mcfg.dtype == "bf16" else torch.float32
    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    cfg = TransformerConfig(
        num_layers=mcfg.num_layers, hidden_size=mcfg.hidden_size, ffn_hidden_size=mcfg.ffn_hidden_size,
        num_attention_heads=mcfg.num_attention_heads, num_query_groups=mcfg.num_query_groups,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=mcfg.norm_eps, add_bias_linear=False, tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp, sequence_parallel=pcfg.sp and pcfg.tp > 1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0, attention_dropout=0.0, **extra, **mcore_cpu.config_overrides(TransformerConfig))
    torch.manual_seed(mcfg.seed)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=mcfg.vocab_size, max_sequence_length=seq_length, position_embedding_type="rope",
                    rotary_base=int(mcfg.rope_theta), share_embeddings_and_output_weights=mcfg.tie_embeddings,
                    pre_process=pre_process, post_process=post_process)
