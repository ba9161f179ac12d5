"""The GPU kernels of the non-TE path: one place for what makes the frozen step fast on a GPU.

Measured on the 1.1B model of docs/design.md section 5 (H100, docs/performance.md): megatron's config
fusions (compiled SwiGLU, fused residual add, native fused vocab-parallel cross entropy) took the
frozen step from 142 to 129 ms; compiling our fp32 RMSNorm (7 elementwise kernels -> 1) and
megatron's unfused RoPE (cos/sin/rotate/cat -> 1) took it to 86 ms. RoPE is now a hand-written
pass each way (`mora_dist/kernels/rope.py`: the compiled one streamed at ~1 TB/s at the 8B shape),
and megatron's SwiGLU backward one pass of `mora_dist/kernels/swiglu.py` (the compiled
one: ~2.2 TB/s; ours ~4 TB/s; timed in docs/performance.md, 8B section). The output layer +
loss is `loss.linear_cross_entropy`; its per-chunk softmax passes are compiled here too. On the CPU
none of this is used (tests compare against float64/HF references with the plain eager arithmetic).
`build_model(compile=False)` (training: `train.compile: false`) keeps RMSNorm/RoPE/SwiGLU as megatron's; for
processes without a config (launch/bench.py, the research scripts) MORA_DIST_COMPILE=0 overrides the
default (`compile_default`). MORA_DIST_NO_KERNEL=rope,swiglu leaves the named hand-written kernels out (their
compiled megatron versions run instead): the A/B switch of the benches, and the first thing to try if one misbehaves.
"""
from __future__ import annotations

import os

import torch

from mora_dist.kernels import kernels_off, runs_on

CUDA_FUSIONS = dict(bias_activation_fusion=True, bias_dropout_fusion=True, cross_entropy_loss_fusion=True,
                    cross_entropy_fusion_impl="native")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm arithmetic: normalise in fp32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


_rms_norm_compiled = None


def compiled_rms_norm():
    """`rms_norm` under torch.compile on CUDA when enabled, else None (callers use the eager one)."""
    return _rms_norm_compiled


def compile_default() -> bool:
    """Whether `build_model` compiles when not told: yes, unless the override MORA_DIST_COMPILE=0 is set."""
    return os.environ.get("MORA_DIST_COMPILE", "1") != "0"


def rope_dispatch(fallback):
    """megatron's `_apply_rotary_pos_emb_bshd` with the one-pass Triton kernel (`kernels/rope.py`) where it
    serves (non-interleaved, whole-head rotation, CUDA or the interpreter), else `fallback` (same arguments)."""
    from mora_dist.kernels import rope

    def apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if not rotary_interleaved and not multi_latent_attention and rope.supports(t, freqs) and runs_on(t):
            return rope.apply(t, freqs, mscale)
        return fallback(t, freqs, rotary_interleaved, multi_latent_attention, mscale)

    return apply_rotary_pos_emb_bshd


def swiglu_back_dispatch(fallback):
    """megatron's `swiglu_back(g, y)` by the one-pass Triton kernel (`kernels/swiglu.py`: one read of y and
    g, one write, fp32 math and one rounding as the compiled formula) for 2-D inputs with unit last strides
    on CUDA or the interpreter, else `fallback`. Why: the compiled formula (a `cat` of two halves) streamed
    at ~2.2 TB/s in the 8B step (538 us a layer and micro-batch for 1.18 GB)."""
    from mora_dist.kernels import swiglu

    def swiglu_back(g, y):
        if (runs_on(y) and y.dim() == 2 and g.dim() == 2
                and g.dtype == y.dtype and y.shape == (g.shape[0], 2 * g.shape[1])
                and y.stride(1) == 1 and g.stride(1) == 1):
            return swiglu.swiglu_back(g, y)
        return fallback(g, y)

    return swiglu_back


def enable_compiled() -> None:
    """Compile RMSNorm, put the RoPE kernel (compiled megatron RoPE where it does not serve) in megatron's
    RoPE application and the SwiGLU backward kernel in its fused SwiGLU, once per process (CUDA only)."""
    global _rms_norm_compiled
    if _rms_norm_compiled is not None or not torch.cuda.is_available():
        return
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    _rms_norm_compiled = torch.compile(rms_norm, dynamic=False)
    from megatron.core.models.common.embeddings import rope_utils

    off = kernels_off()
    rope_compiled = torch.compile(rope_utils._apply_rotary_pos_emb_bshd, dynamic=False)
    rope_utils._apply_rotary_pos_emb_bshd = rope_compiled if "rope" in off else rope_dispatch(rope_compiled)
    if "swiglu" not in off:
        from megatron.core.fusions import fused_bias_swiglu  # SwiGLUFunction.backward looks it up per call

        fused_bias_swiglu.swiglu_back = swiglu_back_dispatch(fused_bias_swiglu.swiglu_back)
    from mora_dist.models import loss  # the loss chunk's softmax passes: one kernel each over bf16 logits

    loss._compiled.update(stats=torch.compile(loss._stats, dynamic=False),
                          grad=torch.compile(loss._probs_minus_onehot, dynamic=False))
