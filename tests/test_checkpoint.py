"""Distributed adapter checkpoints: resume gives the uninterrupted losses, also at another TP size
and across ReMoRA restarts (folded base rows + MoRA grouping restored); saves are atomic."""
import pytest
import os

from dist import run_ranks
from train_utils import tiny_config

pytestmark = pytest.mark.integration  # multi-process / subprocess: outside the fast unit subset

OVR = {"adapter.method": "mora", "adapter.r": 4, "train.steps": 7, "restarts.every": 3, "restarts.warmup": 1,
       "restarts.prune": 0.9}


def _train_and_save(rank, tmp, ckpt, overrides, save_at):
    from mora_dist.checkpoint import state
    from mora_dist.training.loop import Trainer

    t = Trainer(tiny_config(tmp, **overrides))
    losses = []
    while t.step < t.cfg.train.steps:
        losses.append(t.train_step()["loss"])
        if t.step == save_at:
            state.save(t, ckpt)
    return losses


def _resume(rank, tmp, ckpt, overrides):
    from mora_dist.checkpoint import state
    from mora_dist.training.loop import Trainer

    t = Trainer(tiny_config(tmp, **overrides))
    state.load(t, state.latest(ckpt))
    start = t.step
    return start, [t.train_step()["loss"] for _ in range(t.cfg.train.steps - t.step)]


def test_resume_matches_uninterrupted_same_and_other_tp(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    full = run_ranks(_train_and_save, 2, tmp_path, ckpt, {**OVR, "parallel.tp": 2}, 4, tp=2)[0]
    # resumed after a restart (step 3) at step 4: same TP, then TP=1 and DP=2 from the TP=2 checkpoint
    for world, tp in [(2, 2), (1, 1), (2, 1)]:
        start, rest = run_ranks(_resume, world, tmp_path, ckpt, {**OVR, "parallel.tp": tp}, tp=tp)[0]
        assert start == 4
        for a, b in zip(rest, full[4:]):
            assert abs(a - b) <= 1e-4 * abs(b), (world, tp, rest, full[4:])
    assert sorted(os.listdir(ckpt)) == ["latest", "step_0000004"]


def _crash_during_save(rank, tmp, ckpt, overrides):
    from mora_dist.checkpoint import state
    from mora_dist.training.loop import Trainer

    t = Trainer(tiny_config(tmp, **overrides))
    t.train_step()
    os.makedirs(os.path.join(ckpt, "step_0000009.tmp.other-run"))  # another writer's save in progress
    state.save(t, ckpt)
    t.train_step()
    from megatron.core import dist_checkpointing

    write = dist_checkpointing.save

    def write_then_die(*args, **kwargs):  # the writer dies after the shards, before the rename
        write(*args, **kwargs)
        raise RuntimeError("simulated crash before the checkpoint is published")

    dist_checkpointing.save = write_then_die
    try:
        state.save(t, ckpt)
    except RuntimeError:
        pass
    finally:
        dist_checkpointing.save = write
    return sorted(os.listdir(ckpt))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    listing = run_ranks(_crash_during_save, 1, tmp_path, ckpt, OVR)[0]
    assert listing[:2] == ["latest", "step_0000001"] and len(listing) == 4
    assert listing[2].startswith("step_0000002.tmp.")  # this save's own, uniquely named temporary
    assert listing[3] == "step_0000009.tmp.other-run"  # a save deletes only its own temporary folder
    start, _ = run_ranks(_resume, 1, tmp_path, ckpt, {**OVR, "train.steps": 2})[0]
    assert start == 1
