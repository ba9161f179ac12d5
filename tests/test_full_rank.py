"""Full-rank parts (train.full_rank: embedding, output layer, norms) trained next to the adapters,
by torch AdamW and by megatron's DistributedOptimizer (tests/distopt_cpu.py lets its real code run
on CPU ranks): TP/DP/PP layouts and both optimizers give the single-process losses and weights;
only the full-rank parts and adapters move; the full-rank group gets its own LR; checkpoints resume
bit for bit (also across optimizers); the merged export holds the trained parts; config errors."""
import math

import pytest
import torch

from dist import run_ranks
from train_utils import tiny_config

FR = {"adapter.method": "lora", "adapter.r": 4, "train.full_rank": "[embedding, output_layer, norms]",
      "train.clip_grad": 0.3}
RESTART = {"train.steps": 6, "restarts.every": 3, "restarts.warmup": 1, "restarts.prune": 0.9}


def _trainer(tmp, over, optimizer="adamw"):
    """A Trainer; optimizer=distributed runs megatron's DistributedOptimizer on CPU ranks (the config
    refuses it without a GPU, so it is set after validation)."""
    import distopt_cpu

    distopt_cpu.apply()
    from mora_dist.training.loop import Trainer

    cfg = tiny_config(tmp, **over)
    cfg.train.optimizer = optimizer
    return Trainer(cfg)


def _full_weights(t) -> dict:
    """Every full-rank parameter in canonical form (vocab shards gathered over TP) by checkpoint key."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = {}
    for f in t.full_rank:
        w = f.param.detach().float()
        if f.sharded and ps.get_tensor_model_parallel_world_size() > 1:
            parts = [torch.empty_like(w) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, w.contiguous(), group=ps.get_tensor_model_parallel_group())
            w = torch.cat(parts)
        if not f.replica:
            out[f.key] = w.clone()
    return out


def _train_layout(rank, tmp, over, optimizer):
    t = _trainer(tmp, over, optimizer)
    rows = [t.train_step() for _ in range(t.cfg.train.steps)]
    return dict(losses=[r["loss"] for r in rows], norms=[r["grad_norm"] for r in rows], weights=_full_weights(t))


@pytest.mark.integration
def test_layouts_and_optimizers_match_single_process(tmp_path):
    """From one HF checkpoint, across a restart (adapter moments pruned at 0.9: the DistributedOptimizer
    gathers them over DP for the quantile), clipped steps: TP=2 with SP (vocab-parallel embedding /
    head, norm gradients all-reduced over TP), DP=2 and PP=2 with the DistributedOptimizer give the
    single-process torch-AdamW losses, grad norms and trained full-rank weights."""
    from test_merge_export import _make_hf

    over = {**FR, **RESTART, "model.hf_dir": _make_hf(tmp_path / "hf")}
    ref = run_ranks(_train_layout, 1, tmp_path, over, "adamw")[0]
    assert ref["losses"][-1] < ref["losses"][0] - 0.05, ref["losses"]
    assert any(n > 0.3 for n in ref["norms"]), ref["norms"]  # clipping was exercised
    tp2 = run_ranks(_train_layout, 2, tmp_path, {**over, "parallel.tp": 2, "parallel.sp": True}, "adamw", tp=2)
    dp2 = run_ranks(_train_layout, 2, tmp_path, over, "distributed")
    pp2 = run_ranks(_train_layout, 2, tmp_path, {**over, "parallel.pp": 2}, "distributed", pp=2)
    runs = {"tp2_sp_adamw": tp2[0], "dp2_distributed": dp2[0],
            "pp2_distributed": dict(pp2[1], weights={**pp2[0]["weights"], **pp2[1]["weights"]})}
    assert len(ref["weights"]) == 2 + 2 * 4 + 1  # embedding, head, 2 norms x 4 layers, final norm
    for name, got in runs.items():
        for a, b in zip(got["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), (name, got["losses"], ref["losses"])
        for a, b in zip(got["norms"], ref["norms"]):  # after the restart: moments at the pruning threshold
            assert abs(a - b) <= 1e-3 * abs(b), (name, got["norms"], ref["norms"])  # may fall either side
        assert sorted(got["weights"]) == sorted(ref["weights"]), name
        for k, w in ref["weights"].items():
            assert (got["weights"][k] - w).abs().max() <= 1e-5, (name, k)
    assert dp2[0]["weights"].keys() == dp2[1]["weights"].keys()
    for k, w in dp2[0]["weights"].items():  # the DP ranks' all-gathered parameters agree exactly
        assert torch.equal(w, dp2[1]["weights"][k]), k


def _what_moves(rank, tmp, optimizer):
    """One Trainer step from a fresh state: every parameter's change, the full-rank group at its LR."""
    over = {**FR, "train.lr": 0.004, "train.full_rank_lr": 0.01, "train.warmup": 2}
    t = _trainer(tmp, over, optimizer)
    named = dict(t.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    row = t.train_step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in named.items()}
    full = {f.key for f in t.full_rank}
    frozen_lr = _trainer(tmp, {**over, "train.full_rank_lr": 0}, optimizer)
    f_before = {f.key: f.param.detach().clone() for f in frozen_lr.full_rank}
    a_before = [p.detach().clone() for p in frozen_lr.params]
    for _ in range(2):
        frozen_lr.train_step()
    return dict(row=row, moved=moved, full=full, kinds={n: p.requires_grad for n, p in named.items()},
                fixed=all(torch.equal(f.param, f_before[f.key]) for f in frozen_lr.full_rank),
                adapters_moved=sum(not torch.equal(p, b) for p, b in zip(frozen_lr.params, a_before)))


