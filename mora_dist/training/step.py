"""One optimizer step, the same for the Trainer (training/loop.py) and the research scripts
(launch/research/): zero the gradients, forward + loss + backward, the global gradient norm, clip,
optimizer step. The learning rate and restarts are the caller's (they differ per schedule).

What differs between callers is passed in: `forward_backward` (the Trainer: megatron's pipeline
schedule over micro-batches, then the DP gradient sync; a plain loop: `lambda: backward(loss_fn())`),
`grad_norm` (the Trainer: completed over TP/PP, on the host; a single process: `total_norm`, a
device tensor) and `zero_grad`. Clipping is one rule for both: scale by max_norm / (norm + 1e-6)
where norm > max_norm (torch's `clip_grad_norm_`); a tensor norm is applied as torch applies it
(clamped coefficient, no host sync), a float norm is tested on the host.

An optimizer that norms, clips and steps in one call (`clips_itself`: megatron's DistributedOptimizer
behind training/optimizer.py's `DistributedAdam`, whose gradients live in DP shards) gets `max_norm`
from its own config and returns the norm from `step()`; `grad_norm` is not called then.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

Norm = Union[float, torch.Tensor]


def backward(loss: torch.Tensor) -> torch.Tensor:
    """A plain loop's backward: returns the loss, detached."""
    loss.backward()
    return loss.detach()


def total_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients of one process (torch's, as `clip_grad_norm_` computes it)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def clip_(params: Sequence[torch.Tensor], norm: Norm, max_norm: float) -> None:
    """Scale the gradients by max_norm / (norm + 1e-6) when norm > max_norm; max_norm 0: no clipping."""
    if not max_norm:
        return
    if isinstance(norm, torch.Tensor):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    elif norm > max_norm:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], max_norm / (norm + 1e-6))


def optimizer_step(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], forward_backward: Callable,
                   max_norm: float, grad_norm: Callable[[Sequence[torch.Tensor]], Norm] = total_norm,
                   zero_grad: Optional[Callable[[], None]] = None):
    """Zero the gradients, run `forward_backward()` (it leaves the gradients in `p.grad` and returns
    the loss, in whatever form the caller wants back), clip to `max_norm`, step `opt`.
    Returns (loss, grad norm before clipping)."""
    if zero_grad is None:
        opt.zero_grad(set_to_none=True)
    else:
        zero_grad()
    loss = forward_backward()
    if getattr(opt, "clips_itself", False):
        return loss, opt.step()
    norm = grad_norm(params)
    clip_(params, norm, max_norm)
    opt.step()
    return loss, norm
