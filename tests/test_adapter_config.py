"""A config class per adapter method (LoRAConfig, MoRAConfig, VeRAConfig), registered with the method;
ALLoRA as a gradient rule configured beside the method (`adapter.allora: {eta: ...}`), the old
`adapter.allora_eta` still read (deprecated)."""
import math

import pytest
import torch

from dist import run_ranks
from mora_dist.adapters import AdapterConfig, LoRAConfig, MoRAConfig, VeRAConfig
from mora_dist.adapters.base import REGISTRY
from mora_dist.optim.allora import ALLoRA
from mora_dist.training.config import ConfigError, config_from_dict, load_config


def _load(*overrides):
    return load_config(None, list(overrides))


def test_each_method_has_its_registered_config_class():
    for method, cls in [("lora", LoRAConfig), ("mora", MoRAConfig), ("vera", VeRAConfig)]:
        assert REGISTRY[method].config_class is cls
        cfg = AdapterConfig(method, r=4)
        assert type(cfg) is cls and cfg.method == method and cfg.r == 4
    assert type(AdapterConfig()) is LoRAConfig  # the default method
    assert AdapterConfig("lora", r=4, alpha=8.0).scale == 2.0
    assert AdapterConfig("lora", r=4, alpha=8.0, rslora=True).scale == 4.0
    assert AdapterConfig("mora").mora_type == "sharing" and AdapterConfig("vera").vera_d_init == 0.1
    assert not hasattr(AdapterConfig("mora"), "alpha") and not hasattr(AdapterConfig("lora"), "mora_type")


def test_yaml_schema_builds_the_method_class(tmp_path):
    from train_utils import tiny_config  # real data files: load_config validates data.train

    cfg = tiny_config(tmp_path, **{"adapter.method": "mora", "adapter.r": 4, "adapter.mora_type": "rotation",
                                   "adapter.targets": "[q, o]"})
    assert type(cfg.adapter) is MoRAConfig and cfg.adapter.mora_type == "rotation" and cfg.adapter.targets == ["q", "o"]
    assert cfg.to_dict()["adapter"] == dict(method="mora", r=4, seed=0, targets=["q", "o"], fast_path=True,
                                            allora=None, mora_type="rotation")
    cfg = tiny_config(tmp_path, **{"adapter.method": "vera", "adapter.r": 16, "adapter.allora.eta": 1.5})
    assert type(cfg.adapter) is VeRAConfig and cfg.adapter.allora == ALLoRA(1.5) and cfg.adapter.allora_eta == 1.5


BAD = [  # (overrides, the one-line error: the YAML key and the value)
    (["adapter.method=dora"], "adapter.method: unknown method 'dora'"),
    (["adapter.r=0"], "adapter.r: rank must be a positive integer, got 0"),
    (["adapter.method=mora", "adapter.r=-2"], "adapter.r: rank must be a positive integer, got -2"),
    (["adapter.alpha=0"], "adapter.alpha must be > 0, got 0.0"),
    (["adapter.alpha=.nan"], "adapter.alpha must be > 0, got nan"),
    (["adapter.method=mora", "adapter.mora_type=spiral"], "adapter.mora_type: unknown MoRA type 'spiral'"),
    (["adapter.method=vera", "adapter.vera_d_init=.inf"], "adapter.vera_d_init must be a finite number, got inf"),
    (["adapter.method=lora", "adapter.mora_type=rotation"], "adapter.mora_type: not a key of adapter.method 'lora'"),
    (["adapter.method=vera", "adapter.alpha=8"], "adapter.alpha: not a key of adapter.method 'vera'"),
    (["adapter.method=mora", "adapter.rslora=true"], "adapter.rslora: not a key of adapter.method 'mora'"),
    (["adapter.targets=[]"], "adapter.targets: empty target list"),
    (["adapter.allora.eta=0"], "adapter.allora.eta must be a number > 0, got 0.0"),
    (["adapter.method=mora", "adapter.allora.eta=-1"], "adapter.allora.eta must be a number > 0, got -1.0"),
    (["adapter.allora.etta=1"], "unknown key adapter.allora.etta"),
    (["adapter.allora=2"], "adapter.allora: expected a mapping"),
    (["adapter.allora_eta=2", "adapter.allora.eta=2"], "adapter.allora_eta: the old spelling of adapter.allora.eta"),
]


@pytest.mark.parametrize("overrides,match", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_adapter_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError) as e:
        _load(*overrides)
    msg = str(e.value)
    assert match in msg and "\n" not in msg, msg


@pytest.mark.parametrize("kw,match", [
    (dict(method="lora", alpha=-1.0), "adapter.alpha must be > 0, got -1.0"),
    (dict(method="mora", mora_type="spiral"), "adapter.mora_type: unknown MoRA type 'spiral'"),
    (dict(method="vera", alpha=8), "adapter.alpha: not a key of adapter.method 'vera'"),
    (dict(method="mora", allora={"eta": 0}), "adapter.allora.eta must be a number > 0, got 0"),
    (dict(method="lora", allora_eta=-2.0), "adapter.allora.eta must be a number > 0, got -2.0"),
])
def test_constructor_rejects_bad_values_naming_the_key(kw, match):
    with pytest.warns(FutureWarning) if "allora_eta" in kw else _no_warning():
        with pytest.raises(ValueError, match=match):
            AdapterConfig(**kw)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_method_class_rejects_another_method_name():
    with pytest.raises(ValueError, match="adapter.method: 'mora' is configured by MoRAConfig, not LoRAConfig"):
        LoRAConfig(method="mora")


