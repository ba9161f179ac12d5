"""Distributed checkpoints of what trains (adapters, full-rank parts) with megatron-core `dist_checkpointing`.

What is saved, as ShardedTensors in the *canonical* (TP/PP/DP-independent) layout, so a checkpoint
written at one TP/PP/DP layout loads at another:
- every adapter parameter and its two Adam moments (key: global layer name + canonical target);
- every full-rank parameter (`train.full_rank`: embedding, output layer, norms; key `full_rank.` +
  its name with the global layer index), its Adam moments and, for a bf16 base, its fp32 master
  weight (`.main`);
- after restarts, the folded base rows of every adapted projection and their bf16 merge residual
  (restarts changed exactly those rows; the untouched base comes from the model's source);
- common state: step, restart count, Adam step counts (of every rank's parameters), the config,
  torch RNG state.
Keys use the global transformer-layer index, so PP splits do not change them. The Adam state is
read through `optim.adam_state.adam_state`, so torch AdamW and megatron's DistributedOptimizer
write the same checkpoint (either resumes the other). The DistributedOptimizer holds each
parameter's state in DP shards: a save gathers them over DP, one parameter at a time, and holds the
whole state (the size torch AdamW keeps all along) until the files are written.

Saves are atomic: everything is written to `step_N.tmp.<id>/` (a name unique to this save), then
rank 0 renames it to `step_N/` and atomically replaces `latest` (a one-line file). A crash mid-save
leaves the previous checkpoint and `latest` untouched. A save removes only its own temporary
folder; folders left by a crashed run are removed by the next run that holds the directory's lock
(`mora_dist/training/preflight.py`), never by a save that might race a live writer.

Rotation (`checkpoint.keep`): N >= 1 keeps the newest N published `step_*` folders up to the step
just saved (that one included); 0 or -1 keeps all. Folders of a *later* step than the one saved
(left by a run that resumed from an older checkpoint because a newer one was damaged) are never
rotated away: they are the user's, and `integrity.py` explains why they were skipped.
"""
from __future__ import annotations

import os
import shutil
import uuid

import torch
import torch.distributed as dist


def _entries(model):
    from mora_dist.parallel.inject import named_adapters

    return named_adapters(model)


def _full_rank(trainer, parts=None) -> list:
    """The trainer's full-rank parameters (`training.optimizer.FullRankParam`), of `parts` only when given."""
    return [f for f in getattr(trainer, "full_rank", ()) if parts is None or f.part in parts]


def sharded_state_dict(trainer, full_rank_parts=None) -> dict:
    """The layers' own entries (`AdaptedLinear.sharded_state_dict`), each adapter parameter's Adam
    moments split like the parameter, the full-rank parameters (of `full_rank_parts`, default all)
    with their moments and fp32 masters, and the common state. Collective."""
    from mora_dist.parallel.inject import adapted_layers
    from mora_dist.optim.adam_state import MOMENTS, adam_state

    states = adam_state(trainer.opt)
    sd, steps = {}, {}
    for layer in adapted_layers(trainer.model):
        sd.update(layer.sharded_state_dict(with_base_rows=bool(trainer.restarts)))
    for key, layer, target, a in _entries(trainer.model):
        for n, p in a.named_parameters():
            st = states.full(p)
            for m in MOMENTS:
                sd[f"{key}.{n}.{m}"] = a.sharded_tensor(f"{key}.{n}.{m}", st[m], n)
            steps[f"{key}.{n}"] = st["step"]
    for f in _full_rank(trainer, full_rank_parts):
        st = states.full(f.param, main=f.param.dtype != torch.float32)
        sd[f.key] = f.sharded_tensor(f.key, f.param.data)
        for m in MOMENTS:
            sd[f"{f.key}.{m}"] = f.sharded_tensor(f"{f.key}.{m}", st[m])
        if st["main"] is not None:
            sd[f"{f.key}.main"] = f.sharded_tensor(f"{f.key}.main", st["main"])
        steps[f.key] = st["step"]
    # the common state is written by rank 0 alone: it carries every rank's step counts (other stages' parameters)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, steps)
    steps = {k: v for d in every for k, v in d.items()}
    sd["common"] = dict(step=trainer.step, restarts=trainer.restarts, adam_steps=steps,
                        rng=torch.get_rng_state(), config=trainer.cfg.to_dict())
    return sd


