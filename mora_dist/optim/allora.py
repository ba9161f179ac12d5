"""ALLoRA (Huang & Balestriero 2024, arXiv 2410.09692): a gradient rule over any adapter method, an
adaptive per-row learning rate; with it LoRA has no alpha/r scaling (and no dropout, as everywhere).

Configured on its own, beside the method: `adapter.allora: {eta: 2.0}` (null: off), the `ALLoRA`
dataclass below; the adapter config carries it (`MethodConfig.allora`) so every layer sees it. The
old key `adapter.allora_eta: 2.0` still works and says it is deprecated. This module imports nothing
from mora_dist: it reads an adapter only through `delta_weight()` and `shard`, so the layers above
(adapters/ for the config, parallel/ for the forward) may import it.

Checked against the paper (section 4.2 and its code listing in appendix F, 2026-11-24): for output
row i of the adapter's update dW, the gradient *of the layer output* that reaches the adapter's
parameters is multiplied by

    c_i = 1 / sqrt(||dW_{i,:}|| + 1/eta^2)        (norm not squared; maximum eta at dW_i = 0)

while the gradient reaching the layer input is left unchanged. eta plays the role of alpha/r; the
paper sweeps eta^2 in {1, 2, 4}, its listing defaults to 1/eta^2 = 1/4 (eta = 2), our default.
docs/design.md (the plan) had suggested 1/sqrt(||row||^2 + 1/eta^2) applied to each row of A and B separately
as an optimizer-side transform; that is not the paper's rule (A's gradient mixes all output rows,
B^T diag(c) g x^T, which cannot be recovered from A's plain gradient), so the rule lives here, in
the forward, and works for any adapter: the rows of dW are the adapter's output channels.

Implementation: the adapter runs twice on the same input, once with its parameters (gradient
scaled by c on the way back, input detached) and once with detached parameters (input gradient
only). Values are identical; the extra cost is one adapter forward, no extra backward work.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch.func import functional_call


@dataclass(frozen=True)
class ALLoRA:
    """`adapter.allora`: c_i = 1/sqrt(||dW_i|| + 1/eta^2) scales the gradient reaching row i's parameters."""

    eta: float = 2.0  # the paper listing's default (1/eta^2 = 1/4)

    def __post_init__(self):
        e = self.eta
        if isinstance(e, bool) or not isinstance(e, numbers.Real) or not math.isfinite(e) or e <= 0:
            raise ValueError(f"adapter.allora.eta must be a number > 0, got {e!r}")


@torch.no_grad()
def row_coefficients(adapter, eta: float) -> torch.Tensor:
    """c_i for the adapter's local output rows; row norms are completed over TP for row-parallel."""
    dw = adapter.delta_weight().float()
    sq = dw.pow(2).sum(dim=1)
    if adapter.shard.mode == "row" and adapter.shard.tp_size > 1:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    return torch.rsqrt(sq.sqrt() + 1.0 / eta**2)


def allora_forward(adapter, x: torch.Tensor, eta: float) -> torch.Tensor:
    c = row_coefficients(adapter, eta).to(x.dtype)
    y_params = adapter(x.detach())
    if y_params.requires_grad:
        y_params.register_hook(lambda g: g * c)
    if not x.requires_grad:
        return y_params
    frozen = {n: p.detach() for n, p in adapter.named_parameters()}
    y_input = functional_call(adapter, frozen, (x,))
    return y_params + (y_input - y_input.detach())
