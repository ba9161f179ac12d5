"""What every adapter shares: the settings common to all methods (`MethodConfig`; each method
subclasses it in its own module), the registry, the description of the rank's shard, TP communication.

An adapter adds dW x to a frozen linear y = W0 x with W0 in R^{d_out x d_in}. Under tensor
parallelism the rank owns a *shard* of the layer:
- column-parallel: some output rows (`Shard.out_rows`, global indices, any order: fused layers
  interleave projections) computed from the whole input (replicated, or sequence-sharded under SP);
- row-parallel: input columns [in_start, in_end), producing a partial sum of every output row that
  the layer reduces across TP. Every adapter here is linear in x, so its partial output is added
  to the base partial output *before* that reduction: no extra communication.
`forward(x)` returns the adapter's output for the rank's rows; `delta_weight()` the rank's shard
dW[out_rows, in_start:in_end], so merging is exact shard by shard.

Gradients of replicated trainables. Under TP a replicated tensor only sees part of the work:
- column-parallel: the rank's output rows; adapters compute their small replicated intermediate
  (LoRA's A x, MoRA's M f_comp(x), VeRA's d * A x) once and pass it through `to_rows` (identity
  forward, all-reduce backward; under SP an all-gather over the sequence, reduce-scatter backward),
  so tensors *before* that point get full gradients (partial over sequence shards under SP), and
  tensors after it are either sharded or see only the rank's rows;
- row-parallel: every replicated tensor sees only the rank's input columns.
`tp_sum_grad(p, after_comm)` routes a replicated parameter through an identity whose backward
all-reduces over TP exactly when its gradient is partial, so gradients equal TP=1's with no
separate reduction step and nothing for the optimizer to know.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import nn

from mora_dist.optim.allora import ALLoRA

# method name -> Adapter subclass, whose `config_class` is the method's config dataclass; each method's
# module registers both (`@register("lora", LoRAConfig)`), and importing this package imports every
# method module, so the registry is full before any config is built.
REGISTRY: dict = {}


def _fast_path_default() -> bool:
    """`adapter.fast_path`'s default; the environment variable MORA_DIST_ADAPTER_FAST=0 overrides it for
    processes that take no config (launch/bench.py's before/after subprocesses)."""
    return os.environ.get("MORA_DIST_ADAPTER_FAST", "1") != "0"


@dataclass
class MethodConfig:
    """The `adapter.*` keys every method has. A method subclasses it with its own keys, defaults and
    checks (LoRAConfig in lora.py, MoRAConfig in mora.py, VeRAConfig in vera.py); `AdapterConfig(method,
    **keys)` builds the right one. `r` is the LoRA-equivalent rank (MoRA derives its square size from
    it, VeRA uses it as the shared projection rank)."""

    method: str = ""
    r: int = 8
    seed: int = 0  # adapter init; VeRA's shared projections (PEFT's projection_prng_key)
    targets: list = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    # the merged-weight fast paths (`Adapter.factors`, `block_operator`, `AdaptedLinear`'s merged path);
    # false: the per-adapter index-map path everywhere (a reference, and before/after in docs/performance.md)
    fast_path: bool = field(default_factory=_fast_path_default)
    allora: Optional[ALLoRA] = None  # the ALLoRA gradient rule over this method (mora_dist/optim/allora.py)

    def __post_init__(self):
        cls = config_class(self.method)
        if type(self) is not cls:
            raise ValueError(f"adapter.method: {self.method!r} is configured by {cls.__name__}, "
                             f"not {type(self).__name__}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"adapter.r: rank must be a positive integer, got {self.r!r}")
        if not self.targets:
            raise ValueError("adapter.targets: empty target list")
        if isinstance(self.allora, dict):
            self.allora = ALLoRA(**self.allora)

    @property
    def allora_eta(self) -> Optional[float]:
        """ALLoRA's eta, None without the rule (what parallel/wrappers.py reads)."""
        return None if self.allora is None else self.allora.eta

    @classmethod
    def canonical_value(cls, key: str, value):
        """`adapter.<key>` in one form, so that equal settings written differently compare equal."""
        return value


def config_class(method: str) -> type:
    """The config dataclass of `adapter.method: method`."""
    if method not in REGISTRY:
        raise ValueError(f"adapter.method: unknown method {method!r}; choose one of {list(REGISTRY)}")
    return REGISTRY[method].config_class


def adapter_keys(data: dict, stored: bool = False) -> tuple[type, dict]:
    """(config class, keys) for an `adapter` mapping: the class named by its `method` (default lora) and
    its keys with the deprecated `allora_eta: eta` read as `allora: {eta: eta}`; a key the method does not
    have is an error naming it. `stored`: a config a checkpoint wrote (older ones hold every method's
    keys): keys of other methods are dropped, quietly."""
    cls = config_class(data.get("method", "lora"))
    data = dict(data)
    eta = data.pop("allora_eta", None)
    if eta is not None:
        if data.get("allora") is not None:
            raise ValueError("adapter.allora_eta: the old spelling of adapter.allora.eta; give only adapter.allora")
        if not stored:
            warnings.warn(f"adapter.allora_eta is deprecated: write adapter.allora: {{eta: {eta}}}", FutureWarning,
                          stacklevel=3)
        data["allora"] = {"eta": eta}
    names = [f.name for f in fields(cls)]
    if stored:
        return cls, {k: v for k, v in data.items() if k in names}
    for k in data:
        if k not in names:
            raise ValueError(f"adapter.{k}: not a key of adapter.method {cls.method!r} (its keys: {', '.join(names)})")
    return cls, data


def AdapterConfig(method: str = "lora", **keys) -> MethodConfig:  # noqa: N802 (a constructor by use)
    """The config of adapter method `method`, e.g. `AdapterConfig("mora", r=8, mora_type="rotation")`:
    an instance of that method's class. A key the method does not have is an error naming it."""
    cls, keys = adapter_keys(dict(keys, method=method))
    return cls(**keys)


@dataclass
class Shard:
    """The part of a (canonical) d_out x d_in linear layer this rank computes."""

    d_in: int
    d_out: int
    mode: str = "none"  # none | column | row
    out_rows: Optional[torch.Tensor] = None  # global output rows computed here (column); all rows otherwise
    in_start: int = 0
    in_end: Optional[int] = None
    sequence_parallel: bool = False
    tp_size: int = 1

    def __post_init__(self):
        if self.mode not in ("none", "column", "row"):
            raise ValueError(f"Shard.mode must be none|column|row, got {self.mode!r}")
        if self.out_rows is None:
            self.out_rows = torch.arange(self.d_out)
        self.out_rows = torch.as_tensor(self.out_rows, dtype=torch.long)
        if self.in_end is None:
            self.in_end = self.d_in
        if self.mode != "row" and (self.in_start, self.in_end) != (0, self.d_in):
            raise ValueError("only row-parallel shards split the input")
        if self.mode != "column" and len(self.out_rows) != self.d_out:
            raise ValueError("only column-parallel shards split the output")

    @property
    def in_cols(self) -> slice:
        return slice(self.in_start, self.in_end)

    @property
    def local_in(self) -> int:
        return self.in_end - self.in_start


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce over TP backward. Our own rather than megatron's
    `copy_to_tensor_model_parallel_region`: megatron 0.16 all-reduces `grad.contiguous()` and returns
    the *original* grad, so a non-contiguous incoming gradient (e.g. from a slice) silently skips
    the reduction."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    return _CopyToTP.apply(x)


def to_rows(h: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Replicated intermediate -> the column-parallel rank's rows (see module docstring)."""
    if shard.mode != "column" or shard.tp_size == 1:
        return h
    from megatron.core.tensor_parallel import mappings

    if shard.sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
    return copy_to_tp(h)


def tp_sum_grad(p: torch.Tensor, shard: Shard, after_comm: bool) -> torch.Tensor:
    """A replicated parameter whose gradient is summed over TP where the rank's share is partial.
    Use `Adapter.param` rather than this: sharded parameters must not be summed."""
    if shard.tp_size == 1 or shard.mode == "none":
        return p
    partial = shard.mode == "row" or after_comm or shard.sequence_parallel
    return copy_to_tp(p) if partial else p


def kaiming_uniform(shape, generator: torch.Generator, a: float = 0.0) -> torch.Tensor:
    """Kaiming-uniform over fan_in = shape[1], drawn from an explicit generator so every TP rank
    (and PEFT, for VeRA's a=0 projections) draws the same full tensor before slicing its shard."""
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@dataclass
class Factors:
    """An adapter's update on the rank's shard as three factors, for the merged-weight path of
    `AdaptedLinear` (mora_dist/parallel/merged.py):

        delta(x) = mid(x @ P^T) @ Q^T,   dW = Q mid P,   mid(h) = h (None) | h * mid (vector) | h @ mid^T (matrix)

    P [k, local d_in], mid, Q [local d_out, k'] are already in the activation dtype and carry gradients to
    the trainables (fp32 master weights are cast here: once a step inside `inject.fixed_adapters`, whose
    forwards and backwards all reuse the casts, so the ops here must keep no saved tensors; once per
    forward outside it; replicated ones pass `Adapter.merged_param`, which sums their gradients over TP). The layer adds Q (mid P)
    to its weight for the forward; the backward needs x @ P^T and g @ Q, skinny GEMMs. `p_key`:
    adapters with equal keys share an identical frozen P (VeRA's A), so x @ P^T is computed once.
    """

    P: torch.Tensor
    Q: torch.Tensor
    mid: Optional[torch.Tensor] = None
    p_key: Optional[tuple] = None
    # q_tile = n: Q is the frozen 0/1 map Q[j, s] = [s == j mod n] (MoRA's "tile" decompress on a
    # shard whose rows start at a multiple of n), so g Q is a sum of g's column blocks, not a GEMM
    q_tile: Optional[int] = None
    # p_tile = n: P is the frozen 0/1 map P[s, i] = [s == i mod n] over the whole input (MoRA's
    # "strided" compress, n <= d_in), so x P^T is a sum of x's column blocks (the last one wrapping)
    p_tile: Optional[int] = None


class Adapter(nn.Module):
    """Base class. Subclasses define `layout` (param name -> None | "in" | "out": which dim, if any,
    is sharded), `forward`, and `delta_weight`; optionally `factors` (unsharded fast path)."""

    layout: dict = {}

    config_class: type = MethodConfig  # set by `register`

    def __init__(self, cfg: MethodConfig, shard: Shard):
        super().__init__()
        self.cfg, self.shard = cfg, shard
        self.register_buffer("out_rows", shard.out_rows.clone(), persistent=False)
        self.deferred: set = set()  # replicated parameters whose gradients the caller sums over TP (merged_param)

    def is_sharded(self, name: str) -> bool:
        kind = self.layout[name]
        return (kind == "out" and self.shard.mode == "column") or (kind == "in" and self.shard.mode == "row")

    def param(self, name: str, x: torch.Tensor, after_comm: bool) -> torch.Tensor:
        """Parameter `name` in x's dtype for the forward; replicated ones get TP-summed gradients
        where this rank's share is partial (module docstring)."""
        p = getattr(self, name)
        if not self.is_sharded(name):
            p = tp_sum_grad(p, self.shard, after_comm)
        return p.to(x.dtype)

    def shard_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """The rank's shard of a full (TP=1) tensor of parameter `name`."""
        kind = self.layout[name]
        if kind is None:
            return full
        dim = self.layout_dim(name)
        if kind == "out":
            return full.index_select(dim, self.shard.out_rows.to(full.device))
        return full.narrow(dim, self.shard.in_start, self.shard.local_in)

    def layout_dim(self, name: str) -> int:
        return 0 if self.layout[name] == "out" else -1

    def sharded_tensor(self, key: str, t: torch.Tensor, name_or_axis: str):
        """megatron ShardedTensor of a local tensor of this adapter for dist_checkpointing, in the
        canonical (TP=1) layout: `name_or_axis` is a parameter name (split like that parameter, e.g.
        for its Adam moments) or an explicit 'out' | 'in' split (the base rows the adapter writes to)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        s = self.shard
        kind = name_or_axis if name_or_axis in ("out", "in") else (
            self.layout[name_or_axis] if self.is_sharded(name_or_axis) else None)
        dp = ps.get_data_parallel_rank()
        tp_rank = ps.get_tensor_model_parallel_rank()
        if kind is None or s.tp_size == 1:
            return ShardedTensor.from_rank_offsets(key, t, replica_id=(tp_rank if s.tp_size > 1 else 0, dp))
        if kind == "out":
            n = len(s.out_rows)
            axis, chunk, total = 0, int(s.out_rows[0]) // n, s.d_out // n
        else:
            n = s.local_in
            axis, chunk, total = t.ndim - 1, s.in_start // n, s.d_in // n
        return ShardedTensor.from_rank_offsets(key, t, (axis, chunk, total), replica_id=(0, dp))

    @torch.no_grad()
    def load_full_(self, tensors: dict) -> None:
        """Load full (unsharded) values of the trainable parameters into this rank's shards."""
        for name, full in tensors.items():
            getattr(self, name).copy_(self.shard_of(name, full))

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:  # pragma: no cover
        raise NotImplementedError

    # --- method hooks (defaults; a method overrides what it needs) ----------------------------
    def on_restart(self, generator: torch.Generator, cycle_types: tuple) -> None:
        """A ReLoRA-style restart, after this adapter's dW was folded into the base: start again at dW = 0.
        `cycle_types`: ReMoRA's type schedule (MoRA operator types; empty = no cycling)."""
        self.reset_parameters(generator)

    def after_restarts(self, n: int, cycle_types: tuple) -> None:
        """On resume: a freshly built adapter takes the settings it has after `n` restarts (not its weights)."""

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # Set by `parallel.inject.defer_tp_grads` (the Trainer): replicated parameters of the merged path
    # then keep their partial gradients, summed over TP once a step, not once per micro-batch.
    defer_tp_grad = False

    def merged_param(self, name: str) -> torch.Tensor:
        """Parameter `name` for the merged-weight path (fp32; the caller casts). There the layer
        computes its own rows (column) or its own input columns (row) from the merged weight, so a
        replicated parameter's local gradient is always partial: it is summed over TP, in the
        backward, or (`defer_tp_grad`) by the caller after the step's micro-batches; `deferred`
        names the parameters left to it."""
        p = getattr(self, name)
        if self.is_sharded(name) or self.shard.tp_size == 1 or self.shard.mode == "none":
            return p
        if self.defer_tp_grad:
            self.deferred.add(name)
            return p
        return copy_to_tp(p)

    def factors(self, dtype: torch.dtype, cast: bool = True) -> Optional[Factors]:
        """`Factors` of the rank's shard of this adapter (any TP), or None (use `forward`). `cast=False`:
        the tensors computed from trainables stay in the trainables' dtype (fp32) for the caller to cast
        (`AdaptedLinear`'s step gradient accumulation roots their backward there); frozen ones are in dtype."""
        return None

    def block_operator(self):
        """MoRA block types only (mora.py); None: not a block-diagonal operator."""
        return None

    @property
    def unsharded(self) -> bool:
        """True on an unsharded layer (TP=1) while the fast paths are on (`adapter.fast_path`)."""
        return self.cfg.fast_path and (self.shard.tp_size == 1 or self.shard.mode == "none")

    @property
    def fast(self) -> bool:
        """The merged-weight fast paths are on (`adapter.fast_path`); they serve shards at any TP."""
        return self.cfg.fast_path


def register(name: str, config: type):
    """Class decorator: make an Adapter subclass the method `adapter.method: name`, configured by the
    MethodConfig subclass `config` (whose `method` default is `name`)."""
    def deco(cls):
        if config.__dataclass_fields__["method"].default != name:
            raise TypeError(f"{config.__name__}.method must default to {name!r}")
        REGISTRY[name], cls.config_class = cls, config
        return cls
    return deco


def build_adapter(cfg: MethodConfig, shard: Shard, seed: int = 0, **kw) -> Adapter:
    return REGISTRY[cfg.method](cfg, shard, seed=seed, **kw)
