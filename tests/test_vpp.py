"""Interleaved pipeline schedule (`parallel.vpp`): PP=2 x VPP=2 gives PP=1's and PP=2's losses,
gradient norms and eval loss from one HF checkpoint; its checkpoints resume identically (also at
PP=1: the keys do not depend on the split); restarts and merge/export walk every model chunk."""
import pytest
import torch

from dist import run_ranks
from train_utils import tiny_config

pytestmark = pytest.mark.integration  # multi-process: outside the fast unit subset

BASE = {"adapter.method": "mora", "adapter.r": 4, "train.steps": 4}


def _make_hf(path):
    from test_restarts import _make_hf as make

    return make(path, layers=4)


def _train(rank, tmp, overrides):
    from megatron.core import parallel_state as ps

    from mora_dist.parallel.inject import named_adapters
    from mora_dist.training.loop import Trainer

    t = Trainer(tiny_config(tmp, **overrides))
    steps = [t.train_step() for _ in range(t.cfg.train.steps)]
    ev = t.evaluate()["eval/domain_loss"]
    # global layer index of each chunk's layers, in chunk order
    layers = [[layer.layer_number - 1 for layer in c.decoder.layers] for c in t.chunks]
    return dict(loss=[s["loss"] for s in steps], gnorm=[s["grad_norm"] for s in steps], eval=ev, layers=layers,
                keys=sorted(k for k, *_ in named_adapters(t.model)), pp_rank=ps.get_pipeline_model_parallel_rank())


def _close(got, ref, rel=1e-4):
    return all(abs(a - b) <= rel * abs(b) for a, b in zip(got, ref)) and len(got) == len(ref)


def test_pp2_vpp2_matches_pp1_and_pp2(tmp_path):
    over = {**BASE, "model.hf_dir": _make_hf(tmp_path / "hf")}
    ref = run_ranks(_train, 1, tmp_path, over)[0]
    pp2 = run_ranks(_train, 2, tmp_path, {**over, "parallel.pp": 2}, pp=2)
    vpp = run_ranks(_train, 2, tmp_path, {**over, "parallel.pp": 2, "parallel.vpp": 2}, pp=2, vpp=2)
    assert ref["loss"][-1] < ref["loss"][0] - 0.05, ref["loss"]  # it learns
    # rank r's chunk v holds global virtual stage v * pp + r: layers [0], [2] on rank 0, [1], [3] on rank 1
    assert [r["layers"] for r in vpp] == [[[0], [2]], [[1], [3]]]
    assert [r["layers"] for r in pp2] == [[[0, 1]], [[2, 3]]]
    # the same adapter keys (global layer names) under every split
    assert sorted(vpp[0]["keys"] + vpp[1]["keys"]) == sorted(pp2[0]["keys"] + pp2[1]["keys"]) == ref["keys"]
    for name, got in [("pp2", pp2), ("pp2 x vpp2", vpp)]:
        for r in got:  # every rank reports the same loss and norm
            assert _close(r["loss"], ref["loss"]), (name, r["loss"], ref["loss"])
            assert _close(r["gnorm"], ref["gnorm"], 1e-3), (name, r["gnorm"], ref["gnorm"])
            assert abs(r["eval"] - ref["eval"]) <= 1e-4 * ref["eval"], (name, r["eval"], ref["eval"])


RESTART = {**BASE, "train.steps": 6, "restarts.every": 3, "restarts.warmup": 1, "restarts.prune": 0.9}


def _run(tmp, over, ckpt=None, save_at=None):
    from mora_dist.checkpoint import state
    from mora_dist.training.loop import Trainer

    t = Trainer(tiny_config(tmp, **over))
    if ckpt and save_at is None:
        state.load(t, state.latest(ckpt))
    start, losses = t.step, []
    while t.step < t.cfg.train.steps:
        losses.append(t.train_step()["loss"])
        if t.step == save_at:
            state.save(t, ckpt)
    return start, losses


def _vpp_train_resume_export(rank, tmp, over, ckpt, out):
    """PP=2 x VPP=2: train through a restart (step 3) saving at step 4, resume from it, merge + export."""
    from mora_dist.checkpoint import state
    from mora_dist.export.merge import config_from_checkpoint, merge_and_export

    _, full = _run(tmp, over, ckpt, save_at=4)
    start, resumed = _run(tmp, over, ckpt)
    path = state.latest(ckpt)
    merge_and_export(config_from_checkpoint(path), path, out)
    return dict(full=full, start=start, resumed=resumed)


def _pp1_reference(rank, tmp, over, ckpt, out_vpp, out):
    """PP=1: the same run uninterrupted, a resume from the VPP checkpoint, the merged export, and the VPP
    run's Megatron export loaded into a PP=1 model."""
    from megatron.core import dist_checkpointing

    from mora_dist.checkpoint import state
    from mora_dist.export.merge import config_from_checkpoint, load_merged, merge_and_export

    _, full = _run(tmp, over)
    start, resumed = _run(tmp, over, ckpt)
    path = state.latest(ckpt)
    cfg = config_from_checkpoint(path, tp=1, pp=1)
    merge_and_export(cfg, path, out)
    [merged], _ = load_merged(cfg, path)
    [fresh], _ = load_merged(cfg, path)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), f"{out_vpp}/megatron"), strict=False)
    meg = max((a - b).abs().max().item() for a, b in zip(merged.parameters(), fresh.parameters()))
    return dict(full=full, start=start, resumed=resumed, megatron_diff=meg)


def _safetensors(folder):
    import glob

    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(f"{folder}/*.safetensors")):
        out.update(load_file(f))
    return out


def test_vpp2_restart_resume_and_merge_export(tmp_path):
    """At PP=2 x VPP=2 a ReMoRA restart folds every chunk (losses = PP=1's through it); its checkpoint
    resumes identically at VPP=2 and at PP=1; merge/export from the chunks writes PP=1's merged model."""
    over = {**RESTART, "model.hf_dir": _make_hf(tmp_path / "hf")}
    ckpt, out_vpp, out_pp1 = str(tmp_path / "ckpt"), str(tmp_path / "merged_vpp"), str(tmp_path / "merged_pp1")
    vpp = run_ranks(_vpp_train_resume_export, 2, tmp_path, {**over, "parallel.pp": 2, "parallel.vpp": 2}, ckpt,
                    out_vpp, pp=2, vpp=2)
    ref = run_ranks(_pp1_reference, 1, tmp_path, over, ckpt, out_vpp, out_pp1)[0]
    assert ref["full"][-1] < ref["full"][0], ref["full"]
    for r in vpp:
        assert _close(r["full"], ref["full"]), (r["full"], ref["full"])  # through the restart at step 3
        assert r["start"] == 4 and _close(r["resumed"], r["full"][4:]), (r["resumed"], r["full"])
    assert ref["start"] == 4 and _close(ref["resumed"], ref["full"][4:]), (ref["resumed"], ref["full"])
    assert ref["megatron_diff"] < 1e-6, ref["megatron_diff"]
    got, want = _safetensors(f"{out_vpp}/hf"), _safetensors(f"{out_pp1}/hf")
    assert sorted(got) == sorted(want) and len(want) == 4 * 9 + 3
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-6), name
