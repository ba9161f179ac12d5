"""RMSNorm for the non-TE layer spec.

megatron's local spec uses `torch.nn.RMSNorm` through `WrappedTorchNorm`, which refuses sequence
parallelism. With SP each TP rank normalises only its sequence chunk, so the weight's gradient is
partial and must be all-reduced over TP: megatron does that for parameters flagged
`sequence_parallel=True`, which this module sets. The arithmetic follows transformers' LlamaRMSNorm
(normalise in fp32, cast back, then scale) so bf16 results match HF as well.
"""
from __future__ import annotations

import torch

from mora_dist.models import kernels


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = kernels.compiled_rms_norm() if x.is_cuda else None
        return (fn or kernels.rms_norm)(x, self.weight, self.eps)