def latest(ckpt_dir: str) -> str | None:
    """The folder `latest` names, when it exists (see `integrity.select_resume` for a checked choice)."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    full = os.path.join(ckpt_dir, name)
    return full if name and os.path.isdir(full) else None


def rotate(ckpt_dir: str, step: int, keep: int) -> list[str]:
    """Delete published checkpoints older than the newest `keep` up to `step`; returns what was removed."""
    from mora_dist.checkpoint.integrity import step_dirs

    if keep is None or keep <= 0:  # 0 / -1: keep everything
        return []
    upto = [path for s, path in step_dirs(ckpt_dir) if s <= step]
    doomed = upto[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _publish_latest(ckpt_dir: str, name: str) -> None:
    tmp = os.path.join(ckpt_dir, f"latest.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, "latest"))


def save(trainer, ckpt_dir: str, keep: int = 2) -> str:
    """Collective. Write `ckpt_dir/step_N` atomically, point `latest` at it, rotate (see module doc)."""
    from megatron.core import dist_checkpointing

    name = f"step_{trainer.step:07d}"
    final = os.path.join(ckpt_dir, name)
    box = [None]
    if dist.get_rank() == 0:
        box[0] = os.path.join(ckpt_dir, f"{name}.tmp.{uuid.uuid4().hex[:12]}")
        os.makedirs(box[0])
    dist.broadcast_object_list(box, src=0)
    tmp = box[0]
    dist_checkpointing.save(sharded_state_dict(trainer), tmp)  # a failure leaves tmp, as a kill would
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):  # the same step again (a resumed run redid it): replace, via a rename
            old = f"{final}.old.{uuid.uuid4().hex[:12]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _publish_latest(ckpt_dir, name)
        rotate(ckpt_dir, trainer.step, keep)
    dist.barrier()
    return final


@torch.no_grad()
def load(trainer, path: str) -> None:
    """Restore adapters, full-rank parts, optimizer state, schedule position, restarts (folded base
    rows, MoRA types). Full-rank parts the checkpoint's run did not train (train.full_rank changed
    under checkpoint.allow_config_change) keep the model's source values and start a fresh Adam state."""
    from megatron.core import dist_checkpointing

    from mora_dist.optim.adam_state import MOMENTS, adam_state

    common = dist_checkpointing.load_common_state_dict(path)["common"] if hasattr(
        dist_checkpointing, "load_common_state_dict") else None
    restarts = common["restarts"] if common else 0
    saved_parts = set(((common or {}).get("config") or {}).get("train", {}).get("full_rank", []))
    trainer.restarts = restarts  # so that the base rows are part of the requested state
    if restarts:  # make sure residual buffers exist where a bf16 base was compensated
        for _, layer, _, _ in _entries(trainer.model):
            layer.ensure_merge_residual()
    sd = sharded_state_dict(trainer, saved_parts)
    loaded = dist_checkpointing.load(sd, path)
    common = loaded["common"]
    states = adam_state(trainer.opt)
    for key, layer, target, a in _entries(trainer.model):
        for n, p in a.named_parameters():
            p.copy_(loaded[f"{key}.{n}"])
            states.load(p, {m: loaded[f"{key}.{n}.{m}"] for m in MOMENTS}, common["adam_steps"][f"{key}.{n}"])
        if restarts:
            layer.load_base_rows(target, loaded.get(f"{key}.base"), loaded.get(f"{key}.base_residual"))
            a.after_restarts(restarts, trainer.cfg.restarts.mora_cycle)
    for f in _full_rank(trainer, saved_parts):
        f.param.copy_(loaded[f.key])
        states.load(f.param, {m: loaded[f"{f.key}.{m}"] for m in MOMENTS}, common["adam_steps"][f.key],
                    main=loaded.get(f"{f.key}.main"))
    trainer.step = int(common["step"])
    torch.set_rng_state(common["rng"])
