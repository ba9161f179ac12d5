"""VeRA (Kopiczko et al., ICLR 2024): dW = diag(b) B diag(d) A.

A in R^{r x d_in_max} and B in R^{d_out_max x r} are frozen, Kaiming-uniform, drawn from one seeded
generator (A first, then B, as PEFT's `projection_prng_key` does) and shared by every adapted layer;
a layer uses A[:, :d_in] and B[:d_out, :]. They are regenerated from the seed on every rank, never
communicated, and are not saved as trainable state. Trainable: d in R^r (init 0.1), b in R^{d_out}
(init 0). Sharding: column-parallel keeps A, d replicated and B's rows, b's rows; row-parallel keeps
A's columns, B, d and b replicated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mora_dist.adapters.base import Adapter, Factors, MethodConfig, Shard, kaiming_uniform, register, to_rows

_SHARED: dict = {}


def shared_projections(seed: int, r: int, d_in_max: int, d_out_max: int):
    """The shared frozen (A, B) pair; one copy per process for all layers."""
    key = (seed, r, d_in_max, d_out_max)
    if key not in _SHARED:
        g = torch.Generator().manual_seed(seed)
        A = kaiming_uniform((r, d_in_max), g)
        B = kaiming_uniform((d_out_max, r), g)
        _SHARED[key] = (A, B)
    return _SHARED[key]


@dataclass
class VeRAConfig(MethodConfig):
    method: str = "vera"
    vera_d_init: float = 0.1  # initial value of every entry of d

    def __post_init__(self):
        super().__post_init__()
        d = self.vera_d_init
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
            raise ValueError(f"adapter.vera_d_init must be a finite number, got {d!r}")


@register("vera", VeRAConfig)
class VeRA(Adapter):
    layout = {"d": None, "b": "out"}

    def __init__(self, cfg: VeRAConfig, shard: Shard, seed: int = 0, d_in_max: int | None = None,
                 d_out_max: int | None = None):
        super().__init__(cfg, shard)
        d_in_max = d_in_max or shard.d_in
        d_out_max = d_out_max or shard.d_out
        if d_in_max < shard.d_in or d_out_max < shard.d_out:
            raise ValueError(f"VeRA shared projections ({d_in_max}, {d_out_max}) smaller than layer "
                             f"({shard.d_in}, {shard.d_out})")
        self.vera_in_max, self.vera_out_max = d_in_max, d_out_max
        A, B = shared_projections(cfg.seed, cfg.r, d_in_max, d_out_max)
        # non-persistent buffers: follow .to(device/dtype) but never enter a checkpoint
        self.register_buffer("A", A[:, shard.in_start:shard.in_end].clone(), persistent=False)
        self.register_buffer("B", B.index_select(0, shard.out_rows), persistent=False)
        self.d = nn.Parameter(torch.empty(cfg.r))
        self.b = nn.Parameter(torch.empty(len(shard.out_rows)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        self.d.fill_(self.cfg.vera_d_init)
        self.b.zero_()

    def forward(self, x):
        d = self.param("d", x, after_comm=False)
        b = self.param("b", x, after_comm=True)
        h = to_rows((x @ self.A.to(x.dtype).t()) * d, self.shard)
        return (h @ self.B.to(x.dtype).t()) * b

    def delta_weight(self):
        return self.b[:, None] * (self.B @ (self.d[:, None] * self.A))

    def factors(self, dtype, cast: bool = True):
        """P = A (frozen, identical for every layer of the same input width: computed once per
        fused layer), mid = d, Q = diag(b) B."""
        if not self.fast:
            return None
        key = ("vera", self.cfg.seed, self.cfg.r, self.vera_in_max, self.vera_out_max, self.shard.in_start,
               self.shard.in_end, self.A.device)
        A = getattr(self, "_A_cast", None)
        if A is None or A.dtype != dtype or A.device != self.A.device:
            A = self._A_cast = self.A.to(dtype)  # frozen: cast once (the wrapper caches its concatenation)
        mid, Q = self.merged_param("d"), _ScaleRows.apply(self.merged_param("b"), self.B)
        return Factors(P=A, mid=mid.to(dtype) if cast else mid, Q=Q.to(dtype) if cast else Q, p_key=key)


class _ScaleRows(torch.autograd.Function):
    """b[:, None] * B for VeRA's frozen B, which the backward holds by reference rather than as a saved
    tensor: the factors a layer casts once a step (`AdaptedLinear.begin_fixed`) serve the backward of every
    micro-batch, and a saved tensor is released after the first."""

    @staticmethod
    def forward(ctx, b, B):
        ctx.B = B
        return b[:, None] * B

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.B).sum(1), None
