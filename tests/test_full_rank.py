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
    head, norm gradients all-reduced over TP) under torch AdamW, and TP=2 (megatron's own grad norm
    over TP-sharded adapters), DP=2 and PP=2 with the DistributedOptimizer give the single-process
    torch-AdamW losses, grad norms and trained full-rank weights."""
    from test_merge_export import _make_hf

    over = {**FR, **RESTART, "model.hf_dir": _make_hf(tmp_path / "hf")}
    ref = run_ranks(_train_layout, 1, tmp_path, over, "adamw")[0]
    assert ref["losses"][-1] < ref["losses"][0] - 0.05, ref["losses"]
    assert any(n > 0.3 for n in ref["norms"]), ref["norms"]  # clipping was exercised
    tp2 = run_ranks(_train_layout, 2, tmp_path, {**over, "parallel.tp": 2, "parallel.sp": True}, "adamw", tp=2)
    tp2_dist = run_ranks(_train_layout, 2, tmp_path, {**over, "parallel.tp": 2}, "distributed", tp=2)
    dp2 = run_ranks(_train_layout, 2, tmp_path, over, "distributed")
    pp2 = run_ranks(_train_layout, 2, tmp_path, {**over, "parallel.pp": 2}, "distributed", pp=2)
    runs = {"tp2_sp_adamw": tp2[0], "tp2_distributed": tp2_dist[0], "dp2_distributed": dp2[0],
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


CKPT = {**FR, **RESTART, "train.steps": 6, "restarts.reset_optimizer": "delete"}


def _train_save(rank, tmp, ckpt, optimizer, save_at, extra=None):
    from mora_dist.checkpoint import state

    t = _trainer(tmp, {**CKPT, **(extra or {})}, optimizer)
    losses = []
    while t.step < t.cfg.train.steps:
        losses.append(t.train_step()["loss"])
        if t.step in save_at:
            state.save(t, ckpt, keep=0)
    return dict(losses=losses, weights=_full_weights(t), adapters=[p.detach().clone() for p in t.params])


def _resume(rank, tmp, path, optimizer, extra=None):
    from mora_dist.checkpoint import state

    t = _trainer(tmp, {**CKPT, **(extra or {})}, optimizer)
    state.load(t, path)
    start = t.step
    losses = [t.train_step()["loss"] for _ in range(t.cfg.train.steps - t.step)]
    return dict(start=start, losses=losses, weights=_full_weights(t), adapters=[p.detach().clone() for p in t.params])


@pytest.mark.integration
def test_pp2_checkpoint_resumes_every_stage(tmp_path):
    """PP=2: the common state (written by rank 0 alone) holds the Adam step counts of both stages'
    parameters (the last stage's adapters, output layer and final norm), so a PP=2 checkpoint
    resumes, bit for bit."""
    import os

    ckpt, pp2 = str(tmp_path / "ckpt"), {"parallel.pp": 2}
    full = run_ranks(_train_save, 2, tmp_path, ckpt, "adamw", (4,), pp2, pp=2)
    again = run_ranks(_resume, 2, tmp_path, os.path.join(ckpt, "step_0000004"), "adamw", pp2, pp=2)
    assert again[1]["start"] == 4 and again[1]["losses"] == full[1]["losses"][4:]
    for a, b in zip(again, full):
        assert all(torch.equal(x, y) for x, y in zip(a["adapters"], b["adapters"]))
        assert a["weights"].keys() == b["weights"].keys()
        assert all(torch.equal(w, b["weights"][k]) for k, w in a["weights"].items())


def _export(rank, tmp, path, out):
    from mora_dist.export.merge import config_from_checkpoint, merge_and_export

    return merge_and_export(config_from_checkpoint(path), path, out)


@pytest.mark.integration
def test_checkpoint_resume_bit_exact_across_optimizers_and_export(tmp_path):
    """Saved at step 4 (after a restart that deleted the adapters' Adam state at step 3): a resume
    with the same optimizer and layout redoes steps 5 and 6 bit for bit (torch AdamW on one rank, the
    DistributedOptimizer on DP=2); the DistributedOptimizer's checkpoint resumes under torch AdamW on
    one rank (same canonical file) to float tolerance. The merged HF export of the final checkpoint
    holds the trained embedding, output layer and norms."""
    import os

    from safetensors.torch import load_file

    fulls = {}
    for optimizer, world in (("adamw", 1), ("distributed", 2)):
        ckpt = str(tmp_path / f"ckpt_{optimizer}")
        full = fulls[optimizer] = run_ranks(_train_save, world, tmp_path, ckpt, optimizer, (4, 6))[0]
        again = run_ranks(_resume, world, tmp_path, os.path.join(ckpt, "step_0000004"), optimizer)[0]
        assert again["start"] == 4 and again["losses"] == full["losses"][4:], (optimizer, again, full["losses"])
        assert all(torch.equal(a, b) for a, b in zip(again["adapters"], full["adapters"])), optimizer
        assert all(torch.equal(w, full["weights"][k]) for k, w in again["weights"].items()), optimizer
    # the restart's deletion of the adapters' state (step counts too) is the same in both optimizers
    for a, b in zip(fulls["distributed"]["losses"], fulls["adamw"]["losses"]):
        assert abs(a - b) <= 1e-5 * b, (fulls["distributed"]["losses"], fulls["adamw"]["losses"])
    other = run_ranks(_resume, 1, tmp_path, os.path.join(ckpt, "step_0000004"), "adamw")[0]
    assert abs(other["losses"][0] - full["losses"][4]) <= 1e-6 * full["losses"][4]
    for k, w in full["weights"].items():
        assert (other["weights"][k] - w).abs().max() <= 1e-6, k

    out = str(tmp_path / "merged")
    run_ranks(_export, 1, tmp_path, os.path.join(ckpt, "step_0000006"), out)
    hf = {}
    for name in os.listdir(os.path.join(out, "hf")):
        if name.endswith(".safetensors"):
            hf.update(load_file(os.path.join(out, "hf", name)))
    w = full["weights"]
    pairs = {"model.embed_tokens.weight": "full_rank.embedding.word_embeddings.weight",
             "lm_head.weight": "full_rank.output_layer.weight",
             "model.norm.weight": "full_rank.decoder.final_layernorm.weight",
             "model.layers.1.input_layernorm.weight": "full_rank.decoder.layers.1.input_layernorm.weight",
             "model.layers.0.post_attention_layernorm.weight": "full_rank.decoder.layers.0.pre_mlp_layernorm.weight"}
    for hf_name, key in pairs.items():
        assert torch.equal(hf[hf_name].float(), w[key]), hf_name
    assert (w["full_rank.decoder.final_layernorm.weight"] - 1).abs().max() > 1e-3  # trained away from the init of ones


def test_config_keys_validated_naming_the_key(tmp_path):
    """train.full_rank / full_rank_lr / optimizer: one-line errors naming the key and what to do."""
    from mora_dist.training.config import ConfigError, resolve_optimizer

    cases = [({"train.full_rank": "[embeddings]"}, "train.full_rank: unknown part 'embeddings'"),
             ({"train.full_rank": "[norms, norms]"}, "train.full_rank lists a part twice"),
             ({"train.full_rank": "norms"}, "train.full_rank: expected a list"),
             ({"train.full_rank_lr": -1}, "train.full_rank_lr must be >= 0"),
             ({"train.optimizer": "sgd"}, "train.optimizer must be one of auto, adamw, distributed"),
             ({"train.optimizer": "distributed"}, "train.optimizer: distributed needs a GPU"),
             ({"train.full_rank": "[norms]", "model.dtype": "bf16"},
              "train.full_rank with model.dtype=bf16 needs fp32"),
             ({"train.full_rank": "[embedding]", "model.vocab_size": 255, "parallel.tp": 2, "train.global_batch": 8},
              "train.full_rank: embedding at parallel.tp=2 needs model.vocab_size=255 divisible"),
             ({"train.full_rank": "[output_layer]", "model.tie_embeddings": True}, "model.tie_embeddings: true makes")]
    for over, needle in cases:
        with pytest.raises(ConfigError) as e:
            tiny_config(tmp_path, **over) if "parallel.tp" not in over else _with_world(tmp_path, over, 2)
        assert needle in str(e.value) and "\n" not in str(e.value), (over, str(e.value))
    cfg = tiny_config(tmp_path, **{"train.full_rank": "[embedding, output_layer, norms]", "train.full_rank_lr": 0})
    assert cfg.train.full_rank_lr == 0.0 and cfg.train.optimizer == "auto"
    assert resolve_optimizer(cfg.train, cuda=False) == "adamw"
    assert resolve_optimizer(cfg.train, cuda=True) == "distributed"
    cfg.train.full_rank = []
    assert resolve_optimizer(cfg.train, cuda=True) == "adamw"  # adapters alone: torch AdamW on a GPU too
    cfg.train.optimizer = "distributed"
    assert resolve_optimizer(cfg.train, cuda=True) == "distributed"


def _with_world(tmp, over, world):
    import os

    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        return tiny_config(tmp, **over)
    finally:
        os.environ.pop("WORLD_SIZE") if old is None else os.environ.update(WORLD_SIZE=old)


def test_resume_compares_full_rank_parts_as_a_set(tmp_path):
    from mora_dist.training.resume_check import config_differences

    cfg = tiny_config(tmp_path, **{"train.full_rank": "[norms, embedding]"})
    saved = cfg.to_dict()
    saved["train"]["full_rank"] = ["embedding", "norms"]
    assert config_differences(saved, cfg) == []
    saved["train"]["full_rank"] = ["embedding"]
    assert config_differences(saved, cfg) == ["train.full_rank: ['embedding'] -> ['norms', 'embedding']"]
    del saved["train"]["full_rank"]  # a checkpoint from before the key: adapters only
    assert config_differences(saved, cfg) == ["train.full_rank: [] -> ['norms', 'embedding']"]


def _bf16_run(rank, tmp, ckpt, resume):
    """The DistributedOptimizer on a bf16 base (the config allows it on a GPU only, so the dtype is
    set after validation): 4 steps, saved at 2, or resumed from there."""
    import os

    from mora_dist.checkpoint import state

    import distopt_cpu

    distopt_cpu.apply()
    from mora_dist.training.loop import Trainer

    cfg = tiny_config(tmp, **{**FR, "train.steps": 4})
    cfg.model.dtype, cfg.train.optimizer = "bf16", "distributed"
    t = Trainer(cfg)
    if resume:
        state.load(t, os.path.join(ckpt, "step_0000002"))
    losses = []
    while t.step < cfg.train.steps:
        losses.append(t.train_step()["loss"])
        if t.step == 2 and not resume:
            state.save(t, ckpt)
    # the fp32 master shards of the bf16 (full-rank) parameters this DP rank steps
    masters = [p.detach().clone() for o in t.opt.opt.chained_optimizers for g in o.shard_fp32_from_float16_groups
               for p in g]
    return dict(losses=losses, dtypes={f.param.dtype for f in t.full_rank}, masters=masters)


@pytest.mark.integration
def test_bf16_base_keeps_sharded_fp32_masters_and_resumes_bit_exact(tmp_path):
    """On a bf16 base the full-rank parts are bf16 and the DistributedOptimizer steps fp32 master
    shards (values a bf16 weight cannot hold); the checkpoint stores them (`.main`), so a DP=2 resume
    repeats steps 3 and 4 and the masters bit for bit."""
    import os

    from megatron.core import dist_checkpointing

    ckpt = str(tmp_path / "ckpt")
    full = run_ranks(_bf16_run, 2, tmp_path, ckpt, False)
    again = run_ranks(_bf16_run, 2, tmp_path, ckpt, True)
    assert full[0]["dtypes"] == {torch.bfloat16}
    assert all(math.isfinite(x) for x in full[0]["losses"]) and full[0]["losses"][-1] < full[0]["losses"][0]
    for a, b in zip(again, full):
        assert a["losses"] == b["losses"][2:]
        assert len(a["masters"]) == len(b["masters"]) > 0
        assert all(torch.equal(x, y) for x, y in zip(a["masters"], b["masters"]))
    assert any((m.to(torch.bfloat16).float() != m).any() for m in full[0]["masters"])  # fp32, not bf16 values
    keys = dist_checkpointing.load_tensors_metadata(os.path.join(ckpt, "step_0000002"))
    assert "full_rank.embedding.word_embeddings.weight.main" in keys and "full_rank.output_layer.weight.main" in keys
