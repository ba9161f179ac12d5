"""The merged-weight path of an unsharded layer (TP=1): y = x (W0 + sum_i dW_i)^T as one GEMM.

Why (docs/performance.md): adding each adapter's update to the base output costs passes over the
layer's activations in both directions (LoRA: x @ A^T, a read-modify-write of the output, an
input-gradient GEMM and its accumulation into dx; MoRA rotation: block GEMMs over every chunk
and output tile). A layer's weight is far smaller than its activations (1.1B model, 8,192 tokens
a step: linear_fc1's weight holds 23M values, its output 92M), so the layer builds its effective
weight once a step, W = W0 + dW, and the forward and the input gradient cost exactly what the
frozen base costs. The parameter gradients come from (g, x) without the dense g^T x:

- factor adapters (`Factors`, delta = mid(x P^T) Q^T): H = x P^T for the layer's distinct P (one
  GEMM), then autograd of the surrogate sum_i <g_i Q_i, mid_i(H_i)>, whose gradients with respect
  to P, mid and Q are the layer's; ALLoRA scales Q's rows by c in the surrogate only, so the
  parameters see the row-scaled output gradient and x the plain one;
- MoRA block types (rotation, decouple): `blockdiag.block_grads`, the block-diagonal part of g^T x'.

Precision: W0 + dW is rounded once to W0's dtype (addmm/add accumulate in fp32), as the bf16
weights of mixed-precision full fine-tuning are; dW's gradients and the fp32 masters are exact.
W is kept for the backward: one extra copy of the adapted weights at peak memory.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mora_dist.adapters import blockdiag
from mora_dist.adapters.base import Factors


class Term(NamedTuple):
    """A factor adapter: its rows in the layer's output (`wrappers._row_blocks`: ("range", a, b) |
    ("blk", G, stride, off, w, pos) | ("idx", pos)), the index of its P among the layer's distinct
    P, and ALLoRA's row coefficients c (None without ALLoRA)."""
    rows: tuple
    slot: int
    c: Optional[torch.Tensor]


class Block(NamedTuple):
    """A MoRA block adapter: (geometry, segments) for `blockdiag`, ALLoRA's c (None without)."""
    plan: tuple
    c: Optional[torch.Tensor]


class Plan(NamedTuple):
    """The layer's adapters. The Function's tensors are the n_p distinct P, then (mid, Q) per term,
    then W_c per block."""
    n_p: int
    terms: tuple
    blocks: tuple


def apply_mid(h: torch.Tensor, mid: Optional[torch.Tensor]) -> torch.Tensor:
    if mid is None:
        return h
    return h * mid if mid.dim() == 1 else h @ mid.t()


@torch.no_grad()
def factor_row_coefficients(fac: Factors, eta: float) -> torch.Tensor:
    """ALLoRA's c_i = 1/sqrt(||dW_i|| + 1/eta^2) from the factors, dW = Q mid P, through the small
    Gram matrix mid P P^T mid^T (never the dense d_out x d_in update)."""
    P, Q = fac.P.float(), fac.Q.float()
    G = P @ P.t()
    if fac.mid is not None:
        m = fac.mid.float()
        G = m[:, None] * G * m[None, :] if m.dim() == 1 else m @ G @ m.t()
    sq = ((Q @ G) * Q).sum(1).clamp_min(0)
    return torch.rsqrt(sq.sqrt() + 1.0 / eta**2)


def _add_rows_(W: torch.Tensor, rows: tuple, Q: torch.Tensor, R: torch.Tensor) -> None:
    """W[rows] += Q @ R in place, rounded once."""
    if rows[0] == "range":
        W[rows[1]:rows[2]].addmm_(Q, R)
    elif rows[0] == "blk":
        _, G, stride, off, w, _ = rows
        W.view(G, stride, W.shape[1])[:, off:off + w].baddbmm_(Q.view(G, w, -1), R.expand(G, -1, -1))
    else:
        W.index_add_(0, rows[1], Q @ R)


def _split(plan: Plan, ts):
    nf = plan.n_p + 2 * len(plan.terms)
    return ts[:plan.n_p], [ts[plan.n_p + 2 * i:plan.n_p + 2 * i + 2] for i in range(len(plan.terms))], ts[nf:]


def _factor_grads(g2, x2, plan: Plan, ts, need) -> list:
    """Gradients of the factor tensors (P..., mid, Q, ...) through the surrogate of the module
    docstring: only skinny GEMMs over x (x P^T) and g (g Q and g^T Z)."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(ts, need)]
        Ps, pairs, _ = _split(plan, leaves)
        H = x2 @ (Ps[0] if len(Ps) == 1 else torch.cat(Ps)).t()
        Hs = H.split([p.shape[0] for p in Ps], 1)
        total, scat_z, scat_q = [], [], []
        for t, (mid, Q) in zip(plan.terms, pairs):
            Z = apply_mid(Hs[t.slot], mid)
            if t.c is not None:
                Q = Q * t.c[:, None]
            if t.rows[0] == "range":
                total.append(((g2[:, t.rows[1]:t.rows[2]] @ Q) * Z).sum())
            else:  # interleaved rows (q/k/v): one GEMM over g with a block-sparse Q for all of them
                scat_z.append(Z)
                scat_q.append(Q.new_zeros(g2.shape[1], Q.shape[1]).index_copy(0, t.rows[-1], Q))
        if scat_z:
            total.append(((g2 @ torch.cat(scat_q, 1)) * torch.cat(scat_z, 1)).sum())
        got = iter(torch.autograd.grad(sum(total), [t for t, n in zip(leaves, need) if n]))
    return [next(got) if n else None for n in need]


def _block_output_grad(g2: torch.Tensor, blocks) -> torch.Tensor:
    """g2 with ALLoRA block adapters' rows scaled by their c (a copy only when there are any)."""
    if all(b.c is None for b in blocks):
        return g2
    g2 = g2.clone()
    for b in blocks:
        if b.c is not None:
            for f0, f1, d0 in b.plan[1]:
                g2[:, d0:d0 + f1 - f0] *= b.c[f0:f1].to(g2.dtype)
    return g2


class MergedLinear(torch.autograd.Function):
    """y2 = x2 @ (W0 + every adapter's dW)^T for x2 [T, d_in] and the frozen W0 [n_out, d_in]."""

    @staticmethod
    def forward(ctx, x2, W0, plan: Plan, *ts):
        W = W0.detach().clone()
        Ps, pairs, Wcs = _split(plan, ts)
        for t, (mid, Q) in zip(plan.terms, pairs):
            P = Ps[t.slot]
            _add_rows_(W, t.rows, Q, P if mid is None else (mid[:, None] * P if mid.dim() == 1 else mid @ P))
        blockdiag.add_blocks_(W, [b.plan for b in plan.blocks], Wcs)
        ctx.plan = plan
        ctx.save_for_backward(x2, W, *ts)
        return x2 @ W.t()

    @staticmethod
    def backward(ctx, g):
        plan = ctx.plan
        x2, W, *ts = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        nf = plan.n_p + 2 * len(plan.terms)
        grads = [None] * len(ts)
        if any(need[:nf]):
            grads[:nf] = _factor_grads(g, x2, plan, ts[:nf], need[:nf])
        if plan.blocks and any(need[nf:]):
            grads[nf:] = blockdiag.block_grads(_block_output_grad(g, plan.blocks), x2,
                                               [b.plan for b in plan.blocks], ts[nf:], need[nf:])
        dx = g @ W if ctx.needs_input_grad[0] else None
        return (dx, None, None, *grads)
