"""Put adapters on a megatron-core model by target name, freeze everything else, count parameters.

Targets are canonical projection names (q, k, v, o, gate, up, down; docs/design.md section 3) or glob
patterns over module names (e.g. "*.linear_proj"). Canonical o/down are `linear_proj`/`linear_fc2`;
q, k, v live in the fused `linear_qkv` and gate, up in the fused `linear_fc1`: each gets its own
adapter over the canonical projection's shape, writing to that projection's rows of the rank's
local output (`mora_dist.parallel.fused`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mora_dist.adapters.base import MethodConfig, Shard, build_adapter
from mora_dist.parallel.wrappers import AdaptedLinear

CANONICAL = {"q": "linear_qkv", "k": "linear_qkv", "v": "linear_qkv", "o": "linear_proj",
             "gate": "linear_fc1", "up": "linear_fc1", "down": "linear_fc2"}


@dataclass
class AdapterReport:
    trainable: int = 0
    frozen: int = 0
    per_target: dict = field(default_factory=dict)
    layers: int = 0

    def __iadd__(self, other: "AdapterReport") -> "AdapterReport":
        """Add another model chunk's counts (a rank with several virtual pipeline stages)."""
        self.trainable += other.trainable
        self.frozen += other.frozen
        self.layers += other.layers
        for k, n in other.per_target.items():
            self.per_target[k] = self.per_target.get(k, 0) + n
        return self

    def __str__(self):
        tot = self.trainable + self.frozen
        rows = "\n".join(f"  {k:>6}: {v:,}" for k, v in sorted(self.per_target.items()))
        return (f"adapters on {self.layers} projections; trainable {self.trainable:,} of {tot:,} "
                f"({100 * self.trainable / max(tot, 1):.3f}%) on this rank\n{rows}")


def _parallel_mode(module) -> str | None:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return None


