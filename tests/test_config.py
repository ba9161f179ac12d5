"""Config loading and validation in-process (no ranks): the model shape with `model.hf_dir` comes from
the checkpoint's config.json, before any check uses it."""
import json
from pathlib import Path

import pytest

from train_utils import write_dataset

ROOT = Path(__file__).resolve().parents[1]

# TinyLlama-1.1B's shape: 32 heads, 4 KV groups, 22 layers, vocab 32000 (defaults: 4 heads, 2 groups, 2 layers, 256)
LLAMA_1B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                tie_word_embeddings=False)


def _hf_dir(path, **kw):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**LLAMA_1B, **kw}))
    return str(path)


def _sub(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def _biomed(tmp_path, monkeypatch, world, *extra, **hf):
    from mora_dist.training.config import load_config

    monkeypatch.setenv("WORLD_SIZE", str(world))
    data = write_dataset(str(tmp_path / "data"), seed=1)
    over = [f"model.hf_dir={_hf_dir(tmp_path / 'hf', **hf)}", f"data.train=[{{path: {data}, weight: 1.0}}]",
            f"data.eval_domain={data}", f"data.eval_general={data}", f"run.out_dir={tmp_path}/run",
            f"checkpoint.dir={tmp_path}/ckpt", *extra]
    return load_config(str(ROOT / "configs" / "cpt_biomed.yaml"), over)


def test_hf_dir_shape_is_validated_not_the_defaults(tmp_path, monkeypatch):
    """Before: cpt_biomed.yaml with parallel.tp=4 was rejected for the default num_query_groups=2,
    and the default vocab_size (256) reached the dataset."""
    cfg = _biomed(tmp_path, monkeypatch, 8, "parallel.tp=4")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (22, 2048, 5632)
    assert (m.num_attention_heads, m.num_query_groups, m.vocab_size) == (32, 4, 32000)


def test_hf_dir_shape_errors_name_the_checkpoint_values(tmp_path, monkeypatch):
    from mora_dist.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.num_query_groups=4 / num_attention_heads must be divisible by "
                                          r"parallel.tp=8"):
        _biomed(tmp_path, monkeypatch, 8, "parallel.tp=8")


def test_hf_dir_layers_and_vocab_checked(tmp_path, monkeypatch):
    from mora_dist.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.num_layers=3 is not divisible by parallel.pp=2"):
        _biomed(_sub(tmp_path, "a"), monkeypatch, 4, "parallel.pp=2", num_hidden_layers=3)
    with pytest.raises(ConfigError, match=r"data.eod_id=500 is outside the model vocabulary \(model.vocab_size=300\)"):
        _biomed(_sub(tmp_path, "b"), monkeypatch, 2, "data.eod_id=500", vocab_size=300)


def test_resume_compares_hf_dir_not_the_shape_it_implies(tmp_path, monkeypatch):
    """Checkpoints written before the shape was resolved stored the default sizes beside hf_dir."""
    from mora_dist.training.config import Config
    from mora_dist.training.resume_check import config_differences

    cfg = _biomed(tmp_path, monkeypatch, 2)
    saved = Config().to_dict()
    saved["model"]["hf_dir"], saved["model"]["dtype"] = cfg.model.hf_dir, "bf16"
    saved["adapter"], saved["data"] = cfg.to_dict()["adapter"], cfg.to_dict()["data"]
    assert config_differences(saved, cfg) == []
    saved["model"]["hf_dir"] = str(tmp_path / "other")
    assert [d.split(":")[0] for d in config_differences(saved, cfg)] == ["model.hf_dir"]


def test_switches_are_typed_config_not_environment(tmp_path, monkeypatch):
    """adapter.fast_path and train.compile are config keys; the fast path is a runtime choice that a
    resumed run may change."""
    from mora_dist.adapters import AdapterConfig, Shard, build_adapter
    from mora_dist.training.resume_check import config_differences

    monkeypatch.delenv("MORA_DIST_ADAPTER_FAST", raising=False)
    cfg = _biomed(tmp_path, monkeypatch, 2, "adapter.fast_path=false", "train.compile=false")
    assert cfg.adapter.fast_path is False and cfg.train.compile is False
    a = build_adapter(AdapterConfig("lora", r=2, fast_path=False), Shard(8, 8))
    assert not a.fast and not a.unsharded
    assert build_adapter(AdapterConfig("lora", r=2), Shard(8, 8)).unsharded
    saved = cfg.to_dict()
    saved["adapter"]["fast_path"] = True
    assert config_differences(saved, cfg) == []


def test_run_profile_is_two_positive_steps(tmp_path, monkeypatch):
    """run.profile = [first step, number of steps]; anything else is a one-line error naming the key."""
    from mora_dist.training.config import ConfigError

    assert _biomed(tmp_path, monkeypatch, 2, "run.profile=[4,2]").run.profile == [4, 2]
    for bad in ("[4]", "[0,2]", "[3,0]"):
        with pytest.raises(ConfigError, match=r"run.profile must be \[first_step, n_steps\]"):
            _biomed(_sub(tmp_path, f"b{bad.count(',')}{bad[1]}{bad[-2]}"), monkeypatch, 2, f"run.profile={bad}")


def test_vpp_errors_name_the_key_and_the_fix(tmp_path, monkeypatch):
    """parallel.vpp (interleaved schedule): what megatron would reject inside the first step is a
    one-line config error naming the key."""
    from mora_dist.training.config import ConfigError
    from train_utils import tiny_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    vpp = {"parallel.pp": 2, "parallel.vpp": 2}
    assert tiny_config(tmp_path, **vpp, **{"model.num_layers": 4}).parallel.vpp == 2
    assert tiny_config(tmp_path).parallel.vpp == 1  # default: off
    # graphs capture the interleaved schedule (launch/device/vpp_graph_check.py: eager = graphed on 2 H200s):
    # with vpp the only complaint about train.cuda_graph here is that this machine has no GPU
    with pytest.raises(ConfigError, match=r"^train.cuda_graph: true needs a GPU"):
        tiny_config(tmp_path, **vpp, **{"model.num_layers": 4, "train.cuda_graph": True})
    cases = [({"parallel.vpp": 0}, r"parallel.vpp must be >= 1"),
             ({"parallel.overlap_sm_carveout": -1}, r"parallel.overlap_sm_carveout must be in \[0, 128\) \(SMs; 0 = off\), got -1"),
             ({"parallel.tp_transport": "fast"}, r"^parallel.tp_transport must be one of auto, nccl, copy_engine, got 'fast'$"),
             ({"parallel.tp": 2, "parallel.tp_transport": "copy_engine"},
              r"^parallel.tp_transport: copy_engine needs GPUs \(none is visible\); set parallel.tp_transport=nccl$"),
             ({"parallel.vpp": 2}, r"parallel.vpp=2 needs parallel.pp >= 2 .*; set parallel.vpp=1"),
             ({**vpp, "model.num_layers": 6},
              r"model.num_layers=6 is not divisible by parallel.pp \* parallel.vpp = 2 \* 2 .*change parallel.vpp"),
             ({**vpp, "model.num_layers": 4, "train.global_batch": 6},
              r"parallel.vpp=2: train.global_batch / \(train.micro_batch \* data-parallel size\) = 6 / \(2 \* 1\) = 3 "
              r"micro-batches, not a multiple of parallel.pp=2 .*change train.global_batch or train.micro_batch")]
    for over, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            tiny_config(tmp_path, **over)
        assert "\n" not in str(e.value)
