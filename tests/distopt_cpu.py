"""Test-only: megatron-core 0.16's DistributedOptimizer on CPU ranks (gloo).

Its parameter bookkeeping tells fp32 from bf16 parameters by `param.type()` and accepts only the
CUDA names ('torch.cuda.FloatTensor', ...); every other step it takes (reduce-scatter and all-gather
over the DP group, torch AdamW on the shards, the norm and clip) runs on CPU tensors with gloo once
`mora_dist.compat.mcore_cpu` is applied. `apply()` makes a CPU tensor's `type()` (no arguments)
report the CUDA name, in the calling process only (a spawned test rank), so the tests exercise
megatron's real DistributedOptimizer code against torch AdamW. The training config refuses
train.optimizer=distributed without a GPU; tests set it after validation.
"""
import torch

_CUDA_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
               "torch.HalfTensor": "torch.cuda.HalfTensor"}
_applied = False


def apply() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True
    plain = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        if args or kwargs:  # a conversion, not a query
            return plain(self, *args, **kwargs)
        name = plain(self)
        return _CUDA_NAMES.get(name, name)

    torch.Tensor.type = cuda_named_type
