"""The output layer and the cross-entropy loss as one chunked, vocab-parallel operation.

Why: at Llama-3 vocabularies (128,256) the plain path (megatron's `output_layer` then its fused
cross entropy) holds [tokens x vocab] logits and their gradient (bf16 and fp32 copies: ~6 GiB for
one 8B micro-batch of 4,096 tokens), and at micro-batch 1 its [s, 1, h] activations reach
`torch.matmul` with a stride that makes it a batched GEMV (the output weight re-read for every
token: 869 of 1,106 ms of an 8B step, docs/performance.md). Here the hidden states are a 2-D
[tokens, h] matrix and the logits exist one chunk of tokens at a time:

  forward, per chunk: z = x W^T (the rank's vocab shard), the row max and the sum of exp(z - max)
  completed over TP (vocab-parallel: all-reduce MAX, then one SUM of [sum exp, target logit]),
  loss = lse - z[target]; with a frozen W it also keeps D = (softmax(z) - onehot) W [tokens, h]:
  the loss gradient is g_t (p_t - e_t), linear in the per-token upstream gradient g_t, so the
  backward is dx = g * D (an elementwise pass) and the logits are never recomputed;
  with a trainable W (full fine-tuning, ReLoRA's head) the backward recomputes each chunk's
  logits for dW = G^T x and dx = G W.

TP/SP: x arrives as the rank's sequence shard under SP or replicated (gradient all-reduced); D and
dx are partial sums over the vocabulary shards. Under SP with a frozen W (`_LinearCrossEntropySP`)
the sum goes in the forward, where it hides behind the next chunk's logits GEMM: each chunk's D is
summed straight onto the rank that owns its rows (an asynchronous reduce, not a reduce-scatter of
[tokens, h] in the backward, which at 8B / TP=2 cost 1-2 ms a micro-batch with nothing to hide
behind). Every rank walks the rows in the same order (the softmax statistics are all-reduced row
by row), so the all-gather of x cannot hide behind a rank's own rows here; the backward
is then dx = g * D on the rank's own rows, with no collective. This is exact because the per-token
upstream gradient g is the same on every TP rank (each computes the same loss). With a trainable W
the megatron mapping is used (all-gather forward, reduce-scatter backward).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

CHUNK_ELEMS = 1 << 27  # logits per chunk: 128M (0.5 GiB in fp32); 8B at 4,096 tokens: 4 chunks of 1,024
_compiled = {}  # name -> torch.compile'd chunk function (CUDA, models/kernels.enable_compiled)


def _stats(z: torch.Tensor, m: torch.Tensor, tgt: torch.Tensor, hit: torch.Tensor):
    """sum_v exp(z - m) and the target logit (0 where the target is outside this vocab shard)."""
    zf = z.to(m.dtype)
    s = torch.exp(zf - m[:, None]).sum(-1)
    t = torch.where(hit, zf.gather(1, tgt[:, None]).squeeze(1), 0.0)
    return s, t


def _probs_minus_onehot(z: torch.Tensor, lse: torch.Tensor, tgt: torch.Tensor, hit: torch.Tensor):
    """softmax(z) - onehot(target) in z's dtype (the loss gradient per unit upstream gradient)."""
    p = torch.exp(z.to(lse.dtype) - lse[:, None])
    cols = torch.arange(z.shape[1], device=z.device)
    onehot = (cols[None, :] == tgt[:, None]) & hit[:, None]
    return (p - onehot.to(p.dtype)).to(z.dtype)


def _fn(name):
    return _compiled.get(name) or {"stats": _stats, "grad": _probs_minus_onehot}[name]


