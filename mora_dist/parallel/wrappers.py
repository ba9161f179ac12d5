"""Adapters around megatron-core's tensor-parallel linears (DESIGN.md section 3).

`AdaptedLinear` replaces a `ColumnParallelLinear` / `RowParallelLinear` in its parent and keeps
the base layer (and so its weight shards, init and checkpoint layout) inside it. One wrapped layer
can hold several adapters, each owning some of the layer's local output rows: a fused layer such
as `linear_qkv` carries the canonical q, k and v adapters (`positions` are their rows in the
rank's local output). Column-parallel: the base runs unchanged and each adapter's rows are added to
its local output. Row-parallel: the wrapper runs the base matmul, adds the adapters' partial outputs,
and only then does the layer's all-reduce (reduce-scatter under SP), mirroring megatron's
`RowParallelLinear.forward`, so adapters cost no extra communication.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mora_dist.adapters.base import Adapter
from mora_dist.optim.allora import allora_forward


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Module, mode: str):
        super().__init__()
        if mode not in ("column", "row"):
            raise ValueError(f"mode must be column or row, got {mode!r}")
        self.base, self.mode = base, mode
        self.adapters = nn.ModuleDict()
        self._positions: dict[str, Optional[torch.Tensor]] = {}
        self.merged = False

    def add_adapter(self, name: str, adapter: Adapter, positions: Optional[torch.Tensor] = None) -> None:
        """`positions`: the adapter's rows in the local output (None: all rows, in order)."""
        n_local = self.base.weight.shape[0]
        if positions is None and len(adapter.out_rows) != n_local:
            raise ValueError(f"adapter {name!r} computes {len(adapter.out_rows)} rows, layer has {n_local}")
        self.adapters[name] = adapter
        if positions is not None:
            positions = torch.as_tensor(positions, dtype=torch.long)
            self.register_buffer(f"_pos_{name}", positions, persistent=False)
        self._positions[name] = positions

    def _adapter_out(self, x, out):
        for name, adapter in self.adapters.items():
            eta = adapter.cfg.allora_eta
            delta = (adapter(x) if eta is None else allora_forward(adapter, x, eta)).to(out.dtype)
            pos = self._positions[name]
            if pos is None:
                out = out + delta
            else:
                out = out.index_add(-1, getattr(self, f"_pos_{name}"), delta)
        return out

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
