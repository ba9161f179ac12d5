"""Everything megatron-core 0.16 needs to run on a CPU-only torch with gloo, in one place.

megatron-core assumes CUDA in many places. On a machine without CUDA (tests, the CPU demo) we
patch the few entry points that are actually reached by GPTModel, the TP linears and the pipeline
schedules. `apply()` is a no-op when CUDA is available, so the GPU path never sees these patches.

Workarounds (found by running TP=2/4 linears, a TP=2 GPTModel and a PP=2 1F1B schedule on gloo):
1. `torch.cuda.current_device()` -> "cpu": RoPE and module buffers move tensors to it.
2. The CUDA RNG tracker's `fork()` and activation recompute's save/restore of the CUDA RNG state
   touch CUDA: made no-ops; tests use dropout 0
   (model-parallel RNG streams are meaningless on CPU), and `model_parallel_cuda_manual_seed` is
   replaced by seeding the CPU generator.
3. Tensor factories called with `device="cuda"` (zeros/empty/tensor/ones/full/arange: pipeline
   schedules, the default causal mask, ...) -> CPU.
4. `torch.cuda.synchronize` -> no-op (p2p communication calls it); `Tensor.cuda()` -> identity
   (tied embeddings at PP>1 move the weight to CUDA before the first/last-stage all-reduce).
5. Config flags (see `CPU_CONFIG_OVERRIDES`): `use_cpu_initialization=True`,
   `gradient_accumulation_fusion=False`, every `*_fusion=False`, `persist_layer_norm=False`.
   `RowParallelLinear` needs `skip_bias_add=` passed explicitly.
"""
from __future__ import annotations

import contextlib

import torch

CPU_CONFIG_OVERRIDES = dict(
    use_cpu_initialization=True,
    gradient_accumulation_fusion=False,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
)

_applied = False


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> None:
    """Patch torch/megatron for CPU use. Idempotent; does nothing when CUDA is available."""
    global _applied
    if _applied or not needed():
        return
    _applied = True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None

    def _cpu_device(kwargs):
        dev = kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def _on_cpu(factory):
        return lambda *a, **k: factory(*a, **_cpu_device(k))

    for name in ("zeros", "empty", "tensor", "ones", "full", "arange"):
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied embeddings at PP>1: weight.data.cuda()

    from megatron.core.tensor_parallel import random as mrandom

    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    # activation recompute saves/restores the CUDA RNG state around the recomputed forward
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None

    def _seed(seed, *a, **k):
        torch.manual_seed(seed)

    mrandom.model_parallel_cuda_manual_seed = _seed
    import megatron.core.tensor_parallel as tp

    tp.model_parallel_cuda_manual_seed = _seed


def require() -> None:
    """Raise when megatron would run on the CPU without the shim (a process entry point forgot `apply()`)."""
    if needed() and not _applied:
        raise RuntimeError("megatron-core on a CPU-only torch needs mora_dist.compat.mcore_cpu.apply() at the "
                           "start of the process (see mora_dist/compat/__init__.py)")


def config_overrides(config_cls=None) -> dict:
    """Config fields to force on CPU (empty on GPU); only those `config_cls` (a megatron config
    dataclass such as TransformerConfig or ModelParallelConfig) has, when given."""
    if not needed():
        return {}
    if config_cls is None:
        return dict(CPU_CONFIG_OVERRIDES)
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in CPU_CONFIG_OVERRIDES.items() if k in names}