def _all_reduce(t: torch.Tensor, op, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in fp32 (float64 inputs stay float64: the tests' exact reference)."""
    return torch.promote_types(dtype, torch.float32)


def _chunks(n: int, vocab: int, chunk_elems: int):
    step = max(1, min(n, chunk_elems // max(vocab, 1)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _local_targets(labels: torch.Tensor, v0: int, vl: int):
    """(target column in this vocab shard [v0, v0 + vl), 0 where outside; whether it is inside)."""
    loc = labels - v0
    hit = (loc >= 0) & (loc < vl)
    return torch.where(hit, loc, 0), hit


def _lse_and_loss(z, tgt, hit, group):
    m = z.max(-1).values.to(_acc(z.dtype))
    _all_reduce(m, dist.ReduceOp.MAX, group)
    s, t = _fn("stats")(z, m, tgt, hit)
    st = torch.stack([s, t])
    _all_reduce(st, dist.ReduceOp.SUM, group)
    lse = m + torch.log(st[0])
    return lse, lse - st[1]


class _LinearCrossEntropy(torch.autograd.Function):
    """loss [N] (fp32) of x [N, h] against W [V_local, h] (vocab rows [v0, v0 + V_local)), labels [N]."""

    @staticmethod
    def forward(ctx, x, weight, labels, v0: int, group, chunk_elems: int):
        n, vl = x.shape[0], weight.shape[0]
        tgt, hit = _local_targets(labels, v0, vl)
        loss = torch.empty(n, dtype=_acc(x.dtype), device=x.device)
        lse = torch.empty_like(loss)
        keep_d = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        D = torch.empty_like(x) if keep_d else None
        for a, b in _chunks(n, vl, chunk_elems):
            z = x[a:b] @ weight.t()
            lse[a:b], loss[a:b] = _lse_and_loss(z, tgt[a:b], hit[a:b], group)
            if keep_d:
                torch.mm(_fn("grad")(z, lse[a:b], tgt[a:b], hit[a:b]), weight, out=D[a:b])
        ctx.group, ctx.chunk_elems, ctx.keep_d = group, chunk_elems, keep_d
        if keep_d:
            ctx.save_for_backward(D)
        elif any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(x, weight, lse, tgt, hit)
        return loss

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        if ctx.keep_d:  # frozen W: dx = g * D
            (D,) = ctx.saved_tensors
            return D * g[:, None].to(D.dtype), None, None, None, None, None
        x, weight, lse, tgt, hit = ctx.saved_tensors
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=_acc(weight.dtype), device=weight.device) if ctx.needs_input_grad[1] else None
        for a, b in _chunks(x.shape[0], weight.shape[0], ctx.chunk_elems):
            z = x[a:b] @ weight.t()
            G = _fn("grad")(z, lse[a:b], tgt[a:b], hit[a:b]) * g[a:b, None].to(z.dtype)
            if dx is not None:
                torch.mm(G, weight, out=dx[a:b])
            if dw is not None:
                dw.add_((G.t() @ x[a:b]).to(dw.dtype))
        return dx, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None


class _LinearCrossEntropySP(torch.autograd.Function):
    """loss [N] (replicated) of the rows all-gathered from x_loc [N/tp, h] (this rank's sequence block,
    rank-major) against a frozen W [V_local, h]; the gradient of x_loc (see the module docstring)."""

    @staticmethod
    def forward(ctx, x_loc, weight, labels, v0: int, group, chunk_elems: int):
        n_tp, r, m = dist.get_world_size(group), dist.get_rank(group), x_loc.shape[0]
        vl = weight.shape[0]
        tgt, hit = _local_targets(labels, v0, vl)
        X = x_loc.new_empty(n_tp * m, x_loc.shape[1])
        dist.all_gather_into_tensor(X, x_loc.contiguous(), group=group)
        loss = torch.empty(n_tp * m, dtype=_acc(x_loc.dtype), device=x_loc.device)
        D = torch.empty_like(x_loc)  # sum over the vocabulary shards of this rank's rows
        sums = []  # (work, buffer): the buffer must live until its reduce is done
        for j in range(n_tp):  # every rank in the same row order: the softmax statistics are summed row-wise
            for a, b in _chunks(m, vl, chunk_elems):
                i0, i1 = j * m + a, j * m + b
                z = X[i0:i1] @ weight.t()
                lse, loss[i0:i1] = _lse_and_loss(z, tgt[i0:i1], hit[i0:i1], group)
                d = D[a:b] if j == r else x_loc.new_empty(b - a, x_loc.shape[1])
                torch.mm(_fn("grad")(z, lse, tgt[i0:i1], hit[i0:i1]), weight, out=d)
                sums.append((dist.reduce(d, dst=dist.get_global_rank(group, j), group=group, async_op=True), d))
        for work, _ in sums:
            work.wait()
        ctx.rows = (r * m, (r + 1) * m)
        ctx.save_for_backward(D)
        return loss

    @staticmethod
    def backward(ctx, g):
        (D,) = ctx.saved_tensors
        a, b = ctx.rows
        return D * g[a:b, None].to(D.dtype), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         tp_group=None, sequence_parallel: bool = False, sp_forward_reduce: bool = True,
                         chunk_elems: Optional[int] = None) -> torch.Tensor:
    """Per-token loss [b, s] (fp32; float64 for float64 inputs) of hidden states [s(/tp under SP), b, h] through the
    vocab-parallel output weight [V/tp, h] (this rank's rows), labels [b, s] (global ids). sp_forward_reduce
    (`parallel.overlap_sp_loss`): under SP with a frozen W, `_LinearCrossEntropySP`; False: megatron's mapping."""
    from megatron.core.tensor_parallel import mappings

    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    flat = labels.t().reshape(-1)  # [b, s] -> token order of the (gathered) [s * b, h] rows
    if tp > 1 and sequence_parallel and sp_forward_reduce and not weight.requires_grad:
        s_loc, b, h = hidden.shape
        v0 = dist.get_rank(tp_group) * weight.shape[0]
        loss = _LinearCrossEntropySP.apply(hidden.reshape(s_loc * b, h), weight, flat, v0, tp_group,
                                           chunk_elems or CHUNK_ELEMS)
        return loss.view(s_loc * tp, b).t()
    if tp > 1:
        if sequence_parallel:
            hidden = mappings.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                                   group=tp_group)
        else:
            hidden = mappings.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    x = hidden.reshape(s * b, h)  # a true 2-D matrix (a [s, 1, h] view may carry a stride that matmul batches over)
    v0 = dist.get_rank(tp_group) * weight.shape[0] if tp > 1 else 0
    loss = _LinearCrossEntropy.apply(x, weight, flat, v0, tp_group if tp > 1 else None,
                                     chunk_elems or CHUNK_ELEMS)
    return loss.view(s, b).t()