def layer_shard(module, mode: str, d_in: int | None = None, d_out: int | None = None, out_rows=None) -> Shard:
    """The Shard of a (whole or canonical part of a) megatron TP linear on this rank."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    d_in = d_in or module.input_size
    d_out = d_out or module.output_size
    sp = bool(getattr(module, "sequence_parallel", False))
    if mode == "column":
        if d_out % tp:
            raise ValueError(f"output size {d_out} is not divisible by tensor_parallel={tp}")
        if out_rows is None:
            n = d_out // tp
            out_rows = torch.arange(rank * n, (rank + 1) * n)
        return Shard(d_in, d_out, "column", out_rows=out_rows, sequence_parallel=sp, tp_size=tp)
    if d_in % tp:
        raise ValueError(f"input size {d_in} is not divisible by tensor_parallel={tp}")
    n = d_in // tp
    return Shard(d_in, d_out, "row", in_start=rank * n, in_end=(rank + 1) * n, sequence_parallel=sp, tp_size=tp)


def _global_names(model: nn.Module) -> dict:
    """Module name -> name with the *global* transformer-layer index, so adapter seeds (and checkpoint
    keys) do not depend on the pipeline split."""
    out = {}
    for name, m in model.named_modules():
        num = getattr(m, "layer_number", None)
        if isinstance(num, int) and re.search(r"layers\.\d+$", name):
            out[name] = re.sub(r"layers\.\d+$", f"layers.{num - 1}", name)
    return out


def _rename(name: str, prefixes: dict) -> str:
    for local, glob in prefixes.items():
        if name == local or name.startswith(local + "."):
            return glob + name[len(local):]
    return name


def _matches(name: str, module, target: str) -> bool:
    if target in CANONICAL:
        return name.rsplit(".", 1)[-1] == CANONICAL[target]
    return fnmatch.fnmatchcase(name, target)


def apply_adapters(model: nn.Module, cfg: MethodConfig, vera_shapes: tuple | None = None) -> AdapterReport:
    """Wrap every target of `cfg.targets` in `model` with an adapter; freeze all other parameters."""
    from mora_dist.parallel import fused

    for p in model.parameters():
        p.requires_grad_(False)
    prefixes = _global_names(model)
    plan = {}  # module name -> list of (target, d_in, d_out, out_rows, positions)
    for target in cfg.targets:
        found = False
        for name, module in model.named_modules():
            if isinstance(module, AdaptedLinear) or not _matches(name, module, target):
                continue
            mode = _parallel_mode(module)
            if mode is None:
                raise ValueError(f"adapter target {target!r} matched {name} ({type(module).__name__}), "
                                 "which is not a megatron Column/RowParallelLinear")
            found = True
            if target in fused.PARTS:
                plan.setdefault(name, []).append((target,) + fused.part(module, target))
            else:
                plan.setdefault(name, []).append((target, None, None, None, None))
        if not found:
            raise ValueError(f"adapter target {target!r} matches no linear layer of the model")
    if cfg.method == "vera" and vera_shapes is None:
        vera_shapes = (max(e[1] or m.input_size for n, es in plan.items() for e in es
                           for m in [model.get_submodule(n)]),
                       max(e[2] or m.output_size for n, es in plan.items() for e in es
                           for m in [model.get_submodule(n)]))
    report = AdapterReport()
    for name, entries in plan.items():
        module = model.get_submodule(name)
        mode = _parallel_mode(module)
        gname = _rename(name, prefixes)
        wrapper = AdaptedLinear(module, mode, gname)
        for target, d_in, d_out, out_rows, positions in entries:
            try:
                shard = layer_shard(module, mode, d_in, d_out, out_rows)
            except ValueError as e:
                raise ValueError(f"{name} ({target}): {e}") from None
            kw = dict(d_in_max=vera_shapes[0], d_out_max=vera_shapes[1]) if cfg.method == "vera" else {}
            seed = cfg.seed * 1_000_003 + zlib.crc32(f"{gname}:{target}".encode())
            adapter = build_adapter(cfg, shard, seed=seed, **kw).to(module.weight.device)
            wrapper.add_adapter(target if target in CANONICAL else "adapter", adapter, positions)
            n = sum(p.numel() for p in adapter.parameters())
            report.per_target[target] = report.per_target.get(target, 0) + n
            report.layers += 1
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    report.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return report


def adapted_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


@contextlib.contextmanager
def fixed_adapters(model: nn.Module, graph=None, step_factors: bool = True, accumulate: bool = False):
    """A scope in which the adapter parameters do not change (an optimizer step's micro-batches, an
    evaluation): each adapted layer on the merged-weight path builds W0 + dW once, on entry, and
    every forward inside reads it (`AdaptedLinear.begin_fixed`). Changing adapter parameters or
    base weights inside the scope is an error the scope cannot see: step the optimizer outside.
    `graph`: a `training.cuda_graph.BuildGraph` that runs (captures, replays) the builds.
    `step_factors`: the factors' casts made on entry too and reused by every forward (false: each
    forward casts its own, as a micro-batch graph captured with eager builds at TP > 1 was timed).
    `accumulate` (with step_factors): the backwards inside sum the factors' gradients in fp32 buffers and
    the scope yields `flush`, which sends them to the trainables' .grad (and DDP's hooks) in one backward;
    call it once, after the step's last backward, inside the scope (a scope that ends normally with summed
    gradients it never flushed raises: they would be lost). Otherwise it yields a flush that does nothing."""
    layers = adapted_layers(model)
    accumulate = accumulate and step_factors
    if graph is None:
        for m in layers:
            m.begin_fixed(step_factors, accumulate)
    else:
        graph(lambda: [m.begin_fixed(step_factors, accumulate) for m in layers])
        for m in layers:  # a replay ran no Python: point the forwards at the buffers the builds write
            m.resume_fixed()

    flushed = []

    def flush() -> None:
        links = [link for m in layers for link in m.factor_grad_links()] if accumulate else []
        if links:  # the nodes keep no saved tensors (they serve every step under a BuildGraph): retained
            torch.autograd.backward([t for t, _ in links], [a for _, a in links], retain_graph=True)
        flushed.append(True)

    try:
        yield flush
    finally:
        for m in layers:
            m.end_fixed()
    if accumulate and not flushed and any(bool(a.any()) for m in layers for _, a in m.factor_grad_links()):
        raise RuntimeError("fixed_adapters(accumulate=True): the scope ended with factor gradients it never "
                           "flushed; call the flush it yields after the step's last backward, inside the scope")


def zero_factor_grads(model: nn.Module) -> None:
    """Zero the factor gradients `fixed_adapters(accumulate=True)` has summed so far (after a CUDA graph's
    warm-up micro-batches, which are not part of a step)."""
    for m in adapted_layers(model):
        m.zero_factor_grads()


def defer_tp_grads(model: nn.Module):
    """Replicated adapter parameters on the merged path keep partial gradients through the backward
    (`Adapter.defer_tp_grad`); the returned `reduce(grad_of)` sums them over TP in one all-reduce.
    Why: summed in each backward, every replicated tensor cost one small all-reduce per adapter and
    micro-batch (8B, TP=2, 4 micro-batches: ~900 a step, 21 ms). `grad_of(p)`: where p's gradient
    accumulated (p.main_grad under megatron's DDP). Call reduce once a step, after the micro-batches."""
    adapters = [a for m in adapted_layers(model) for a in m.adapters.values()]
    for a in adapters:
        a.defer_tp_grad = True

    def reduce(grad_of=lambda p: p.grad) -> None:
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_world_size() == 1:
            return
        grads = [g for a in adapters for n in sorted(a.deferred) for g in [grad_of(getattr(a, n))] if g is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
        torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))  # one multi-tensor copy

    return reduce


def named_adapters(model: nn.Module):
    """(key, AdaptedLinear, target, adapter) for every adapter; key = the layer's global name + target,
    the same under every pipeline split (checkpoint keys, exports)."""
    for m in adapted_layers(model):
        for target, a in m.adapters.items():
            yield f"{m.global_name}.{target}", m, target, a


@torch.no_grad()
def merge_adapters(model: nn.Module) -> None:
    for m in adapted_layers(model):
        m.merge()


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> None:
    for m in adapted_layers(model):
        m.unmerge()


@torch.no_grad()
def unwrap_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter into its frozen shard and put the plain megatron linear back, leaving a
    standard GPTModel (for Megatron checkpoints and export). With a bf16 base the result is the
    correctly rounded merged weight (the merge residual is below half an ulp)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
    return model