@pytest.mark.integration
@pytest.mark.parametrize("optimizer,world", [("adamw", 1), ("distributed", 2)])
def test_full_rank_parts_train_at_their_lr_and_the_base_linears_stay(tmp_path, optimizer, world):
    """Adam's first step moves every parameter whose gradient is not zero by its group's LR (|m/sqrt v|
    = |g| / (|g| + eps), 1 up to eps whatever the gradient's scale): the full-rank parts by
    full_rank_lr's first warm-up value (0.01 / 2), the adapters' A by lr's (0.004 / 2); LoRA's B and the
    embedding rows of tokens not in the batch have zero gradient and stay; the linear base weights
    stay bit for bit. full_rank_lr = 0 keeps the full-rank parts fixed while the adapters move."""
    out = run_ranks(_what_moves, world, tmp_path, optimizer)[0]
    assert out["row"]["lr"] == 0.002 and out["row"]["lr_full_rank"] == 0.005
    moved, kinds = out["moved"], out["kinds"]
    names = {"embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"}
    assert names <= {n for n in moved if kinds[n] and "adapters" not in n}
    for n, d in moved.items():
        if ".base." in n:
            assert not kinds[n] and not d.any(), n  # frozen linear weights, unchanged
            continue
        if n.endswith(".A"):  # LoRA: B = 0 at init, so A's first gradient is zero
            assert not d.any(), n
            continue
        lr = 0.002 if "adapters" in n else 0.005
        assert kinds[n], n  # an adapter or a full-rank part: every other parameter is frozen
        nz = d[d != 0]  # lr * |g| / (|g| + 1e-8): never more than lr, lr where |g| >> 1e-8
        assert nz.numel() > 0 and (nz <= lr * (1 + 1e-5)).all(), n
        assert ((nz - lr).abs() <= 1e-2 * lr).float().mean() > 0.9, (n, nz)
        if n == "embedding.word_embeddings.weight":
            rows = d.sum(-1) != 0
            assert 0 < rows.sum() < rows.numel()  # rows of tokens not seen stay
    assert out["fixed"] and out["adapters_moved"] > 0
