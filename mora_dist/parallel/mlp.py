"""An adapted MLP (linear_fc1 -> SwiGLU -> linear_fc2) as one autograd Function on the merged-weight
path, with the adapters' skinny products taken inside the SwiGLU kernels (`kernels/swiglu_grads.py`).

Why (docs/performance.md, 8B section, "Fused SwiGLU + factor gradients"): on the merged path a LoRA
layer's cost over the frozen base is its parameter gradients' skinny GEMMs, and the largest tensors
they stream are linear_fc1's output gradient g = [g_gate | g_up] (E = g_i^T H_i and g_i Q_i read it
twice) and linear_fc2's input act (H = act P^T forward, dP = dH^T act backward): 1.41 GB a layer and
micro-batch at the 8B shape. g is produced, and act consumed, by SwiGLU, so the kernels take those
products from the tiles they hold in registers, and act is not kept for the backward (recomputed from
fc1's output y, which SwiGLU's backward reads anyway). Per layer and micro-batch:

  forward:  y = x W1^T;  H1 = x [P_gate; P_up]^T;  act, H2 = swiglu(y), act P_down^T;  out = act W2^T
  backward: dact = g_out W2;  E_down = g_out^T H2;  Z_down = g_out Q_down;
            g1, E_gate, E_up, Z_gate, Z_up, dP_down = swiglu_back(y, dact) with its products (Z_down in);
            dP_gate, dP_up = [Z_gate | Z_up]^T x;  dx = g1 W1
  LoRA / rsLoRA factors (delta = (x P^T) Q^T): dQ = E, dP as above, the same sums as `merged._factor_grads`.

Served: TP = 1, both linears on the merged path with one LoRA-type factor adapter each on gate, up
and down (no ALLoRA coefficients, no 0/1 tile maps, no MoRA blocks, no adapter on its own forward),
gated SiLU without bias, on CUDA (or Triton's interpreter). Anything else runs megatron's forward.
Opt-in until timed and checked on a GPU (its bf16 dots have run only in an sm_90a compile, the
CPU tests take the interpreter's fp32/fp64 path): MORA_DIST_FUSED_MLP=1 in the environment installs it
(`launch/device/bench_8b_final.sh` runs the check and a LoRA row with it).
"""
from __future__ import annotations

import os
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from mora_dist.kernels import runs_on, swiglu_grads
from mora_dist.parallel import merged


class _Layout(NamedTuple):
    """Where the factors sit in the two plans' tensors: fc1's P of gate / up, its Q of gate / up,
    then fc2's P and Q (indices into ts1 + ts2), and the count of ts1."""
    p_gate: int
    p_up: int
    q_gate: int
    q_up: int
    p_down: int
    q_down: int
    n1: int


def install(mlp) -> None:
    """Give megatron's MLP `mlp` (linear_fc1 and linear_fc2 wrapped in AdaptedLinear) the fused
    forward wherever `_served` finds it applies, per call; megatron's forward otherwise. Once per MLP,
    with MORA_DIST_FUSED_MLP=1 (module docstring)."""
    if getattr(mlp, "_fused_mlp", False) or os.environ.get("MORA_DIST_FUSED_MLP") != "1":
        return
    mlp._fused_mlp = True
    megatron_forward = mlp.forward

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        # megatron's layer passes padding_mask (MoE routing only; a dense MLP ignores it)
        plain = per_token_scale is None and all(v is None for v in kwargs.values())
        served = _served(self, hidden_states) if plain else None
        if served is None:
            return megatron_forward(hidden_states, per_token_scale, **kwargs)
        (plan1, ts1), (plan2, ts2), lay = served
        fc1, fc2 = self.linear_fc1, self.linear_fc2
        x2 = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = _FusedMLP.apply(x2, fc1.base.weight, fc1._fixed, plan1, fc2.base.weight, fc2._fixed, plan2, lay,
                              *ts1, *ts2)
        return out.view(*hidden_states.shape[:-1], out.shape[-1]), None

    mlp.forward = types.MethodType(forward, mlp)


