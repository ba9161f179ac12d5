"""Adapters around megatron-core's tensor-parallel linears (DESIGN.md section 3).

`AdaptedLinear` replaces a `ColumnParallelLinear` / `RowParallelLinear` in its parent and keeps
the base layer (and so its weight shards, init and checkpoint layout) inside it. One wrapped layer
can hold several adapters, each owning some of the layer's local output rows: a fused layer such
as `linear_qkv` carries the canonical q, k and v adapters (`positions` are their rows in the
rank's local output). Column-parallel: the base runs unchanged and each adapter's rows are added to
its local output. Row-parallel: the wrapper runs the base matmul, adds the adapters' partial outputs,
and only then does the layer's all-reduce (reduce-scatter under SP), mirroring megatron's
`RowParallelLinear.forward`, so adapters cost no extra communication.

On an unsharded layer (TP=1) the adapters run through `_fused_out`: their `Factors` as a few
skinny GEMMs per layer accumulated in place into the base output (docs/performance.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mora_dist.adapters import base as _adapters_base
from mora_dist.adapters.base import Adapter, Factors
from mora_dist.adapters.blockdiag import BlockDiagAdd
from mora_dist.optim.allora import allora_forward


def _apply_mid(h: torch.Tensor, mid: Optional[torch.Tensor]) -> torch.Tensor:
    if mid is None:
        return h
    return h * mid if mid.dim() == 1 else h @ mid.t()


def _mid_block(mid: Optional[torch.Tensor], k: int, like: torch.Tensor) -> torch.Tensor:
    if mid is None:
        return torch.eye(k, dtype=like.dtype, device=like.device)
    return torch.diag(mid) if mid.dim() == 1 else mid


def _row_blocks(pos: torch.Tensor, n: int):
    """Output rows `pos` of an n-wide layer as a strided view: ("blk", G, stride, off, w, pos)
    when pos = off + stride * g + i (g < G, i < w) with G * stride == n (q/k/v in the fused qkv
    layer: one block per query group), else ("idx", pos)."""
    p = pos.cpu()
    d = len(p)
    if d:
        w = 1
        while w < d and int(p[w]) == int(p[w - 1]) + 1:
            w += 1
        G = d // w
        stride = int(p[w] - p[0]) if G > 1 else n
        off = int(p[0])
        if (G * w == d and stride > 0 and G * stride == n and off + w <= stride and torch.equal(
                p, (off + stride * torch.arange(G)[:, None] + torch.arange(w)[None, :]).reshape(-1))):
            return ("blk", G, stride, off, w, pos)
    return ("idx", pos)


def _dst(o2, rows):
    """The destination of a term in the 2-D output: a slice or block view, or None (scatter)."""
    n = o2.shape[1]
    if rows[0] == "range":
        return o2 if (rows[1], rows[2]) == (0, n) else o2[:, rows[1]:rows[2]]
    if rows[0] == "blk":
        _, G, stride, off, w, _ = rows
        return o2.view(o2.shape[0], G, stride)[:, :, off:off + w]
    return None


def _segments(rows):
    """An adapter's output rows as ((first row, end, output column), ...) for blockdiag, or None."""
    if rows[0] == "range":
        return ((0, rows[2] - rows[1], rows[1]),)
    if rows[0] == "blk":
        _, G, stride, off, w, _ = rows
        return tuple((g * w, (g + 1) * w, g * stride + off) for g in range(G))
    return None