def test_old_allora_eta_key_is_read_as_the_rule_with_a_deprecation_message():
    with pytest.warns(FutureWarning, match=r"^adapter.allora_eta is deprecated: write adapter.allora: \{eta: 2.0\}$"):
        old = AdapterConfig("lora", r=4, allora_eta=2.0)
    new = AdapterConfig("lora", r=4, allora={"eta": 2.0})
    assert old == new and new.allora == ALLoRA(2.0) and new.allora_eta == 2.0 and new.scale == 1.0
    from mora_dist.training import config as config_mod  # the YAML/CLI section builder, without data files

    with pytest.warns(FutureWarning, match="adapter.allora_eta is deprecated"):
        cfg = config_mod._build(config_mod.Config, {"adapter": {"method": "mora", "allora_eta": 1.5}}, "", "test")
    assert cfg.adapter.allora == ALLoRA(1.5) and cfg.to_dict()["adapter"]["allora"] == {"eta": 1.5}


def test_stored_configs_of_older_checkpoints_still_load():
    """Checkpoints before the per-method classes stored every method's keys and `allora_eta`."""
    old = dict(method="lora", r=8, alpha=16.0, rslora=False, mora_type="sharing", vera_d_init=0.1, seed=0,
               allora_eta=1.5, targets=["q"], fast_path=True)
    cfg = config_from_dict({"adapter": old}, "ckpt")
    assert cfg.adapter == AdapterConfig("lora", r=8, targets=["q"], allora={"eta": 1.5})
    cfg = config_from_dict({"adapter": dict(old, method="mora", mora_type="rotation", allora_eta=None)}, "ckpt")
    assert cfg.adapter == AdapterConfig("mora", r=8, targets=["q"], mora_type="rotation")


def test_resume_check_reads_the_old_allora_key():
    from mora_dist.training.config import Config
    from mora_dist.training.resume_check import config_differences

    cur = Config(adapter=AdapterConfig("mora", mora_type="rotation", allora={"eta": 2.0}))
    saved = Config().to_dict()
    saved["adapter"] = dict(method="mora", r=8, alpha=16.0, rslora=False, mora_type=6, vera_d_init=0.1, seed=0,
                            allora_eta=2.0, targets=cur.adapter.targets, fast_path=True)
    assert config_differences(saved, cur) == []  # same rule, same type (6 = rotation)
    saved["adapter"]["allora_eta"] = 1.0
    assert config_differences(saved, cur) == ["adapter.allora: {'eta': 1.0} -> {'eta': 2.0}"]


# --- ALLoRA via the new key: the same gradients as via the old key, for every method -----------------
CASES = [("lora", {}), ("mora", {"mora_type": "sharing"}), ("mora", {"mora_type": "rotation"}), ("vera", {})]


def _layer_grads(rank, method, kw, rule, fast):
    """Parameter and input gradients of one adapted ColumnParallelLinear (TP=1) under `rule`:
    'new' (adapter.allora.eta), 'old' (allora_eta) or 'none'."""
    import warnings

    from test_adapters_tp import _layer

    from mora_dist.adapters import build_adapter
    from mora_dist.parallel.inject import layer_shard
    from mora_dist.parallel.wrappers import AdaptedLinear

    extra = {"new": {"allora": {"eta": 1.5}}, "old": {"allora_eta": 1.5}, "none": {}}[rule]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cfg = AdapterConfig(method, r=3, fast_path=fast, **kw, **extra)
    base = _layer("column", 44, 68, False)
    base.weight.requires_grad_(False)
    adapter = build_adapter(cfg, layer_shard(base, "column"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    layer = AdaptedLinear(base, "column")
    layer.add_adapter("adapter", adapter)
    x = torch.randn(5, 2, 44, generator=gen).requires_grad_(True)
    g = torch.randn(5, 2, 68, generator=gen)
    out, _ = layer(x)
    (out * g).sum().backward()
    return {"x": x.grad, **{n: p.grad for n, p in adapter.named_parameters()}}


def _all_rules(rank):
    return {(m, str(kw), fast, rule): _layer_grads(rank, m, kw, rule, fast)
            for m, kw in CASES for fast in (True, False) for rule in ("new", "old", "none")}


@pytest.mark.integration
def test_allora_new_key_gives_bit_identical_gradients_to_old_key():
    got = run_ranks(_all_rules, 1)[0]
    for m, kw in CASES:
        for fast in (True, False):
            new, old, none = (got[(m, str(kw), fast, r)] for r in ("new", "old", "none"))
            for n in new:
                assert torch.equal(new[n], old[n]), (m, kw, fast, n)
            if m != "lora":  # same dW (LoRA drops alpha/r under ALLoRA): the input gradient is left unchanged
                assert torch.equal(new["x"], none["x"])
            assert any(not torch.equal(new[n], none[n]) for n in new if n != "x"), (m, kw, fast)  # the rule acts
            assert all(math.isfinite(v.abs().max().item()) for v in new.values())