def _served(mlp, x) -> Optional[tuple]:
    """((plan1, ts1), (plan2, ts2), _Layout) when this call can take the fused Function, else None."""
    from megatron.core import parallel_state as ps

    from mora_dist.parallel.wrappers import AdaptedLinear

    cfg, fc1, fc2 = mlp.config, mlp.linear_fc1, mlp.linear_fc2
    if not runs_on(x):
        return None
    if not (cfg.gated_linear_unit and mlp.activation_func is F.silu and not cfg.add_bias_linear
            and not getattr(cfg, "use_te_activation_func", False) and getattr(cfg, "activation_func_clamp_value", None)
            is None and not getattr(cfg, "glu_linear_offset", 0.0)):
        return None
    if not (isinstance(fc1, AdaptedLinear) and isinstance(fc2, AdaptedLinear)):
        return None
    if ps.get_tensor_model_parallel_world_size() != 1:
        return None
    for fc in (fc1, fc2):
        if fc.merged or not fc.adapters or not fc._use_merged(None):
            return None
    plan1, ts1, extra1 = fc1._merged_plan()
    plan2, ts2, extra2 = fc2._merged_plan()
    if extra1 or extra2 or plan1.blocks or plan2.blocks or any(plan1.p_tiles) or any(plan2.p_tiles):
        return None
    if len(plan1.terms) != 2 or plan1.n_p != 2 or len(plan2.terms) != 1 or plan2.n_p != 1:
        return None
    n_ff = fc1.base.weight.shape[0] // 2
    rows = [t.rows for t in plan1.terms]
    if not all(isinstance(r, merged.RowRange) for r in rows) or sorted(rows) != [(0, n_ff), (n_ff, 2 * n_ff)]:
        return None
    if plan2.terms[0].rows != (0, fc2.base.weight.shape[0]):
        return None
    terms = [*plan1.terms, *plan2.terms]
    mids = [ts1[plan1.n_p + 2 * i] for i in range(2)] + [ts2[1]]
    if any(t.c is not None or t.q_tile for t in terms) or any(m is not None for m in mids):
        return None
    g, u = (0, 1) if rows[0] == (0, n_ff) else (1, 0)
    n1 = len(ts1)
    lay = _Layout(p_gate=plan1.terms[g].slot, p_up=plan1.terms[u].slot, q_gate=plan1.n_p + 2 * g + 1,
                  q_up=plan1.n_p + 2 * u + 1, p_down=n1, q_down=n1 + 2, n1=n1)
    return (plan1, ts1), (plan2, ts2), lay


class _FusedMLP(torch.autograd.Function):
    """out = swiglu(x W1^T) W2^T with W1 = W1_0 + dW1, W2 = W2_0 + dW2 (the step's weights, or built
    here when None), and the LoRA factors' gradients (see the module docstring)."""

    @staticmethod
    def forward(ctx, x2, W1_0, W1, plan1, W2_0, W2, plan2, lay: _Layout, *ts):
        ts1, ts2 = ts[:lay.n1], ts[lay.n1:]
        W1 = merged.build_weight(W1_0, plan1, ts1) if W1 is None else W1
        W2 = merged.build_weight(W2_0, plan2, ts2) if W2 is None else W2
        y = x2 @ W1.t()
        Hg, Hu = (x2 @ torch.cat([ts[lay.p_gate], ts[lay.p_up]]).t()).split(
            [ts[lay.p_gate].shape[0], ts[lay.p_up].shape[0]], 1)
        act, H2 = swiglu_grads.swiglu_forward_lora(y, ts[lay.p_down])
        out = act @ W2.t()
        ctx.lay, ctx.n = lay, len(ts)
        ctx.save_for_backward(x2, y, W1, W2, Hg, Hu, H2.to(x2.dtype), ts[lay.q_gate], ts[lay.q_up], ts[lay.q_down])
        return out

    @staticmethod
    def backward(ctx, g):
        x2, y, W1, W2, Hg, Hu, H2, Qg, Qu, Qd = ctx.saved_tensors
        lay = ctx.lay
        dact = g @ W2
        E_down = g.t() @ H2
        Z_down = g @ Qd
        g1, E_gate, E_up, Z_gate, Z_up, dP_down = swiglu_grads.swiglu_backward_lora(y, dact, Hg, Qg, Hu, Qu, Z_down)
        dP_gate, dP_up = (torch.cat([Z_gate, Z_up], 1).to(x2.dtype).t() @ x2).split([Z_gate.shape[1], Z_up.shape[1]])
        dx = g1 @ W1 if ctx.needs_input_grad[0] else None
        grads = [None] * ctx.n
        for i, d in ((lay.p_gate, dP_gate), (lay.p_up, dP_up), (lay.q_gate, E_gate), (lay.q_up, E_up),
                     (lay.p_down, dP_down), (lay.q_down, E_down)):
            grads[i] = d.to(x2.dtype)
        return (dx, None, None, None, None, None, None, None, *grads)
