"""Adapters injected into a real megatron-core GPTModel by target name: TP=2 equals TP=1,
merging is exact at model level, parameter counts, and config errors that name the culprit."""
import contextlib

import pytest
import torch

from dist import run_ranks

H, FFN, NH, NG, V, S, B, L = 32, 48, 4, 2, 64, 8, 2, 2
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def tiny_gpt():
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.compat import mcore_cpu

    cfg = TransformerConfig(
        num_layers=L, hidden_size=H, ffn_hidden_size=FFN, num_attention_heads=NH, num_query_groups=NG,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        add_bias_linear=False, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, **mcore_cpu.config_overrides())
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=V, max_sequence_length=S, position_embedding_type="rope")


def full_params(name, adapter):
    """Deterministic full (TP=1) values for an adapter's trainables, keyed by layer and target."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    out = {}
    for n, p in adapter.named_parameters():
        shape = list(p.shape)
        kind = adapter.layout[n]
        if adapter.is_sharded(n):
            shape[adapter.layout_dim(n)] = adapter.shard.d_out if kind == "out" else adapter.shard.d_in
        out[n] = torch.randn(shape, generator=g) * 0.2
    return out


def _adapted_gpt(cfg):
    """(tiny_gpt with adapters `cfg` holding full_params, apply_adapters' report, (tokens, positions, causal mask))."""
    from mora_dist.parallel.inject import apply_adapters

    model = tiny_gpt()
    report = apply_adapters(model, cfg)
    for lname, layer in model.named_modules():
        if hasattr(layer, "adapters") and hasattr(layer, "merged"):
            for t, a in layer.adapters.items():
                a.load_full_(full_params(f"{lname}:{t}", a))
    x = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)
    mask = torch.ones(1, 1, S, S, dtype=torch.bool).tril().logical_not()
    return model, report, (x, pos, mask)


def _run(rank, method, kw):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mora_dist.adapters import AdapterConfig
    from mora_dist.parallel.inject import adapted_layers, merge_adapters

    model, report, (x, pos, mask) = _adapted_gpt(AdapterConfig(method=method, r=2, targets=TARGETS, **kw))
    loss = model(x, pos, mask, labels=x).float().mean()
    loss.backward()
    # full adapter grads, gathered over TP: sum of squares is layout independent
    sq = torch.zeros(())
    for layer in adapted_layers(model):
        for a in layer.adapters.values():
            for n, p in a.named_parameters():
                v = p.grad.pow(2).sum()
                if a.is_sharded(n):
                    dist.all_reduce(v, group=ps.get_tensor_model_parallel_group())
                sq += v
    frozen_grads = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        logits = model(x, pos, mask)
        merge_adapters(model)
        merged = model(x, pos, mask)
    return dict(loss=loss.item(), grad_sq=sq.item(), frozen_grads=frozen_grads, trainable=report.trainable,
                merge_diff=(merged - logits).abs().max().item(), per_target=report.per_target)


CASES = [("lora", {}), ("mora", {"mora_type": "sharing"}), ("mora", {"mora_type": "rotation"}), ("vera", {"r": 16})]


def _cases(rank):
    return {f"{m}{kw}": _run(rank, m, {k: v for k, v in kw.items() if k != "r"} if "r" in kw else kw) for m, kw in CASES}


