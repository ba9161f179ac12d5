"""ReLoRA/ReMoRA restarts: output unchanged at the merge, type cycling, state pruning, jagged LR,
and the precision of repeated merges into a bf16 base (compensated vs naive, numbers printed)."""
import math

import pytest
import torch

from dist import run_ranks
from train_utils import tiny_config


def _restart_invariance(rank, tmp, overrides):
    from mora_dist.adapters.mora import MoRA
    from mora_dist.parallel.inject import adapted_layers
    from mora_dist.training import restarts
    from mora_dist.training.loop import Trainer

    cfg = tiny_config(tmp, **overrides)
    t = Trainer(cfg)
    for _ in range(3):
        t.train_step()
    b = next(t.batches.microbatches(0))
    with torch.no_grad():
        before = t.ddp(b["tokens"], b["position_ids"], None)
        types_before = [a.type for layer in adapted_layers(t.model) for a in layer.adapters.values()
                        if isinstance(a, MoRA)]
        restarts.restart(t, t.step)
        after = t.ddp(b["tokens"], b["position_ids"], None)
        types_after = [a.type for layer in adapted_layers(t.model) for a in layer.adapters.values()
                       if isinstance(a, MoRA)]
        zero = max(a.delta_weight().abs().max().item() for layer in adapted_layers(t.model)
                   for a in layer.adapters.values())
        # fraction of Adam first moments kept, per full tensor: shards counted over TP, replicas once
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        kept = []
        for layer in adapted_layers(t.model):
            for a in layer.adapters.values():
                for n, p in a.named_parameters():
                    m = t.opt.state[p]["exp_avg"]
                    c = torch.tensor([(m != 0).sum().item(), m.numel()], dtype=torch.float64)
                    if a.is_sharded(n):
                        dist.all_reduce(c, group=ps.get_tensor_model_parallel_group())
                    kept.append((c[0] / c[1]).item())
    losses = [t.train_step()["loss"] for _ in range(2)]
    return dict(diff=(after - before).abs().max().item(), scale=before.abs().max().item(), types=(types_before, types_after),
                zero=zero, kept=max(kept), losses=losses)


@pytest.mark.integration
@pytest.mark.parametrize("method,tp", [("mora", 1), ("mora", 2), ("lora", 2)])
def test_restart_keeps_output_and_cycles_mora_types(tmp_path, method, tp):
    over = {"adapter.method": method, "adapter.r": 4, "parallel.tp": tp, "restarts.prune": 0.9}
    out = run_ranks(_restart_invariance, tp, tmp_path, over, tp=tp)
    for r in out:
        assert r["diff"] <= 1e-5 * max(1.0, r["scale"]), r["diff"]
        assert r["zero"] == 0.0  # fresh adapters: dW = 0
        assert r["kept"] <= 0.11  # 90% of each Adam moment pruned (ties at zero excluded)
        assert all(math.isfinite(x) for x in r["losses"])
        if method == "mora":
            before, after = r["types"]
            assert set(before) == {1} and set(after) == {2}


def test_jagged_schedule_rewarms_after_each_restart():
    from mora_dist.training.schedule import cosine_lr, jagged_cosine_lr

    lr, warm, total, every, rw = 1.0, 10, 100, 30, 5
    sched = [jagged_cosine_lr(s, lr, warm, total, 0.1, every, rw) for s in range(total)]
    assert sched[:30] == [cosine_lr(s, lr, warm, total, 0.1) for s in range(30)]
    for k in (30, 60, 90):
        target = cosine_lr(k + rw, lr, warm, total, 0.1)
        assert sched[k] == pytest.approx(target / (rw + 1))  # ramps from ~0
        assert sched[k + rw - 1] == pytest.approx(target * rw / (rw + 1))
        assert sched[k + rw] == pytest.approx(target)  # back on the cosine
    assert min(sched[warm:]) >= 0.1 * lr / (rw + 1) - 1e-12
    assert sched[-1] == pytest.approx(cosine_lr(99, lr, warm, total, 0.1))


