"""Build a Llama-family decoder as a megatron-core `GPTModel` for the calling pipeline stage.

Parallel sizes come from megatron's parallel_state (call `init_distributed(tp, pp)` first), so a
training loop calls `build_model(spec)` once per stage (or once per virtual stage with vp_stage).
RoPE inverse frequencies are set from `rope_inv_freq` (transformers' formulas incl. llama3
scaling) rather than megatron's `rope_scaling`, which hard-codes llama3's low/high factors and
original context length.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn.functional as F

from mora_dist.models import kernels
from mora_dist.models.config import LlamaSpec, rope_inv_freq
from mora_dist.models.embedding import replicate_when_frozen
from mora_dist.models.loss import linear_cross_entropy
from mora_dist.models.spec import llama_block_spec
from mora_dist.compat import mcore_cpu


def _gpt_model_class():
    """megatron's GPTModel with the output layer + loss as one chunked vocab-parallel operation
    (`loss.linear_cross_entropy`) whenever labels are given, and [s, b, h] activations with
    canonical strides at micro-batch 1 (see `_canonical_strides`)."""
    from megatron.core.models.gpt import GPTModel

    class LlamaGPTModel(GPTModel):
        sp_forward_reduce = True  # parallel.overlap_sp_loss (training/loop.py sets it per model)

        def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
            plain = (labels is None or not self.post_process or self.mtp_process
                     or self.config.mtp_num_layers is not None or kwargs.get("inference_context") is not None)
            if plain:
                return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
            weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                      else self.output_layer.weight)
            return linear_cross_entropy(hidden_states, weight, labels, tp_group=self.pg_collection.tp,
                                        sequence_parallel=self.output_layer.sequence_parallel,
                                        sp_forward_reduce=self.sp_forward_reduce)

    return LlamaGPTModel


def _canonical_strides(module, inputs, out):
    """Embedding output [s, 1, h] made with canonical strides. megatron transposes [b, s, h] to
    [s, b, h] and calls .contiguous(), a no-op at b = 1 (size-1 dims are ignored), so the tensor
    keeps stride s*h on its batch dim; `torch.matmul` then refuses to fold [s, 1, h] into a
    matrix and runs a batched GEMV over s (docs/performance.md, 8B section)."""
    s, b, h = out.shape
    if out.stride() != (b * h, h, 1):
        return out.reshape(s * b, h).view(s, b, h)
    return out


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 1) -> int:
    """Vocab rounded up to a multiple of divisible_by * tp (the embedding is split by rows).

    Padding rows are zero after import; their logits take part in a plain softmax, so keep
    divisible_by=1 (pad only when TP requires it) to match HF losses, or mask them.
    """
    m = divisible_by * tp_size
    return -(-vocab_size // m) * m


def transformer_config(spec: LlamaSpec, params_dtype: torch.dtype = torch.float32,
                       sequence_parallel: bool = False, **overrides):
    """megatron TransformerConfig for `spec` with the current TP/PP sizes (CPU fixes applied)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    mcore_cpu.require()
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    if spec.num_query_groups % tp or spec.num_attention_heads % tp or spec.ffn_hidden_size % tp:
        raise ValueError(
            f"TP={tp} must divide num_query_groups ({spec.num_query_groups}), num_attention_heads "
            f"({spec.num_attention_heads}) and ffn_hidden_size ({spec.ffn_hidden_size})"
        )
    if spec.num_layers % pp:
        raise ValueError(f"PP={pp} must divide num_layers ({spec.num_layers})")
    vpp = (ps.get_virtual_pipeline_model_parallel_world_size() or 1) if pp > 1 else 1
    if spec.num_layers % (pp * vpp):
        raise ValueError(f"PP={pp} x VPP={vpp} must divide num_layers ({spec.num_layers})")
    kw = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # interleaved schedule: layers per model chunk and their global offsets follow from it
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        window_size=(spec.sliding_window - 1, 0) if spec.sliding_window else None,
    )
    if vpp > 1:
        # megatron-LM's P2P setting for the interleaved schedule: one isend/irecv per direction (at PP=2
        # the two directions on separate communicators). Batched, a step's four transfers go to one
        # peer at PP=2, and its activation and gradient sends meet the peer's receives in the wrong order.
        kw.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    kw.update(mcore_cpu.config_overrides())
    if torch.cuda.is_available():
        kw.update(kernels.CUDA_FUSIONS)
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_model(
    spec: Union[LlamaSpec, str, os.PathLike],
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    *,
    attention: str = "auto",
    sequence_parallel: bool = False,
    parallel_output: bool = True,
    vp_stage: Optional[int] = None,
    make_vocab_size_divisible_by: int = 1,
    compile: Optional[bool] = None,
    **config_overrides,
):
    """GPTModel for this rank's pipeline stage; `spec` may be a LlamaSpec or an HF model dir.

    pre_process/post_process default to whether this rank is the first/last pipeline stage.
    attention: "auto" (TE if installed, else SDPA), "te", "sdpa" or "local" (megatron's reference).
    parallel_output=True keeps logits vocab-sharded over TP (for vocab-parallel cross entropy).
    Weights are randomly initialised; use `load_hf_checkpoint` to import a checkpoint.
    On a GPU the model is moved to the current device and the fast kernels of `kernels.py` are on
    (megatron's fused SwiGLU / residual / cross entropy, and, unless `compile` is False, compiled
    RMSNorm and RoPE; None: `kernels.compile_default()`, on unless MORA_DIST_COMPILE=0).
    The returned model carries `llama_spec` (for export) and `vocab_size_padded`.
    """
    from megatron.core import parallel_state as ps

    if not isinstance(spec, LlamaSpec):
        spec = LlamaSpec.from_hf(spec)
    config = transformer_config(spec, params_dtype, sequence_parallel, **config_overrides)
    if config.virtual_pipeline_model_parallel_size and vp_stage is None:
        raise ValueError(f"virtual pipeline stages are on (VPP={config.virtual_pipeline_model_parallel_size}): "
                         "build each model chunk with vp_stage=0..VPP-1")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    vocab = padded_vocab_size(spec.vocab_size, config.tensor_model_parallel_size, make_vocab_size_divisible_by)
    model = _gpt_model_class()(
        config=config,
        transformer_layer_spec=llama_block_spec(config, attention, vp_stage),
        vocab_size=vocab,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        vp_stage=vp_stage,
    )
    if pre_process:
        model.embedding.register_forward_hook(_canonical_strides)
        replicate_when_frozen(model.embedding.word_embeddings)  # TP > 1 with SP: no reduce-scatter while frozen
    rope = model.rotary_pos_emb
    rope.inv_freq = rope_inv_freq(spec).to(rope.inv_freq.device)
    if hasattr(type(rope).forward, "cache_clear"):  # forward() is lru_cached on (self, seq_len)
        type(rope).forward.cache_clear()
    model.llama_spec = spec
    model.vocab_size_padded = vocab
    if torch.cuda.is_available():
        if kernels.compile_default() if compile is None else compile:
            kernels.enable_compiled()
        model.cuda()  # megatron makes its linears on the GPU; our RMSNorm weights start on the CPU
    return model
