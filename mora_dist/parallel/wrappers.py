"""Adapters around megatron-core's tensor-parallel linears (docs/design.md section 3).

`AdaptedLinear` replaces a `ColumnParallelLinear` / `RowParallelLinear` in its parent and keeps
the base layer (and so its weight shards, init and checkpoint layout) inside it. One wrapped layer
can hold several adapters, each owning some of the layer's local output rows: a fused layer such
as `linear_qkv` carries the canonical q, k and v adapters (`positions` are their rows in the
rank's local output). Column-parallel: the base runs unchanged and each adapter's rows are added to
its local output. Row-parallel: the wrapper runs the base matmul, adds the adapters' partial outputs,
and only then does the layer's all-reduce (reduce-scatter under SP), mirroring megatron's
`RowParallelLinear.forward`, so adapters cost no extra communication.

With the fast paths on (the default) the adapters are merged into the layer's local weight shard
for the step (`merged.py`), at any TP: the forward and the input gradient are the base's single
GEMMs (column-parallel: on the input gathered as megatron gathers it; row-parallel: a partial sum
reduced as above), the parameter gradients skinny GEMMs over x and the output gradient, and the
gradients of replicated trainables are summed over TP (`Adapter.merged_param`). Every method and
shard has a merged form (MoRA's block types on row-parallel shards too: `MoRA.block_operator`); the
per-adapter path (each adapter's own TP-aware forward) remains for `adapter.fast_path: false` and
for an adapter that offers neither `Factors` nor a block operator (docs/performance.md).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from mora_dist.adapters.base import Adapter, copy_to_tp
from mora_dist.optim.allora import allora_forward, row_coefficients
from mora_dist.parallel import merged


def _row_blocks(pos: torch.Tensor, n: int):
    """Output rows `pos` of an n-wide layer as a strided view: merged.RowBlocks(G, stride, off, w, pos)
    when pos = off + stride * g + i (g < G, i < w) with G * stride == n (q/k/v in the fused qkv
    layer: one block per query group), else merged.RowIndex(pos)."""
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
            return merged.RowBlocks(G, stride, off, w, pos)
    return merged.RowIndex(pos)


def _segments(adapter_rows: torch.Tensor, layer_rows: torch.Tensor) -> tuple:
    """An adapter's local rows as blockdiag segments ((first adapter row, end, layer row), ...):
    runs that are contiguous both in the adapter's global rows (`Adapter.out_rows`: a column
    shard's part of the canonical output) and in the layer's local output rows."""
    a, p = adapter_rows.cpu().tolist(), layer_rows.cpu().tolist()
    segs, i = [], 0
    while i < len(a):
        j = i + 1
        while j < len(a) and a[j] == a[j - 1] + 1 and p[j] == p[j - 1] + 1:
            j += 1
        segs.append((a[i], a[j - 1] + 1, p[i]))
        i = j
    return tuple(segs)


def _cast_factors(fac, dt):
    """`Factors` with its tensors in dtype dt (values only: for ALLoRA's coefficients)."""
    return dataclasses.replace(fac, **{k: getattr(fac, k).detach().to(dt) for k in ("P", "mid", "Q")
                                       if getattr(fac, k) is not None})


_side_stream = None


def _node_stream(t: torch.Tensor):
    """A side stream for the autograd nodes of the step's factor casts, made eagerly on CUDA's default
    stream, else None. Why: a node's backward runs on the stream it was made on, and a micro-batch's
    backward captured in a CUDA graph cannot join the legacy default stream (the capture is
    invalidated); a side stream joins it (the recipe the Trainer follows for DDP's gradient nodes)."""
    global _side_stream
    if not t.is_cuda or torch.cuda.is_current_stream_capturing() or torch.cuda.current_stream() != torch.cuda.default_stream():
        return None
    if _side_stream is None:
        _side_stream = torch.cuda.Stream()
    return _side_stream


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Module, mode: str, global_name: str = ""):
        super().__init__()
        if mode not in ("column", "row"):
            raise ValueError(f"mode must be column or row, got {mode!r}")
        self.base, self.mode = base, mode
        self.global_name = global_name  # module name with the global layer index: seeds do not depend on PP
        self.adapters = nn.ModuleDict()
        self._positions: dict[str, Optional[torch.Tensor]] = {}
        self._rows: dict[str, tuple] = {}  # name -> merged.RowRange | RowBlocks | RowIndex
        self._segs: dict[str, tuple] = {}
        self.merged = False
        self._step_weight: Optional[torch.Tensor] = None  # W0 + dW, kept across steps (begin_fixed)
        self._fixed: Optional[torch.Tensor] = None  # the weight forwards read inside fixed_adapters
        self._fixed_last: Optional[torch.Tensor] = None  # what the last begin_fixed chose (BuildGraph replays)
        self._step_planned = None  # the last begin_fixed's `_merged_plan()`, read by the forwards inside the scope
        self._held: dict = {}  # _hold's buffers
        self._grad_links: list = []  # (factor before its cast, fp32 buffer of its step gradient): begin_fixed
        self.overlap_sp = True  # parallel.overlap_sp: SP's collectives inside the merged GEMMs (overlap.py)

    def add_adapter(self, name: str, adapter: Adapter, positions: Optional[torch.Tensor] = None) -> None:
        """`positions`: the adapter's rows in the local output (None: all rows, in order)."""
        n_local = self.base.weight.shape[0]
        if positions is None and len(adapter.out_rows) != n_local:
            raise ValueError(f"adapter {name!r} computes {len(adapter.out_rows)} rows, layer has {n_local}")
        self.adapters[name] = adapter
        # the adapter's rows for the merged path: contiguous [a, b) (or all rows) as a slice,
        # regular blocks (q/k/v) as a strided view, anything else by index
        self._rows[name] = merged.RowRange(0, n_local)
        if positions is not None:
            positions = torch.as_tensor(positions, dtype=torch.long).cpu()
            a = int(positions[0]) if len(positions) else 0
            contiguous = torch.equal(positions, torch.arange(a, a + len(positions)))
            # on the layer's device (the model may already be on the GPU when adapters are added)
            positions = positions.to(self.base.weight.device)
            self.register_buffer(f"_pos_{name}", positions, persistent=False)
            self._rows[name] = merged.RowRange(a, a + len(positions)) if contiguous else _row_blocks(positions, n_local)
        self._positions[name] = positions
        local = torch.arange(n_local) if positions is None else positions
        self._segs[name] = _segments(adapter.out_rows, local)

    def _add_delta(self, out, x, name):
        """out + adapter `name`'s own forward at its rows (out of place)."""
        adapter = self.adapters[name]
        eta = adapter.cfg.allora_eta
        delta = (adapter(x) if eta is None else allora_forward(adapter, x, eta)).to(out.dtype)
        pos = self._positions[name]
        return out + delta if pos is None else out.index_add(-1, getattr(self, f"_pos_{name}"), delta)

    def _adapter_out(self, x, out):
        """out (the base's output, local rows) + every adapter's update: each adapter's own (TP-aware)
        forward. Serves sharded layers (TP > 1) and `adapter.fast_path: false`."""
        for name in self.adapters:
            out = self._add_delta(out, x, name)
        return out

    def _use_merged(self, weight) -> bool:
        """Fast paths on and a frozen base (any TP): the merged-weight path (merged.py)."""
        return (weight is None and not self.base.weight.requires_grad
                and all(a.fast for a in self.adapters.values()))

    def _merged_plan(self, stable: bool = False, accumulate: bool = False):
        """(merged.Plan, its tensors, names of adapters added by their own forward) for this layer's
        adapters as they are now. Adapters with neither `Factors` nor a block operator go to the
        third list (none of this repository's methods on any shard, with the fast paths on).
        `stable` (begin_fixed): every tensor made here (casts of the trainables, ALLoRA's c) is copied
        into a buffer of this layer, so that it has the same address every step (`_hold`).
        `accumulate` (with stable): the factors' gradients go to fp32 buffers (`_accumulated`)."""
        dt = self.base.weight.dtype
        keys, Ps, pairs, terms, Ms, blocks, extra, p_tiles = {}, [], [], [], [], [], [], []
        for name, adapter in self.adapters.items():
            rows = self._rows[name]
            if not isinstance(rows, merged.RowRange):  # the index buffer as it is now (follows .to(device))
                rows = type(rows)(*rows[:-1], getattr(self, f"_pos_{name}"))
            eta = adapter.cfg.allora_eta
            fac = adapter.factors(dt, cast=not accumulate)
            if fac is not None:
                key = fac.p_key if fac.p_key is not None else ("adapter", name)
                if key not in keys:
                    keys[key] = len(Ps)
                    Ps.append(fac.P)
                    p_tiles.append(None if fac.P.requires_grad else fac.p_tile)
                # ALLoRA's c from the factors the forwards read (cast to dt), whichever form `fac` has
                c = None if eta is None else merged.factor_row_coefficients(
                    fac if not accumulate else _cast_factors(fac, dt), eta, self._row_group(adapter)).to(dt)
                terms.append(merged.Term(rows, keys[key], c, fac.q_tile))
                pairs += [fac.mid, fac.Q]
                continue
            block = adapter.block_operator()
            if block is None:
                extra.append(name)
                continue
            segments = self._segs[name]
            c = None if eta is None else row_coefficients(adapter, eta)
            geo, M, rot = block
            blocks.append(merged.Block((geo, segments), c, rot))
            Ms.append(M)
        ts = [*Ps, *pairs, *Ms]
        accs = ()
        if stable:
            nf = len(Ps) + len(pairs)
            if accumulate:
                fac_ts, accs = self._accumulated(ts[:nf], dt)
            else:
                fac_ts = [self._hold(("t", i), t) for i, t in enumerate(ts[:nf])]
            ts = fac_ts + [self._hold(("t", nf + j), M) for j, M in enumerate(Ms)]
            if any(a is not None for a in accs):
                ts.append(self._anchor())
                accs += (None,) * len(Ms)  # block adapters' M: fp32 already, their gradients returned
            else:  # nothing to accumulate (block adapters only, or not accumulating)
                accs = ()
            terms = [t._replace(c=self._hold(("tc", i), t.c, grad=False)) for i, t in enumerate(terms)]
            blocks = [b._replace(c=self._hold(("bc", i), b.c, grad=False)) for i, b in enumerate(blocks)]
        return merged.Plan(len(Ps), tuple(terms), tuple(blocks), tuple(p_tiles), accs), ts, extra

    def _accumulated(self, ts: list, dt: torch.dtype):
        """(ts as the forwards read them, their accumulation buffers) for the factors of a step: each one made
        from trainables (fp32, `factors(cast=False)`) is cast into a stable buffer of dtype dt (no autograd link),
        and its gradient is added by every micro-batch's backward into an fp32 buffer (one flat buffer a layer,
        zeroed here); `inject.fixed_adapters`' flush then sends those sums through the casts, scales and TP
        identities to the trainables once a step. Why: run per micro-batch, that chain was 2-3 small kernels a
        factor (8B LoRA: the casts back to fp32, the scale, ~3,500 kernels a step, 14 ms; docs/performance.md);
        the roots are the fp32 tensors, so the sums reach the trainables unrounded. Frozen factors (already dt)
        pass through. The cast buffers are `_hold`'s (same keys: one copy whichever path a step takes)."""
        out, links = [], []
        for i, t in enumerate(ts):
            if t is None or (t.dtype == dt and not t.requires_grad):
                out.append(t)
                continue
            buf = self._buffer(("t", i), t.shape, dt, t.device)
            out.append(buf.detach().copy_(t.detach()))  # detach: `_hold`'s copy_ may have given buf a history
            if t.requires_grad:
                links.append((i, t))
        flat = self._buffer("acc", (sum(t.numel() for _, t in links),), torch.float32,
                            links[0][1].device if links else self.base.weight.device)
        flat.zero_()
        accs, off = [None] * len(ts), 0
        for i, t in links:
            accs[i] = flat[off:off + t.numel()].view(t.shape)
            off += t.numel()
        self._grad_links = [(t, accs[i]) for i, t in links]
        return out, tuple(accs)

    def _anchor(self) -> torch.Tensor:
        """A 0-dim leaf that requires grad, among the merged Function's inputs when the factors' gradients are
        accumulated (`merged.Plan.accs`): without it a layer whose input needs no gradient (the first layer's
        q/k/v) would have no backward at all."""
        a = self._held.get("anchor")
        if a is None or a.device != self.base.weight.device:
            a = self._held["anchor"] = torch.zeros((), device=self.base.weight.device, requires_grad=True)
        return a

    def _buffer(self, key, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """This layer's buffer `key` (`_held`), made (uninitialised) when missing or of another shape, dtype or device."""
        buf = self._held.get(key)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._held[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def factor_grad_links(self) -> list:
        """(factor before its cast, fp32 sum of its gradient over the step's micro-batches) of the last
        `begin_fixed(accumulate=True)`: what `inject.fixed_adapters`' flush sends to the trainables."""
        return self._grad_links

    def zero_factor_grads(self) -> None:
        """Zero the accumulated factor gradients (a CUDA graph's warm-up micro-batches are not part of a step)."""
        if "acc" in self._held:
            self._held["acc"].zero_()

    def _hold(self, key, t: Optional[torch.Tensor], grad: bool = True) -> Optional[torch.Tensor]:
        """t copied into this layer's buffer `key` (made on first use) when it was computed here: a CUDA
        graph of a micro-batch, captured once, reads these addresses while each step's begin_fixed writes
        them. `grad`: t is a factor, and the copy keeps its autograd link (copy_ is differentiable);
        parameters and cached frozen maps (no grad_fn) are stable already and pass through. Else t is a
        constant of the plan (ALLoRA's c), always computed here: its values are copied."""
        if t is None or (grad and t.grad_fn is None):
            return t
        return self._buffer(key, t.shape, t.dtype, t.device).copy_(t if grad else t.detach())

    # --- one build a step (inject.fixed_adapters) -----------------------------------------------
    @torch.no_grad()
    def begin_fixed(self, step_factors: bool = True, accumulate: bool = False) -> None:
        """The adapters stay fixed until `end_fixed` (an optimizer step's micro-batches): build
        W0 + dW once, into a buffer kept across steps (a stable address for CUDA graphs), and let
        every forward read it; with `step_factors` the forwards reuse this build's factors too, and with
        `accumulate` their gradients are summed over the step for one flush (`_accumulated`)."""
        self._fixed = self._fixed_last = self._build_fixed(step_factors, accumulate)

    def _build_fixed(self, step_factors: bool, accumulate: bool = False) -> Optional[torch.Tensor]:
        self._step_planned = None
        self._grad_links = []
        if self.merged or not self.adapters or not self._use_merged(None):
            return None
        W0 = self.base.weight
        # `step_factors`: the factors in the activation dtype, cast from the fp32 trainables once a step with
        # their autograd links, reused by the forwards of the step's micro-batches (`_planned`). Why: made per
        # forward they were ~3 small kernels an adapter a micro-batch (8B LoRA: ~2,700 a step). Every backward
        # then runs the same cast nodes again, so they must keep no saved tensors (casts, scalar scaling,
        # padding, VeRA's `_ScaleRows`: tests/test_inject.py checks the methods); their outputs live in
        # buffers of stable address (`_hold`) for the CUDA graphs of the micro-batches.
        if step_factors:
            side = _node_stream(W0)
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())
            with torch.enable_grad(), torch.cuda.stream(side):  # stream None: a no-op
                self._step_planned = planned = self._merged_plan(stable=True, accumulate=accumulate)
            if side is not None:
                torch.cuda.current_stream().wait_stream(side)
        else:
            planned = self._merged_plan()
        plan, ts, _ = planned
        if not plan.terms and not plan.blocks:  # only adapters with their own forward: W0 itself
            return W0.detach()
        buf = self._step_weight
        if buf is None or buf.shape != W0.shape or buf.dtype != W0.dtype or buf.device != W0.device:
            buf = torch.empty_like(W0, requires_grad=False)
        self._step_weight = merged.build_weight(W0, plan, ts, out=buf)
        return self._step_weight

    def _planned(self):
        """`_merged_plan()` for a forward: inside fixed_adapters the step's (made once by `begin_fixed`)."""
        if self._fixed is not None and self._step_planned is not None:
            return self._step_planned
        return self._merged_plan()

    def resume_fixed(self) -> None:
        """Read the weight the last `begin_fixed` chose (its buffer rewritten since by a graph replay)."""
        self._fixed = self._fixed_last

    def end_fixed(self) -> None:
        self._fixed = None

    @torch.no_grad()
    def fixed_weight_error(self) -> float:
        """Max |W - W'| between the step weight forwards read now (inside fixed_adapters) and an eager
        build from the adapters as they are: 0 unless a BuildGraph replay read stale tensors (the bench's
        check); 0 where there is no built step weight."""
        if self._fixed is None or self._fixed is not self._step_weight:
            return 0.0
        plan, ts, _ = self._merged_plan()
        ref = merged.build_weight(self.base.weight, plan, ts)
        return (self._fixed.float() - ref.float()).abs().max().item()

    def _merged_out(self, x, planned, x_local=None):
        """The layer's output (local rows; a partial sum for row-parallel) with every adapter merged
        into the weight shard for this step: one GEMM forward, one GEMM input gradient, skinny GEMMs
        for the parameter gradients (`merged.MergedLinear`). `x` is the whole input the GEMM reads
        (column-parallel: gathered over TP), `x_local` what the layer was given; `planned` is
        `_merged_plan()`. The weight is the step's (built once by `begin_fixed`) inside
        `inject.fixed_adapters`, else built here."""
        x_local = x if x_local is None else x_local
        plan, ts, extra = planned
        out = merged.MergedLinear.apply(x.reshape(-1, x.shape[-1]), self.base.weight, self._fixed, plan, *ts)
        out = out.view(*x.shape[:-1], out.shape[-1])
        for name in extra:
            out = self._add_delta(out, x_local, name)
        return out

    def _merged_sp(self, x, kind: str, planned):
        """The merged path with SP's collective inside (`merged.MergedLinearSP`, overlapped with the
        GEMMs): kind "gather" (column-parallel: x is this rank's sequence block, the output covers the
        whole sequence) or "scatter" (row-parallel: the output is this rank's block, summed over TP)."""
        from megatron.core import parallel_state as ps

        plan, ts, _ = planned
        group = ps.get_tensor_model_parallel_group()
        out = merged.MergedLinearSP.apply(x.reshape(-1, x.shape[-1]), self.base.weight, self._fixed, plan,
                                          (kind, group), *ts)
        n = ps.get_tensor_model_parallel_world_size()
        s = x.shape[0] * n if kind == "gather" else x.shape[0] // n
        return out.view(s, *x.shape[1:-1], out.shape[-1])

    def _sp_inside(self, planned) -> bool:
        """Whether SP's collective goes inside the merged GEMMs (`overlap_sp`, TP > 1 under SP, no
        adapter on its own forward, which must be added before the layer's reduction)."""
        from megatron.core import parallel_state as ps

        return (self.overlap_sp and self.base.sequence_parallel and not planned[2]
                and ps.get_tensor_model_parallel_world_size() > 1)

    def forward(self, x, *args, **kwargs):
        if self.merged or not self.adapters:
            return self.base(x, *args, **kwargs)
        return self._column(x, *args, **kwargs) if self.mode == "column" else self._row(x)

    def _column(self, x, weight=None, runtime_gather_output=None):
        from megatron.core.tensor_parallel import mappings

        base = self.base
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if self._use_merged(weight):
            planned = self._planned()
            if self._sp_inside(planned):
                out = self._merged_sp(x, "gather", planned)
            else:
                out = self._merged_out(self._column_input(x), planned, x)
            bias = base.bias if base.skip_bias_add else None
            if base.bias is not None and not base.skip_bias_add:
                out = out + base.bias
        else:
            out, bias = base(x, weight=weight, runtime_gather_output=False)
            out = self._adapter_out(x, out)
        if gather:
            out = mappings.gather_from_tensor_model_parallel_region(out)
        return out, bias

    @staticmethod
    def _row_group(adapter):
        """The TP group where an adapter's rows are split over input columns (row-parallel), else None."""
        if adapter.shard.mode != "row" or adapter.shard.tp_size == 1:
            return None
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    def _column_input(self, x):
        """The whole input of a column-parallel shard, as megatron's layer forms it: all-gathered
        over the sequence under SP (gradient reduce-scattered), else replicated (gradient
        all-reduced over TP)."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import mappings

        if ps.get_tensor_model_parallel_world_size() == 1:
            return x
        if self.base.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
        return copy_to_tp(x)

    def _row(self, x):
        from megatron.core.tensor_parallel import mappings

        base = self.base
        if not base.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x)
        planned = self._planned() if self._use_merged(None) else None
        if planned is not None and self._sp_inside(planned):  # reduce-scattered inside, overlapped
            out = self._merged_sp(x, "scatter", planned)
        else:
            if planned is not None:
                partial = self._merged_out(x, planned)
            else:
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
        deltas into bf16 drift far more than one rounding (tests/test_restarts.py::test_repeated_bf16_merges_compensated prints
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

    # --- checkpoint entries (public: checkpoints read no private buffers of this layer) -------------
    def sharded_state_dict(self, with_base_rows: bool) -> dict:
        """This layer's dist_checkpointing entries under its global name (the same at every TP/PP
        layout): every adapter parameter and, `with_base_rows` (after restarts), the base rows each
        adapter folded into plus their bf16 merge residual."""
        sd = {}
        split = "out" if self.mode == "column" else "in"
        for target, a in self.adapters.items():
            key = f"{self.global_name}.{target}"
            for n, p in a.named_parameters():
                sd[f"{key}.{n}"] = a.sharded_tensor(f"{key}.{n}", p.data, n)
            if with_base_rows:
                rows, res = self.base_rows(target)
                sd[f"{key}.base"] = a.sharded_tensor(f"{key}.base", rows, split)
                if res is not None:
                    sd[f"{key}.base_residual"] = a.sharded_tensor(f"{key}.base_residual", res, split)
        return sd

    def base_rows(self, target: str) -> tuple:
        """(weight rows, merge-residual rows or None) of the local base that adapter `target` writes
        to: its rows of a fused layer, all rows otherwise."""
        pos = getattr(self, f"_pos_{target}", None)
        res = getattr(self, "merge_residual", None)
        pick = (lambda t: t) if pos is None else (lambda t: t.index_select(0, pos))
        return pick(self.base.weight.data), (None if res is None else pick(res))

    @torch.no_grad()
    def load_base_rows(self, target: str, weight: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> None:
        """Write back what `base_rows(target)` returned (None: leave that buffer)."""
        pos = getattr(self, f"_pos_{target}", None)
        for buf, val in ((self.base.weight.data, weight), (getattr(self, "merge_residual", None), residual)):
            if val is None or buf is None:
                continue
            if pos is None:
                buf.copy_(val)
            else:
                buf.index_copy_(0, pos, val.to(buf.dtype))

    def ensure_merge_residual(self) -> None:
        """Create the (zero) merge residual a low-precision base gets at its first merge, so that a
        checkpoint's residual can be loaded into it."""
        w = self.base.weight
        if w.dtype in (torch.bfloat16, torch.float16) and not hasattr(self, "merge_residual"):
            self.register_buffer("merge_residual", torch.zeros_like(w))

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