def test_repeated_bf16_merges_compensated():
    """20 restarts' worth of small updates merged into a bf16 weight: naive bf16 accumulation vs
    the compensated merge (bf16 weight + bf16 residual) vs the exact float64 sum."""
    from mora_dist.adapters import AdapterConfig, Shard, build_adapter
    from mora_dist.parallel.wrappers import AdaptedLinear

    class Base(torch.nn.Module):  # the wrapper only needs .weight for merging
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(w, requires_grad=False)

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(256, 512, generator=g) * 0.02
    layer = AdaptedLinear(Base(w0.to(torch.bfloat16)), "column")
    a = build_adapter(AdapterConfig("lora", r=8), Shard(512, 256))
    layer.add_adapter("adapter", a)
    exact = w0.to(torch.bfloat16).double()  # the bf16 base as loaded is the starting point
    naive = w0.to(torch.bfloat16)
    for k in range(20):
        with torch.no_grad():
            a.A.normal_(generator=g)
            a.B.normal_(generator=g).mul_(2e-5)  # a restart-sized update: ~1e-3 of |W|
        d = a.delta_weight().double()
        exact += d
        naive = (naive.float() + d.float()).to(torch.bfloat16)
        layer.fold()
    err_naive = (naive.double() - exact).abs().max().item()
    err_plain = (layer.base.weight.double() - exact).abs().max().item()
    err_comp = (layer.full_precision_weight().double() - exact).abs().max().item()
    one_rounding = (exact.to(torch.bfloat16).double() - exact).abs().max().item()
    print(f"\nmax |W - exact| after 20 merges: naive bf16 {err_naive:.2e}, compensated (W) {err_plain:.2e}, "
          f"compensated (W + residual) {err_comp:.2e}; one bf16 rounding {one_rounding:.2e}")
    assert err_plain <= one_rounding * 1.02  # the bf16 weight stays (within an ulp step) the rounded sum
    # the bf16 residual loses <= 2^-9 of itself per merge: ~1% of one rounding after 20 merges
    assert err_comp < one_rounding / 50
    assert err_naive > 2 * one_rounding  # the problem being solved is real


