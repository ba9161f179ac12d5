"""LoRA (Hu et al. 2021): dW = s B A, A in R^{r x d_in} Kaiming-uniform, B in R^{d_out x r} zero,
s = alpha/r (rsLoRA: alpha/sqrt(r); with the ALLoRA rule, `adapter.allora`, s = 1). Sharding: column-parallel keeps A replicated and B's rows;
row-parallel keeps A's columns and B replicated."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mora_dist.adapters.base import Adapter, Factors, MethodConfig, Shard, kaiming_uniform, register, to_rows


@dataclass
class LoRAConfig(MethodConfig):
    method: str = "lora"
    alpha: float = 16.0
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r

    def __post_init__(self):
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"adapter.alpha must be > 0, got {a!r}")

    @property
    def scale(self) -> float:
        if self.allora is not None:  # ALLoRA is scaling-free
            return 1.0
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@register("lora", LoRAConfig)
class LoRA(Adapter):
    layout = {"A": "in", "B": "out"}

    def __init__(self, cfg: LoRAConfig, shard: Shard, seed: int = 0, scale: float | None = None):
        super().__init__(cfg, shard)
        self.scale = cfg.scale if scale is None else scale
        self.A = nn.Parameter(torch.empty(cfg.r, shard.local_in))
        self.B = nn.Parameter(torch.empty(len(shard.out_rows), cfg.r))
        self.reset_parameters(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        """A Kaiming-uniform (as nn.Linear / PEFT), B zero: the update starts at zero."""
        generator = generator or torch.Generator().manual_seed(0)
        self.A.copy_(self.shard_of("A", kaiming_uniform((self.cfg.r, self.shard.d_in), generator, a=math.sqrt(5))))
        self.B.zero_()

    def forward(self, x):
        A = self.param("A", x, after_comm=False)
        B = self.param("B", x, after_comm=True)
        h = to_rows(x @ A.t(), self.shard)
        return (h @ B.t()) * self.scale

    def delta_weight(self):
        return (self.B @ self.A) * self.scale

    def factors(self, dtype, cast: bool = True):
        if not self.fast:
            return None
        # mul.Scalar: its backward keeps the number, not a saved tensor (`tensor * float` would save a 0-dim
        # tensor, released after one backward), so these casts, made once a step, serve every micro-batch
        P, Q = self.merged_param("A"), torch.ops.aten.mul.Scalar(self.merged_param("B"), self.scale)
        return Factors(P=P.to(dtype), Q=Q.to(dtype)) if cast else Factors(P=P, Q=Q)
