"""Value ranges of the training config, checked before any rank starts.

Without them a bad value reaches the ranks and fails deep inside (``train.micro_batch=0``: a
ZeroDivisionError in the batch arithmetic) or trains silently on nonsense (``train.lr=-1``, a
negative blend weight). Each rule names its key, so the error tells the user what to change.
Cross-key rules that need the launch environment (world size, TP/PP) stay in ``config.validate``.
"""
from __future__ import annotations

import math
import numbers

# key -> (test, what the value must be); the test receives a number that is not a bool
_POS = (lambda v: v > 0, "> 0")
_NONNEG = (lambda v: v >= 0, ">= 0")
RANGES = {
    "model.num_layers": _POS, "model.hidden_size": _POS, "model.ffn_hidden_size": _POS,
    "model.num_attention_heads": _POS, "model.num_query_groups": _POS, "model.vocab_size": _POS,
    "model.rope_theta": _POS, "model.norm_eps": _POS,
    "data.seq_length": _POS, "data.eod_id": _NONNEG, "data.eval_batches": _POS, "data.seed": _NONNEG,
    "train.steps": _POS, "train.micro_batch": _POS, "train.global_batch": _POS, "train.lr": _POS,
    "train.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "train.full_rank_lr": (lambda v: v >= 0, ">= 0 (0 = full-rank parts fixed; null = train.lr)"), "train.warmup": _NONNEG,
    "train.weight_decay": _NONNEG, "train.clip_grad": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "train.eval_every": (lambda v: v >= 0, ">= 0 (0 = no periodic eval)"), "train.log_every": _POS,
    "restarts.every": (lambda v: v >= 0, ">= 0 (0 = no restarts)"), "restarts.warmup": _NONNEG,
    "restarts.prune": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "checkpoint.every": (lambda v: v >= 0, ">= 0 (0 = only at the end and on a signal)"),
    "checkpoint.keep": (lambda v: v >= -1, ">= -1 (N >= 1: keep the newest N; 0 or -1: keep all)"),
    "run.peak_tflops": _POS,
    "parallel.overlap_sm_carveout": (lambda v: 0 <= v < 128, "in [0, 128) (SMs; 0 = off)"),
}


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_ranges(cfg, error) -> None:
    """Raise ``error(message)`` for the first value outside its range (NaN and inf are never valid)."""
    for key, (ok, what) in RANGES.items():
        v = _get(cfg, key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
            raise error(f"{key} must be {what}, got {v!r}")
    m = cfg.model
    # with hf_dir these are its config.json's values (config.resolve_model_shape), where head_dim may be explicit
    if not m.hf_dir and m.hidden_size % m.num_attention_heads:
        raise error(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                    f"{m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        raise error(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                    f"model.num_query_groups={m.num_query_groups}")
    if cfg.data.eod_id >= m.vocab_size:
        raise error(f"data.eod_id={cfg.data.eod_id} is outside the model vocabulary (model.vocab_size="
                    f"{m.vocab_size}); set the eod id the data was tokenized with")
    if cfg.restarts.reset_optimizer not in ("prune", "delete"):
        raise error(f"restarts.reset_optimizer must be prune or delete, got {cfg.restarts.reset_optimizer!r}")
    from mora_dist.training.config import FULL_RANK_PARTS, OPTIMIZERS

    if cfg.train.optimizer not in OPTIMIZERS:
        raise error(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.train.optimizer!r}")
    for part in cfg.train.full_rank:
        if part not in FULL_RANK_PARTS:
            raise error(f"train.full_rank: unknown part {part!r}; known: {', '.join(FULL_RANK_PARTS)}")
    if len(set(cfg.train.full_rank)) != len(cfg.train.full_rank):
        raise error(f"train.full_rank lists a part twice: {cfg.train.full_rank}")
    from mora_dist.adapters.mora import cycle_of

    try:
        cycle_of(cfg.restarts.mora_types)
    except ValueError as e:
        raise error(str(e)) from None
    if cfg.checkpoint.every and not cfg.checkpoint.dir:
        raise error(f"checkpoint.every={cfg.checkpoint.every} but checkpoint.dir is not set")
    for name in ("run.name", "run.out_dir"):
        if not str(_get(cfg, name)).strip():
            raise error(f"{name} must not be empty")
    check_blend(cfg.data.train, error)


def check_blend(items, error) -> None:
    """data.train: a list of {path: prefix, weight: w > 0}; an unknown key (``wieght``) is an error,
    not a silent weight of 1."""
    if not items:
        raise error("data.train: no training data given (list of {path, weight})")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            raise error(f"data.train[{i}]: expected {{path: prefix, weight: w}}, got {item!r}")
        unknown = sorted(set(item) - {"path", "weight"})
        if unknown:
            raise error(f"data.train[{i}]: unknown key {unknown[0]!r} (known: path, weight)")
        w = item.get("weight", 1.0)
        if isinstance(w, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                w = float(w)
            except ValueError:
                pass
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w <= 0:
            raise error(f"data.train[{i}].weight must be a number > 0, got {w!r}")
