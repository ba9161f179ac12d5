"""Continual pretraining from an HF checkpoint: PP=2 (and TP=2) training gives the single-process
losses; after training with a ReMoRA restart, merge + export: transformers' logits of the merged
HF export and the reloaded Megatron checkpoint equal the training model's logits."""
import pytest
import subprocess
import sys
from pathlib import Path

import torch

from dist import run_ranks
from train_utils import tiny_config

pytestmark = pytest.mark.integration  # multi-process / subprocess: outside the fast unit subset

ROOT = Path(__file__).resolve().parents[1]
V = 256


def _make_hf(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=128, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _over(hf, **kw):
    return {"model.hf_dir": hf, "adapter.method": "mora", "adapter.r": 4, "train.steps": 6,
            "restarts.every": 3, "restarts.warmup": 1, "restarts.prune": 1.0, **kw}


def _train(rank, tmp, over, ckpt=None):
    from mora_dist.checkpoint import state
    from mora_dist.training.loop import Trainer

    t = Trainer(tiny_config(tmp, **over))
    losses = [t.train_step()["loss"] for _ in range(t.cfg.train.steps)]
    if ckpt:
        state.save(t, ckpt)
    return losses


def _logits_after_merge(rank, tmp, over, ckpt, out):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from mora_dist.checkpoint import state
    from mora_dist.export.merge import config_from_checkpoint, load_merged, merge_and_export
    from mora_dist.training.loop import Trainer

    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(9))
    pos = torch.arange(16).expand(2, -1)
    t = Trainer(tiny_config(tmp, **over))
    state.load(t, state.latest(ckpt))
    with torch.no_grad():
        train_logits = t.model(ids, pos, None)
    path = state.latest(ckpt)
    cfg = config_from_checkpoint(path)
    merge_and_export(cfg, path, out)
    [fresh], _ = load_merged(cfg, path)  # same layout, then overwrite from the Megatron checkpoint
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
        sd = dist_checkpointing.load(fresh.sharded_state_dict(), f"{out}/megatron")
        fresh.load_state_dict(sd, strict=False)
        meg_logits = fresh(ids, pos, None)
    import torch.distributed as dist

    def gather_vocab(x):
        parts = [torch.empty_like(x) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, -1)[..., :V]

    return dict(ids=ids, train=gather_vocab(train_logits), megatron=gather_vocab(meg_logits))


def test_pp2_tp2_training_from_hf_then_merge_export(tmp_path):
    hf = _make_hf(tmp_path / "hf")
    ref = run_ranks(_train, 1, tmp_path, _over(hf))[0]
    pp2 = run_ranks(_train, 2, tmp_path, _over(hf, **{"parallel.pp": 2}), pp=2)
    ckpt = str(tmp_path / "ckpt")
    tp2 = run_ranks(_train, 2, tmp_path, _over(hf, **{"parallel.tp": 2}), ckpt, tp=2)[0]
    assert ref[-1] < ref[0]
    for name, got in [("pp2", pp2[1]), ("tp2", tp2)]:
        for a, b in zip(got, ref):
            assert abs(a - b) <= 1e-4 * abs(b), (name, got, ref)

    out = str(tmp_path / "merged")
    res = run_ranks(_logits_after_merge, 2, tmp_path, _over(hf, **{"parallel.tp": 2}), ckpt, out, tp=2)[0]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(f"{out}/hf").eval()
    with torch.no_grad():
        hf_logits = merged(res["ids"]).logits
    assert (hf_logits - res["train"]).abs().max() < 1e-4
    assert (res["megatron"] - res["train"]).abs().max() < 1e-5
    base = AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        assert (base(res["ids"]).logits - res["train"]).abs().max() > 1e-3  # training changed the model


def test_merge_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "merge.py"), "--checkpoint", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr
