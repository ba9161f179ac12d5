"""ReLoRA / ReMoRA restarts: fold the adapters into the frozen shards, start fresh adapters.

At a restart (every `restarts.every` steps) each adapted layer adds its dW shard to its frozen
weight shard (`AdaptedLinear.fold`, compensated when the base is bf16: see wrappers.py), the
adapter is re-initialised (LoRA: A Kaiming-uniform from a new seed, B zero; MoRA: M zero; VeRA:
d = d_init, b = 0), MoRA moves to the next grouping of `restarts.mora_types` (the paper's 1 -> 2 -> 1
by default; [1, 2, 3, 4] is the authors' released ResetReloraCallback) so successive updates use
different groupings, and the adapters' Adam states are either magnitude-pruned (ReLoRA: zero every
entry below the `prune` quantile of |state|, computed over the whole TP-sharded tensor; prune = 1.0
zeroes the moments, the MoRA authors' pretraining setting) with the step count kept, or, with
`restarts.reset_optimizer: delete`, deleted with their step count (Adam's bias correction starts
over). Full-rank parts (`train.full_rank`: embeddings, output layer, norms) are not touched: their
weights and Adam state carry on. The jagged LR schedule (schedule.py) re-warms after each restart. The model output is
unchanged at the moment of the restart: W + dW before, (W + dW) + 0 after.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist



def _global_quantile(t: torch.Tensor, q: float, sharded: bool) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    v = t.detach().abs().flatten().float()
    if sharded and ps.get_tensor_model_parallel_world_size() > 1:
        group = ps.get_tensor_model_parallel_group()
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([v.numel()]), group=group)
        n = max(int(s.item()) for s in sizes)
        padded = torch.full((n,), float("nan"))
        padded[: v.numel()] = v
        parts = [torch.empty(n) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        v = torch.cat(parts)
        v = v[~v.isnan()]
    return torch.quantile(v.double(), q).to(t.dtype) if v.numel() <= 16_000_000 else v.kthvalue(
        max(1, int(q * v.numel()))).values.to(t.dtype)


@torch.no_grad()
def prune_optimizer_states(model, opt, quantile: float, delete: bool = False) -> None:
    """Zero the adapters' Adam moments below the `quantile` of |state| (global over TP shards and,
    with the DistributedOptimizer, over the DP ranks holding parts of each parameter); quantile >= 1
    zeroes them entirely; `delete` drops each adapter parameter's state (moments and step count), so
    the optimizer builds it afresh at the next step. Only the adapters' state: full-rank parts
    (train.full_rank) keep theirs, as they keep their weights."""
    from mora_dist.parallel.inject import adapted_layers
    from mora_dist.optim.adam_state import adam_state

    states = adam_state(opt)
    owners = {}
    for layer in adapted_layers(model):
        for a in layer.adapters.values():
            for n, p in a.named_parameters():
                owners[p] = a.is_sharded(n)
    for p, sharded in owners.items():
        if delete:
            states.delete(p)
            continue
        if not states.has(p):
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            s = states.local(p, key)  # this rank's state: all of p, or its DP range of p
            if quantile >= 1.0:
                if s is not None:
                    s.zero_()
                continue
            threshold = _global_quantile(states.gathered(p, key), quantile, sharded)
            if s is not None:
                s.masked_fill_(s.abs() < threshold, 0.0)


@torch.no_grad()
def restart_model(model, opt, n_restart: int, seed: int, mora_types: tuple, prune: float,
                  delete_state: bool = False) -> None:
    """The restart itself, for any loop: fold, re-initialise (seeded by restart count, the layer's
    global name and the target, so the new adapters do not depend on the pipeline layout), move MoRA
    to the next grouping of `mora_types` (operator types; () = keep), prune or delete the adapters'
    optimizer states."""
    from mora_dist.parallel.inject import adapted_layers

    for layer in adapted_layers(model):
        layer.fold()
        for name, a in layer.adapters.items():
            s = seed * 1_000_003 + zlib.crc32(f"restart{n_restart}:{layer.global_name}:{name}".encode())
            a.on_restart(torch.Generator().manual_seed(s), mora_types)
    prune_optimizer_states(model, opt, prune, delete_state)


def restart(trainer, step: int) -> None:
    """A restart of the training loop (`Trainer`) at `step`."""
    cfg = trainer.cfg
    trainer.restarts += 1
    r = cfg.restarts
    restart_model(trainer.model, trainer.opt, trainer.restarts, cfg.adapter.seed, r.mora_cycle, r.prune,
                  r.reset_optimizer == "delete")
