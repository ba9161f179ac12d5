"""The shared optimizer step (mora_dist/training/step.py) against the hand-written steps it replaced:
the research scripts' plain loop (zero, backward, torch's clip_grad_norm_, AdamW) and the Trainer's
(megatron schedule, DP sync, TP/PP grad norm, host-side clip). Identical losses, norms and weights,
bit for bit."""
import math

import pytest
import torch

from dist import run_ranks
from train_utils import tiny_config


def _tiny_lm(seed=0, vocab=32, hidden=16):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, vocab))


def _batches(n, vocab=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (4, 9), generator=g) for _ in range(n)]


def _loss(model, w):
    logits = model(w[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())


def _old_plain_loop(max_norm, steps=8):
    """The research scripts' step before step.py (launch/research/pretrain_relora.py)."""
    model = _tiny_lm()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, betas=(0.9, 0.95), weight_decay=0.01)
    out = []
    for w in _batches(steps):
        loss = _loss(model, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        out.append((loss.item(), gn.item()))
    return out, model


def _new_plain_loop(max_norm, steps=8):
    from mora_dist.training.step import backward, optimizer_step

    model = _tiny_lm()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, betas=(0.9, 0.95), weight_decay=0.01)
    out = []
    for w in _batches(steps):
        loss, gn = optimizer_step(opt, params, lambda: backward(_loss(model, w)), max_norm)
        out.append((loss.item(), gn.item()))
    return out, model


@pytest.mark.parametrize("max_norm", [0.2, 0.47, 100.0])
def test_plain_step_matches_the_old_research_loop_bit_for_bit(max_norm):
    old, m_old = _old_plain_loop(max_norm)
    new, m_new = _new_plain_loop(max_norm)
    assert new == old
    for a, b in zip(m_old.parameters(), m_new.parameters()):
        assert torch.equal(a, b)
    if max_norm == 0.47:  # both sides of the clip threshold were exercised
        assert any(gn > max_norm for _, gn in old) and any(gn <= max_norm for _, gn in old), old


def test_clip_rule_on_a_host_norm():
    """A float norm (the Trainer's): scaled by max_norm / (norm + 1e-6) above max_norm, untouched below or at 0."""
    from mora_dist.training.step import clip_

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    clip_([p], 4.0, 5.0)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    clip_([p], 4.0, 0.0)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    clip_([p], 4.0, 1.0)
    assert torch.equal(p.grad, torch.full((3,), 2.0) * (1.0 / (4.0 + 1e-6)))


# --- the Trainer and the research helpers on a megatron model, one gloo rank ---------------------------
def _old_trainer_step(t):
    """Trainer.train_step's body before step.py (no restarts configured here)."""
    cfg, step = t.cfg, t.step
    lr = t.lr_at(step)
    for g in t.opt.param_groups:
        g["lr"] = lr
    t.ddp.zero_grad_buffer()
    t.opt.zero_grad(set_to_none=True)
    losses = t._run_schedule(t.batches, step, forward_only=False)
    t.ddp.finish_grad_sync()
    for p in t.params:
        p.grad = p.main_grad
    gnorm = t.grad_norm()
    if cfg.train.clip_grad and gnorm > cfg.train.clip_grad:
        torch._foreach_mul_([p.grad for p in t.params], cfg.train.clip_grad / (gnorm + 1e-6))
    t.opt.step()
    t.step += 1
    return t._mean_loss(losses), gnorm


def _research_loop(new: bool, method: str):
    import common  # launch/research/common.py

    from mora_dist.training.step import backward, optimizer_step

    model = common.tiny_model(vocab=40, hidden=32, layers=2, heads=2, ffn=64, max_pos=16, seed=3)
    common.attach(model, method, 4)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = common.adamw(params, 0.02, (0.9, 0.95), 0.0)
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(4):
        w = torch.randint(0, 40, (2, 9), generator=g)
        t, l = w[:, :-1], w[:, 1:]
        pos = torch.arange(8).expand_as(t)
        if new:
            loss, gn = optimizer_step(opt, params, lambda: backward(model(t, pos, None, labels=l).mean()), 1.0)
        else:
            loss = model(t, pos, None, labels=l).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        out.append((loss.item(), gn.item()))
    return out


def _trainer_and_research(rank, tmp):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "research"))
    from mora_dist.training.loop import Trainer

    out = {}
    for method in ("mora", "lora"):
        over = {"adapter.method": method, "adapter.r": 4, "train.clip_grad": 0.3}
        old_t, new_t = Trainer(tiny_config(tmp, **over)), Trainer(tiny_config(tmp, **over))
        old = [_old_trainer_step(old_t) for _ in range(old_t.cfg.train.steps)]
        new = [(r["loss"], r["grad_norm"]) for r in (new_t.train_step() for _ in range(new_t.cfg.train.steps))]
        same_weights = all(torch.equal(a, b) for a, b in zip(old_t.params, new_t.params))
        out[f"trainer_{method}"] = dict(old=old, new=new, same_weights=same_weights)
        out[f"research_{method}"] = dict(old=_research_loop(False, method), new=_research_loop(True, method),
                                         same_weights=True)
    return out


@pytest.mark.integration
def test_trainer_and_research_steps_match_the_old_hand_written_steps(tmp_path):
    out = run_ranks(_trainer_and_research, 1, tmp_path)[0]
    for name, r in out.items():
        assert r["new"] == r["old"], (name, r)
        assert r["same_weights"], name
        assert all(math.isfinite(x) for pair in r["new"] for x in pair)
    clip = 0.3  # the Trainer runs clipped some steps and not others: both branches of the rule
    for m in ("mora", "lora"):
        norms = [gn for _, gn in out[f"trainer_{m}"]["old"]]
        assert any(n > clip for n in norms), (m, norms)
