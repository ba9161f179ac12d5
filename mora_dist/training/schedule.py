"""Learning-rate schedules: linear warm-up + cosine, and ReLoRA's jagged cosine.

Jagged (Lialin et al. 2023, used by the MoRA authors' ReMoRA): the base is warm-up then cosine to
min_lr_ratio * lr; after each restart at step t_k the LR ramps linearly over `restart_warmup`
steps from ~0 to the value the cosine has at the end of that ramp, then follows the cosine.
"""
from __future__ import annotations

import math


def cosine_lr(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def jagged_cosine_lr(step: int, lr: float, warmup: int, total: int, min_ratio: float, restart_every: int,
                     restart_warmup: int) -> float:
    base = cosine_lr(step, lr, warmup, total, min_ratio)
    if not restart_every or step < restart_every or step < warmup:
        return base
    since = step % restart_every
    if since >= restart_warmup:
        return base
    end = cosine_lr(step - since + restart_warmup, lr, warmup, total, min_ratio)
    return end * (since + 1) / (restart_warmup + 1)