@pytest.mark.integration
def test_gpt_tp2_equals_tp1_and_merge_is_exact():
    tp1 = run_ranks(_cases, 1, tp=1)[0]
    tp2 = run_ranks(_cases, 2, tp=2)
    kv = NG * (H // NH)
    for key, r1 in tp1.items():
        for r2 in tp2:
            assert abs(r2[key]["loss"] - r1["loss"]) < 1e-5 * max(1, abs(r1["loss"])), key
            assert abs(r2[key]["grad_sq"] - r1["grad_sq"]) < 1e-4 * r1["grad_sq"], key
            assert r2[key]["merge_diff"] < 1e-5, key
        assert r1["grad_sq"] > 0 and r1["frozen_grads"] == 0 and r1["merge_diff"] < 1e-5, key
    # parameter counts at TP=1: LoRA r=2 on the canonical projections of 2 layers
    lora = tp1["lora{}"]["per_target"]
    assert lora == {"q": L * 2 * (H + H), "k": L * 2 * (H + kv), "v": L * 2 * (H + kv), "o": L * 2 * (H + H),
                    "gate": L * 2 * (H + FFN), "up": L * 2 * (H + FFN), "down": L * 2 * (FFN + H)}
    from mora_dist.adapters import mora_rank

    mora = tp1["mora{'mora_type': 'sharing'}"]["per_target"]
    assert mora["k"] == L * mora_rank(H, kv, 2) ** 2 and mora["down"] == L * mora_rank(FFN, H, 2) ** 2
    vera = tp1["vera{'r': 16}"]["per_target"]  # d_out + r per layer
    assert vera == {"q": L * (H + 2), "k": L * (kv + 2), "v": L * (kv + 2), "o": L * (H + 2),
                    "gate": L * (FFN + 2), "up": L * (FFN + 2), "down": L * (H + 2)}


def _replayed_builds(rank):
    """fixed_adapters with a build graph: the first call runs the builds (as a capture does), later calls
    run no Python (as a replay): inside each scope every layer's forward must read its step buffer and
    build nothing, with the logits of the eager scope."""
    from mora_dist.adapters import AdapterConfig
    from mora_dist.parallel import merged
    from mora_dist.parallel.inject import adapted_layers, fixed_adapters

    model, _, (x, pos, mask) = _adapted_gpt(AdapterConfig(method="lora", r=2, targets=TARGETS))
    layers = adapted_layers(model)
    with torch.no_grad():
        with fixed_adapters(model):
            ref = model(x, pos, mask)
        graph_calls, builds, build = [], [], merged.build_weight

        def graph(fn):
            if not graph_calls:
                fn()
            graph_calls.append(1)

        out = []
        merged.build_weight = lambda *a, **k: (builds.append(1), build(*a, **k))[1]
        try:
            for _ in range(2):
                n0 = len(builds)
                with fixed_adapters(model, graph):
                    reads = [m._fixed is not None and m._fixed is m._step_weight for m in layers]
                    out.append(((model(x, pos, mask) - ref).abs().max().item(), len(builds) - n0, all(reads)))
        finally:
            merged.build_weight = build
        # the bench's replay check: 0 while the buffers hold the adapters' weights; after the adapters
        # move, a "replay" that builds nothing leaves them stale and the check must see it
        with fixed_adapters(model, graph):
            fresh = max(m.fixed_weight_error() for m in layers)
        for p in next(iter(layers[0].adapters.values())).parameters():
            p.add_(0.5)
        with fixed_adapters(model, graph):
            stale = max(m.fixed_weight_error() for m in layers)
    return dict(scopes=out, layers=len(layers), after=[m._fixed is None for m in layers], fresh=fresh, stale=stale)


@pytest.mark.integration
def test_fixed_adapters_with_a_build_graph():
    r = run_ranks(_replayed_builds, 1)[0]
    n = r["layers"]
    assert n == 4 * L and all(r["after"])  # qkv, o, fc1, fc2 a layer
    assert r["scopes"][0] == (0.0, n, True)  # the capture: one build per layer, none by the forwards
    assert r["scopes"][1] == (0.0, 0, True)  # a replay: the forwards read the buffers, nothing built
    assert r["fresh"] == 0.0 and r["stale"] > 0.1, (r["fresh"], r["stale"])


def _bad_target(rank):
    from mora_dist.adapters import AdapterConfig
    from mora_dist.parallel.inject import apply_adapters

    model = tiny_gpt()
    msgs = []
    for targets in (["q", "*.no_such_layer"], ["*.input_layernorm"]):
        try:
            apply_adapters(model, AdapterConfig(targets=targets))
        except ValueError as e:
            msgs.append(str(e))
    return msgs


@pytest.mark.integration
def test_bad_targets_name_the_pattern():
    msgs = run_ranks(_bad_target, 1)[0]
    assert "'*.no_such_layer' matches no linear layer" in msgs[0]
    assert "'*.input_layernorm' matched decoder.layers.0.input_layernorm" in msgs[1]


def test_tp_not_dividing_groups_names_the_value():
    from mora_dist.models.layout import fc1_row_index, qkv_row_index

    with pytest.raises(ValueError, match=r"num_query_groups \(2\) is not divisible by tensor-parallel size 4"):
        qkv_row_index(8, 2, 16, tp_size=4, tp_rank=0)
    with pytest.raises(ValueError, match=r"ffn_hidden_size \(50\) is not divisible by tensor-parallel size 4"):
        fc1_row_index(50, tp_size=4, tp_rank=0)


def _step_factors(rank):
    """Per method: two micro-batches' gradients inside fixed_adapters (the factors cast once a step by
    begin_fixed, reused by both forwards and backwards) against two micro-batches outside it (cast per
    forward), on a bf16 base with fp32 adapters; and how often the adapters' `factors` ran. Then with the
    factor gradients accumulated (`accumulate`): nothing reaches the trainables before the flush, the flushed
    gradients against the plain ones, and against a float64 copy of the model's adapters."""
    from mora_dist.adapters import AdapterConfig
    from mora_dist.parallel.inject import adapted_layers, apply_adapters, fixed_adapters

    out = {}
    for method, kw in [("lora", {}), ("lora", {"allora_eta": 2.0}), ("vera", {"r": 16}),
                       ("mora", {"mora_type": "sharing"}), ("mora", {"mora_type": "rotation"})]:
        model = tiny_gpt().to(torch.bfloat16)
        apply_adapters(model, AdapterConfig(method=method, r=4 if method != "vera" else kw["r"], targets=TARGETS,
                                            **{k: v for k, v in kw.items() if k != "r"}))
        layers = adapted_layers(model)
        adapters = [a for m in layers for a in m.adapters.values()]
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for a in adapters:
                for p in a.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        params = [p for a in adapters for p in a.parameters()]
        batches = [torch.randint(0, V, (B, S), generator=gen) for _ in range(2)]
        pos = torch.arange(S).unsqueeze(0).expand(B, -1)
        mask = torch.ones(1, 1, S, S, dtype=torch.bool).tril().logical_not()
        calls = [0]
        for a in adapters:
            f = a.factors
            a.factors = lambda dtype, f=f, **kw: (calls.__setitem__(0, calls[0] + 1), f(dtype, **kw))[1]

        def grads(fixed, accumulate=False):
            for p in params:
                p.grad = None
            n0 = calls[0]
            with fixed_adapters(model, accumulate=accumulate) if fixed else contextlib.nullcontext(lambda: None) as flush:
                n_build = calls[0] - n0
                for x in batches:
                    model(x, pos, mask).float().mean().backward()
                before = sum(p.grad is not None for p in params)
                flush()
            return [p.grad.clone() for p in params], n_build, calls[0] - n0 - n_build, before

        g_plain, _, c_plain, _ = grads(False)
        g_fixed, c_build, c_fwd, _ = grads(True)
        g_acc, _, c_acc, before = grads(True, accumulate=True)
        acc_ptrs = [a.data_ptr() for m in layers for _, a in m.factor_grad_links()]

        def addresses():  # of every tensor the forwards read from the step's plan (ALLoRA's c too)
            out = []
            for m in layers:
                plan, ts, _ = m._step_planned
                cs = [t.c for t in plan.terms] + [b.c for b in plan.blocks]
                out += [t.data_ptr() for t in ts + cs if t is not None]
            return out

        first = addresses()
        with torch.no_grad():
            for p in params:
                p.add_(0.01)
        g_moved, _, _, _ = grads(True)  # a later step: new values in the same buffers (a captured graph reads them)
        g_acc2, _, _, _ = grads(True, accumulate=True)
        try:  # a backward inside an accumulating scope that never flushes: an error, not lost gradients
            with fixed_adapters(model, accumulate=True):
                model(batches[0], pos, mask).float().mean().backward()
            unflushed = "no error"
        except RuntimeError as e:
            unflushed = str(e)
        rel = lambda a, b: max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()  # noqa: E731
                               for x, y in zip(a, b))
        out[f"{method}{kw}"] = dict(diff=max((a - b).abs().max().item() for a, b in zip(g_plain, g_fixed)),
                                    scale=max(a.abs().max().item() for a in g_plain),
                                    calls_plain=c_plain, calls_build=c_build, calls_fixed=c_fwd, adapters=len(adapters),
                                    same_addresses=first == addresses() and len(first) > 0,
                                    moved=max((a - b).abs().max().item() for a, b in zip(g_moved, g_fixed)),
                                    factor_adapters=sum(a.factors(torch.bfloat16) is not None for a in adapters),
                                    acc_rel=rel(g_acc, g_plain), acc_moved_rel=rel(g_acc2, g_moved), acc_before=before,
                                    acc_calls=c_acc, acc_links=len(acc_ptrs), n_params=len(params), unflushed=unflushed,
                                    acc_same=acc_ptrs == [a.data_ptr() for m in layers for _, a in m.factor_grad_links()])
    return out