def _make_hf(path, layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _relora_adapters(rank, tmp, overrides):
    """Train a LoRA run through one restart; return its re-initialised A factors by global layer name."""
    from mora_dist.parallel import inject
    from mora_dist.training import restarts
    from mora_dist.training.loop import Trainer

    t = Trainer(tiny_config(tmp, **overrides))
    for _ in range(2):
        t.train_step()
    restarts.restart(t, t.step)
    prefixes = inject._global_names(t.model)
    out = {}
    for name, m in t.model.named_modules():
        if isinstance(m, inject.AdaptedLinear):
            for target, a in m.adapters.items():
                out[f"{inject._rename(name, prefixes)}:{target}"] = a.A.detach().clone()
    return out


@pytest.mark.integration
def test_relora_reinit_does_not_depend_on_pipeline_layout(tmp_path):
    """A LoRA restart re-initialises A from a seed of the *global* layer name (as injection does), so
    PP=2 re-initialises every layer exactly as PP=1 does."""
    hf = _make_hf(tmp_path / "hf")
    over = {"model.hf_dir": hf, "adapter.method": "lora", "adapter.r": 4, "adapter.targets": "[q, o, down]",
            "restarts.every": 3, "restarts.warmup": 1}
    ref = run_ranks(_relora_adapters, 1, tmp_path, over)[0]
    pp2 = run_ranks(_relora_adapters, 2, tmp_path, {**over, "parallel.pp": 2}, pp=2)
    got = {**pp2[0], **pp2[1]}
    assert sorted(got) == sorted(ref) and len(ref) == 12
    for name, a in ref.items():
        assert torch.equal(got[name], a), name


def test_remora_type_schedule_paper_default_and_released_option():
    """`restarts.mora_types`: the default is the paper's 1 -> 2 -> 1 alternation (Appendix B), [1, 2, 3, 4]
    the released code's cycle; a resumed adapter takes the type of n restarts; a type outside the
    schedule (rotation) stays; cycling off keeps the type."""
    from mora_dist.adapters import AdapterConfig, Shard, build_adapter
    from mora_dist.training.config import RestartConfig

    def types(cycle, n, mora_type="sharing"):
        a = build_adapter(AdapterConfig("mora", r=4, mora_type=mora_type), Shard(48, 32))
        out = []
        for k in range(n):
            a.on_restart(torch.Generator().manual_seed(k), cycle)
            out.append(a.type)
        return out

    paper = RestartConfig().mora_cycle
    assert paper == (1, 2)
    assert types(paper, 4) == [2, 1, 2, 1]
    released = RestartConfig(mora_types=["type1", 2, "type3", 4]).mora_cycle
    assert released == (1, 2, 3, 4) and types(released, 5) == [2, 3, 4, 1, 2]
    assert types(RestartConfig(cycle_mora_types=False).mora_cycle, 2) == [1, 1]
    assert types(paper, 2, "rotation") == [6, 6]
    fresh = build_adapter(AdapterConfig("mora", r=4), Shard(48, 32))
    fresh.after_restarts(3, paper)
    assert fresh.type == 2
    fresh = build_adapter(AdapterConfig("mora", r=4), Shard(48, 32))
    fresh.after_restarts(3, released)
    assert fresh.type == 4


def _adapted_model():
    from mora_dist.adapters import AdapterConfig, Shard, build_adapter
    from mora_dist.parallel.wrappers import AdaptedLinear

    class Base(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(w, requires_grad=False)

    layer = AdaptedLinear(Base(torch.randn(16, 24, generator=torch.Generator().manual_seed(0))), "column", "l0")
    layer.add_adapter("q", build_adapter(AdapterConfig("lora", r=2), Shard(24, 16)))
    return torch.nn.ModuleList([layer])


@pytest.mark.parametrize("delete", [False, True])
def test_restart_zeroes_or_deletes_adam_state(delete):
    """prune 1.0 zeroes the moments and keeps Adam's step count (bias correction stays small); delete
    drops the state with the count, so the first step after the restart is Adam's first step again:
    every entry moves by exactly lr (|m_hat / sqrt(v_hat)| = 1)."""
    from mora_dist.training.restarts import restart_model

    torch.manual_seed(0)
    model = _adapted_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.999), weight_decay=0.0)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    restart_model(model, opt, 1, 0, (), 1.0, delete_state=delete)
    if delete:
        assert all(p not in opt.state for p in params)
    else:
        assert all(float(opt.state[p]["step"]) == 3 for p in params)
        assert all(not opt.state[p]["exp_avg"].any() and not opt.state[p]["exp_avg_sq"].any() for p in params)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(params, before)])
    if delete:
        assert float(opt.state[params[0]]["step"]) == 1
        assert torch.allclose(moved, torch.full_like(moved, 0.01), rtol=1e-3)
    else:  # step 4 with zero moments: m_hat / sqrt(v_hat) = (0.1 / (1 - 0.9^4)) / sqrt(0.001 / (1 - 0.999^4))
        ratio = (0.1 / (1 - 0.9 ** 4)) / math.sqrt(0.001 / (1 - 0.999 ** 4))
        assert torch.allclose(moved, torch.full_like(moved, 0.01 * ratio), rtol=1e-3)
        assert ratio < 0.6


def test_restart_options_validated_naming_the_key(tmp_path):
    from mora_dist.training.config import ConfigError, validate

    for over, key in ((["restarts.mora_types=[1, 5]"], "restarts.mora_types"),
                      (["restarts.mora_types=[1, 1]"], "restarts.mora_types"),
                      (["restarts.mora_types=[]"], "restarts.mora_types"),
                      (["restarts.mora_types=[rotation, 1]"], "restarts.mora_types"),
                      (["restarts.reset_optimizer=drop"], "restarts.reset_optimizer")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            tiny_config(tmp_path, **dict(o.split("=", 1) for o in over))  # load_config validates
        assert "\n" not in str(e.value)
    cfg = tiny_config(tmp_path, **{"restarts.mora_types": "[type1, 2, 3, 4]", "restarts.reset_optimizer": "delete"})
    validate(cfg)
    assert cfg.restarts.mora_cycle == (1, 2, 3, 4)