class _AddLowRank(torch.autograd.Function):
    """out += every term, in place on the base layer's fresh output, with no autograd views (an
    in-place op on a slice view records CopySlices, whose backward clones the whole output
    gradient: 14 ms a step of device copies for LoRA on the 1.1B model). Terms, per `plan` entry
    (kind, rows), rows = ("range", a, b) | ("blk", ...) | ("idx", pos) (`_row_blocks`):
    "mm": out[:, rows] += Z @ Q^T (range rows: addmm_ into the slice; other rows: all such terms
    in one GEMM with a block-sparse Q over the whole output);  "add": out[:, rows] += Z.
    The output gradient passes through unchanged; Z, Q get theirs from the rows they wrote."""

    @staticmethod
    def forward(ctx, out, plan, *zq):
        n = out.shape[-1]
        o2 = out.view(-1, n)
        scat = []
        for i, (kind, rows) in enumerate(plan):
            Z, Q = zq[2 * i], zq[2 * i + 1]
            if kind == "mm":
                if rows[0] == "range":
                    _dst(o2, rows).addmm_(Z, Q.t())
                else:
                    scat.append(i)
            else:
                dst = _dst(o2, rows)
                if dst is None:
                    o2.index_add_(1, rows[1], Z)
                else:
                    dst.add_(Z.reshape(dst.shape))
        Qf = None
        if scat:
            Qs = [zq[2 * i + 1] for i in scat]
            Qf = torch.cat([Q.new_zeros(n, Q.shape[1]).index_copy_(0, plan[i][1][-1], Q) for i, Q in zip(scat, Qs)], 1)
            o2.addmm_(torch.cat([zq[2 * i] for i in scat], 1) if len(scat) > 1 else zq[2 * scat[0]], Qf.t())
        ctx.mark_dirty(out)
        ctx.plan, ctx.scat, ctx.Qf = plan, scat, Qf
        ctx.save_for_backward(*[t if plan[i // 2][0] == "mm" else None for i, t in enumerate(zq)])
        return out

    @staticmethod
    def backward(ctx, g):
        n = g.shape[-1]
        g2 = g.reshape(-1, n)
        zq = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        grads = [None] * len(zq)
        for i, (kind, rows) in enumerate(ctx.plan):
            if i in ctx.scat:
                continue
            gi = _dst(g2, rows)
            gi = g2.index_select(1, rows[1]) if gi is None else gi
            if kind == "add":
                grads[2 * i] = gi.reshape(g2.shape[0], -1) if need[2 * i] else None
                continue
            Z, Q = zq[2 * i], zq[2 * i + 1]
            grads[2 * i] = gi @ Q if need[2 * i] else None
            grads[2 * i + 1] = gi.t() @ Z if need[2 * i + 1] else None
        if ctx.scat:
            ks = [zq[2 * i + 1].shape[1] for i in ctx.scat]
            if any(need[2 * i] for i in ctx.scat):
                for i, gz in zip(ctx.scat, (g2 @ ctx.Qf).split(ks, 1)):
                    grads[2 * i] = gz if need[2 * i] else None
            if any(need[2 * i + 1] for i in ctx.scat):
                Zc = torch.cat([zq[2 * i] for i in ctx.scat], 1) if len(ctx.scat) > 1 else zq[2 * ctx.scat[0]]
                gQf = g2.t() @ Zc
                c = 0
                for i, k in zip(ctx.scat, ks):
                    if need[2 * i + 1]:
                        grads[2 * i + 1] = gQf[:, c:c + k].index_select(0, ctx.plan[i][1][-1])
                    c += k
        return (g, None, *grads)


@torch.no_grad()
def _row_coefficients(fac: Factors, eta: float) -> torch.Tensor:
    """ALLoRA's c_i = 1/sqrt(||dW_i|| + 1/eta^2) from the factors, dW = Q mid P, through the small
    Gram matrix mid P P^T mid^T (never the dense d_out x d_in update)."""
    P, Q = fac.P.float(), fac.Q.float()
    G = P @ P.t()
    if fac.mid is not None:
        m = fac.mid.float()
        G = m[:, None] * G * m[None, :] if m.dim() == 1 else m @ G @ m.t()
    sq = ((Q @ G) * Q).sum(1).clamp_min(0)
    return torch.rsqrt(sq.sqrt() + 1.0 / eta**2)


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Module, mode: str):
        super().__init__()
        if mode not in ("column", "row"):
            raise ValueError(f"mode must be column or row, got {mode!r}")
        self.base, self.mode = base, mode
        self.adapters = nn.ModuleDict()
        self._positions: dict[str, Optional[torch.Tensor]] = {}
        self._rows: dict[str, tuple] = {}
        self.merged = False

    def add_adapter(self, name: str, adapter: Adapter, positions: Optional[torch.Tensor] = None) -> None:
        """`positions`: the adapter's rows in the local output (None: all rows, in order)."""
        n_local = self.base.weight.shape[0]
        if positions is None and len(adapter.out_rows) != n_local:
            raise ValueError(f"adapter {name!r} computes {len(adapter.out_rows)} rows, layer has {n_local}")
        self.adapters[name] = adapter
        # the adapter's output rows for the fused path: contiguous [a, b) (or all rows) are
        # written through a slice view, regular blocks (q/k/v) through a strided view
        self._rows[name] = ("range", 0, n_local)
        if positions is not None:
            positions = torch.as_tensor(positions, dtype=torch.long).cpu()
            a = int(positions[0]) if len(positions) else 0
            contiguous = torch.equal(positions, torch.arange(a, a + len(positions)))
            # on the layer's device (the model may already be on the GPU when adapters are added)
            positions = positions.to(self.base.weight.device)
            self.register_buffer(f"_pos_{name}", positions, persistent=False)
            self._rows[name] = ("range", a, a + len(positions)) if contiguous else _row_blocks(positions, n_local)
        self._positions[name] = positions

    def _adapter_out(self, x, out):
        """out (the base's fresh output, local rows) + every adapter's update, in place."""
        if not _adapters_base.FAST_PATH:  # the original per-adapter path (reference, before/after)
            for name, adapter in self.adapters.items():
                eta = adapter.cfg.allora_eta
                delta = (adapter(x) if eta is None else allora_forward(adapter, x, eta)).to(out.dtype)
                pos = self._positions[name]
                out = out + delta if pos is None else out.index_add(-1, getattr(self, f"_pos_{name}"), delta)
            return out
        if all(a.unsharded for a in self.adapters.values()):
            return self._fused_out(x, out)
        for name, adapter in self.adapters.items():  # sharded (TP > 1): each adapter's own TP-aware forward
            eta = adapter.cfg.allora_eta
            delta = (adapter(x) if eta is None else allora_forward(adapter, x, eta)).to(out.dtype)
            pos = self._positions[name]
            if pos is None:
                out = out.add_(delta)
            else:
                out = out.index_add_(-1, getattr(self, f"_pos_{name}"), delta)
        return out

    def _fused_out(self, x, out):
        """All adapters of this (unsharded) layer as skinny GEMMs on x, accumulated into the base
        output in place (docs/performance.md):

        1. one GEMM H = x @ [P_1; P_2; ...]^T over the distinct down-factors (q/k/v share one pass
           over x; VeRA's shared A and MoRA's equal compress maps are computed once);
        2. the small mids (MoRA's M, VeRA's d) as one block GEMM Z = H @ Mid^T;
        3. out[:, rows] += Z_i @ Q_i^T by `addmm_` on a slice view of the output when the adapter's
           rows are contiguous (gate/up, o, down), else by one addmm_ with a block-sparse Q over
           the whole output (q/k/v rows interleave per query group).
        ALLoRA adapters add three terms (values cancel) that route the scaled gradient to the
        parameters and the plain one to x. MoRA block types (rotation, decouple) of the layer
        accumulate in place through strided batched GEMMs, all in one `blockdiag.BlockDiagAdd`."""
        x2 = x.reshape(-1, x.shape[-1])
        if not out.is_contiguous():
            out = out.contiguous()
        dt = out.dtype
        plan, zq = [], []

        def term(kind, name, Z, Q):
            rows = self._rows[name]
            if rows[0] != "range":  # the index buffer as it is now (follows .to(device))
                rows = rows[:-1] + (getattr(self, f"_pos_{name}"),)
            plan.append((kind, rows))
            zq.extend((Z, Q))

        shared = []  # fused adapters: (name, fac)
        blocks = []  # MoRA block types: ((geometry, segments), chunk matrices)
        for name, adapter in self.adapters.items():
            fac = adapter.factors(dt)
            eta = adapter.cfg.allora_eta
            block = adapter.block_operator(dt) if fac is None and eta is None else None
            segments = _segments(self._rows[name]) if block is not None else None
            if segments is not None:  # MoRA rotation/decouple: strided batched GEMMs (blockdiag.py)
                blocks.append(((block[0], segments), block[1]))
            elif fac is None:
                delta = (adapter(x) if eta is None else allora_forward(adapter, x, eta)).to(dt)
                term("add", name, delta.reshape(-1, delta.shape[-1]), None)
            elif eta is not None:
                c = _row_coefficients(fac, eta).to(dt)
                if fac.P.requires_grad:
                    h_x, h_p = x2 @ fac.P.detach().t(), x2.detach() @ fac.P.t()
                else:
                    h_x = x2 @ fac.P.t()
                    h_p = h_x.detach()
                mid = fac.mid
                z_x = _apply_mid(h_x, None if mid is None else mid.detach())
                z_p = _apply_mid(h_p, mid)
                cq = fac.Q * c[:, None]
                term("mm", name, torch.cat((z_x, z_p, -z_p.detach()), 1), torch.cat((fac.Q.detach(), cq, cq.detach()), 1))
            else:
                shared.append((name, fac))
        if shared:
            # distinct down-factors, in order of first use
            keys, Ps, seg = {}, [], []
            for i, (name, fac) in enumerate(shared):
                key = fac.p_key if fac.p_key is not None else ("adapter", i)
                if key not in keys:
                    keys[key] = (sum(p.shape[0] for p in Ps), fac.P.shape[0])
                    Ps.append(fac.P)
                seg.append(keys[key])
            H = x2 @ self._cat_frozen(Ps).t()
            ks = [fac.Q.shape[1] for _, fac in shared]
            if len(Ps) == len(shared) and all(fac.mid is None for _, fac in shared):
                Z = H
            elif len(shared) == 1:
                Z = _apply_mid(H, shared[0][1].mid)
            else:
                Mid = H.new_zeros(sum(ks), H.shape[1])
                r = 0
                for (name, fac), (a, k), k2 in zip(shared, seg, ks):
                    Mid[r:r + k2, a:a + k] = _mid_block(fac.mid, k, H)
                    r += k2
                Z = H @ Mid.t()
            r = 0
            for (name, fac), k2 in zip(shared, ks):
                term("mm", name, Z if k2 == Z.shape[1] else Z[:, r:r + k2], fac.Q)
                r += k2
        if blocks:
            out = BlockDiagAdd.apply(out, x2, [p for p, _ in blocks], *[w for _, w in blocks])
        return _AddLowRank.apply(out, plan, *zq)

    def _cat_frozen(self, Ps):
        """torch.cat(Ps, 0), kept while every P is the same frozen tensor object (MoRA's 0/1
        compress maps, VeRA's cast projection): one concatenation per layer, not per step."""
        if len(Ps) == 1:
            return Ps[0]
        if any(p.requires_grad for p in Ps):
            return torch.cat(Ps, 0)
        cached = getattr(self, "_pcat", None)
        if cached is None or len(cached[0]) != len(Ps) or any(a is not b for a, b in zip(cached[0], Ps)):
            cached = (tuple(Ps), torch.cat(Ps, 0))
            self._pcat = cached
        return cached[1]

    def forward(self, x, *args, **kwargs):
        if self.merged or not self.adapters:
            return self.base(x, *args, **kwargs)
        return self._column(x, *args, **kwargs) if self.mode == "column" else self._row(x)

    def _column(self, x, weight=None, runtime_gather_output=None):
        from megatron.core.tensor_parallel import mappings

        base = self.base
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        out, bias = base(x, weight=weight, runtime_gather_output=False)
        out = self._adapter_out(x, out)
        if gather:
            out = mappings.gather_from_tensor_model_parallel_region(out)
        return out, bias

    def _row(self, x):
        from megatron.core.tensor_parallel import mappings

        base = self.base
        if not base.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x)
        partial = base._forward_impl(
            input=x, weight=base.weight, bias=None, gradient_accumulation_fusion=base.gradient_accumulation_fusion,
            allreduce_dgrad=False, sequence_parallel=False, tp_group=None, grad_output_buffer=None,
        )
        partial = self._adapter_out(x, partial)
        if base.sequence_parallel:
            out = mappings.reduce_scatter_to_sequence_parallel_region(partial)
        else:
            out = mappings.reduce_from_tensor_model_parallel_region(partial)
        if base.skip_bias_add:
            return out, base.bias
        return (out + base.bias if base.bias is not None else out), None

    # --- merging ----------------------------------------------------------------------------
    def _apply_delta(self, sign: float) -> None:
        """W_local[rows of each adapter] += sign * dW_local.

        A bf16 base loses the low bits of every small update: 20 merges of typical restart-sized
        deltas into bf16 drift far more than one rounding (tests/test_merge_precision.py prints
        the numbers). We keep the rounding error of each merge in a bf16 `merge_residual` buffer
        (compensated summation), so W + residual tracks the exact fp32 sum to ~2^-16 relative
        while the forward keeps reading the plain bf16 W. Export adds the residual back.
        """
        w = self.base.weight
        compensated = w.dtype in (torch.bfloat16, torch.float16)
        if compensated and not hasattr(self, "merge_residual"):
            self.register_buffer("merge_residual", torch.zeros_like(w))
        for name, adapter in self.adapters.items():
            delta = sign * adapter.delta_weight().float()
            pos = self._positions[name]
            idx = getattr(self, f"_pos_{name}") if pos is not None else None
            cur = w.data.float() if idx is None else w.data.index_select(0, idx).float()
            if compensated:
                res = self.merge_residual if idx is None else self.merge_residual.index_select(0, idx)
                exact = cur + res.float() + delta
            else:
                exact = cur + delta
            new = exact.to(w.dtype)
            if idx is None:
                w.data.copy_(new)
            else:
                w.data.index_copy_(0, idx, new)
            if compensated:
                err = (exact - new.float()).to(w.dtype)
                if idx is None:
                    self.merge_residual.copy_(err)
                else:
                    self.merge_residual.index_copy_(0, idx, err)

    def full_precision_weight(self) -> torch.Tensor:
        """The local weight shard including the merge residual (for export), in fp32."""
        w = self.base.weight.detach().float()
        return w + self.merge_residual.float() if hasattr(self, "merge_residual") else w

    @torch.no_grad()
    def merge(self) -> None:
        """W_local += dW_local for every adapter; the forward then skips the adapters."""
        if not self.merged:
            self._apply_delta(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    @torch.no_grad()
    def fold(self) -> None:
        """Merge permanently (ReLoRA restart): W += dW; the caller then re-initialises the adapters."""
        if self.merged:
            raise RuntimeError("fold() on a merged layer: unmerge first")
        self._apply_delta(1.0)