@pytest.mark.integration
def test_step_factors_are_cast_once_and_give_the_same_gradients():
    res = run_ranks(_step_factors, 1)[0]
    for name, r in res.items():
        assert r["scale"] > 0 and r["diff"] == 0.0, (name, r)  # the same casts, the same bits
        assert r["same_addresses"] and r["moved"] > 0, (name, r)
        n = r["adapters"]  # each forward asks every adapter for its factors (block types answer None)
        assert n == 7 * L and r["calls_plain"] == 2 * n and r["calls_build"] == n and r["calls_fixed"] == 0, (name, r)
        # accumulated: the factors' trainables get nothing from the backwards, all of it from the flush, equal to
        # the per-micro-batch sums up to fp32 rounding (the order of the sums), at the step after too
        factor = 0 if "rotation" in name else r["n_params"]  # rotation: block adapters, gradients returned
        assert r["acc_calls"] == 0 and r["acc_before"] == r["n_params"] - factor, (name, r)
        assert r["acc_links"] == (0 if factor == 0 else r["n_params"]) and r["acc_same"], (name, r)
        assert r["acc_rel"] < 1e-5 and r["acc_moved_rel"] < 1e-5, (name, r)
        assert ("never flushed" in r["unflushed"]) == (factor > 0), (name, r["unflushed"])
    assert res["lora{}"]["factor_adapters"] == 7 * L and res["mora{'mora_type': 'rotation'}"]["factor_adapters"] == 0
