"""The model a training run adapts: a Llama-family GPTModel for this pipeline stage, from an HF
checkpoint directory (continual pretraining) or randomly initialised from `model.*` sizes."""
from __future__ import annotations

import torch


def llama_spec(mcfg):
    from mora_dist.models import LlamaSpec

    if mcfg.hf_dir:
        return LlamaSpec.from_hf(mcfg.hf_dir)
    return LlamaSpec(vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size, num_layers=mcfg.num_layers,
                     num_attention_heads=mcfg.num_attention_heads, num_query_groups=mcfg.num_query_groups,
                     ffn_hidden_size=mcfg.ffn_hidden_size, rms_norm_eps=mcfg.norm_eps, rope_theta=mcfg.rope_theta,
                     tie_word_embeddings=mcfg.tie_embeddings, max_position_embeddings=4096)


def build_for_training(mcfg, pcfg, recompute: bool, pre_process: bool, post_process: bool, seq_length: int,
                       compile: bool = True, vp_stage=None):
    """Random init (no hf_dir) draws layer by layer in construction order, so it differs between
    pipeline layouts; runs that must agree across PP sizes start from an HF directory. Under virtual
    pipeline stages (`vp_stage`) the chunks are built in order 0, 1, ...: the seed is set before the
    first, the later ones continue its random stream."""
    from mora_dist.models import build_model, load_hf_checkpoint

    dtype = torch.bfloat16 if mcfg.dtype == "bf16" else torch.float32
    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    if not vp_stage:
        torch.manual_seed(mcfg.seed)
    model = build_model(llama_spec(mcfg), pre_process, post_process, dtype, sequence_parallel=pcfg.sp,
                        compile=compile, vp_stage=vp_stage, **extra)
    if mcfg.hf_dir:
        load_hf_checkpoint(model, mcfg.hf_dir)
    return model
