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
