"""Fused-layer row layout, SDPA core attention vs megatron's DotProductAttention on arbitrary
masks, and the error messages for unsupported or broken checkpoints."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

from dist import run_ranks
from test_model_hf import _make

from mora_dist.models import LlamaSpec, UnsupportedModelError, fc1_row_index, fuse_rows, qkv_row_index, split_rows


# ----------------------------------------------------------------------------- layout
def _megatron_fused_qkv(q, k, v, ng):
    """Global linear_qkv by megatron's convention: per group [q heads of g; k_g; v_g]."""
    h = q.shape[-1]
    return torch.cat([q.reshape(ng, -1, h), k.reshape(ng, -1, h), v.reshape(ng, -1, h)], 1).reshape(-1, h)


@pytest.mark.parametrize("heads,groups,tp", [(4, 2, 1), (4, 2, 2), (8, 4, 2), (8, 4, 4), (6, 6, 3), (4, 4, 2)])
def test_qkv_row_index_matches_megatron_sharding(heads, groups, tp):
    hn, h = 3, 5
    q, k, v = torch.randn(heads * hn, h), torch.randn(groups * hn, h), torch.randn(groups * hn, h)
    fused = _megatron_fused_qkv(q, k, v, groups)
    shards = fused.chunk(tp, 0)  # ColumnParallelLinear: contiguous row blocks
    for r in range(tp):
        idx = qkv_row_index(heads, groups, hn, tp, r)
        parts = split_rows(shards[r], idx)
        for name, full in dict(q=q, k=k, v=v).items():
            assert torch.equal(parts[name], full[idx[name].glob])
            a, b = idx[name].span()
            assert torch.equal(idx[name].glob, torch.arange(a, b))
        assert torch.equal(fuse_rows({n: t[idx[n].glob] for n, t in dict(q=q, k=k, v=v).items()}, idx), shards[r])
    all_glob = torch.cat([qkv_row_index(heads, groups, hn, tp, r)["k"].glob for r in range(tp)])
    assert torch.equal(all_glob, torch.arange(groups * hn))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fc1_row_index_gate_then_up_per_shard(tp):
    ffn, h = 8, 3
    gate, up = torch.randn(ffn, h), torch.randn(ffn, h)
    n = ffn // tp
    for r in range(tp):
        shard = torch.cat([gate[r * n:(r + 1) * n], up[r * n:(r + 1) * n]])
        idx = fc1_row_index(ffn, tp, r)
        parts = split_rows(shard, idx)
        assert torch.equal(parts["gate"], gate[idx["gate"].glob]) and torch.equal(parts["up"], up[idx["up"].glob])
        assert torch.equal(fuse_rows(parts, idx), shard)


def test_layout_errors():
    with pytest.raises(ValueError, match=r"num_query_groups \(2\) is not divisible by tensor-parallel size 4"):
        qkv_row_index(4, 2, 8, 4, 0)
    with pytest.raises(ValueError, match=r"ffn_hidden_size \(10\) is not divisible"):
        fc1_row_index(10, 4, 0)
    idx = fc1_row_index(8, 2, 0)
    with pytest.raises(ValueError, match=r"up: expected 4 rows for this shard, got shape \[3, 2\]|up: expected 4 rows"):
        fuse_rows({"gate": torch.zeros(4, 2), "up": torch.zeros(3, 2)}, idx)


# ----------------------------------------------------------------------------- config errors
def _cfg(**kw):
    d = dict(model_type="llama", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128)
    d.update(kw)
    return d


def test_unsupported_architectures_are_named():
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*GPT2LMHeadModel"):
        LlamaSpec.from_hf(_cfg(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnsupportedModelError, match=r"rope scaling type 'yarn'"):
        LlamaSpec.from_hf(_cfg(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)))
    with pytest.raises(UnsupportedModelError, match=r"hidden_act 'gelu'"):
        LlamaSpec.from_hf(_cfg(hidden_act="gelu"))
    with pytest.raises(UnsupportedModelError, match=r"attention_bias"):
        LlamaSpec.from_hf(_cfg(attention_bias=True))
    # transformers 4.x style rope fields are read too
    s = LlamaSpec.from_hf(_cfg(rope_theta=5e5, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                 high_freq_factor=4.0,
                                                                 original_max_position_embeddings=8192)))
    assert s.rope_theta == 5e5 and s.rope_scaling["factor"] == 8.0 and s.num_query_groups == 2


def test_missing_files_are_named(tmp_path):
    from mora_dist.models.hf_io import SafetensorsDir

    with pytest.raises(FileNotFoundError, match="does not exist"):
        SafetensorsDir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no config.json at .*empty"):
        os.makedirs(tmp_path / "empty")
        LlamaSpec.from_hf(tmp_path / "empty")
    torch.save({}, tmp_path / "empty" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        SafetensorsDir(tmp_path / "empty")


# ----------------------------------------------------------------------------- rank functions
def _attention_and_load_errors(rank, good, broken, ids, export_dir):
    """SDPA vs DotProductAttention on causal/padding/window masks; padded vocab; load errors."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mora_dist.models import SDPAttention, build_model, export_hf, load_hf_checkpoint, transformer_config

    out = {}
    spec = LlamaSpec.from_hf(good)
    padded = build_model(spec, attention="sdpa", parallel_output=False, make_vocab_size_divisible_by=5).eval()
    load_hf_checkpoint(padded, good)
    with torch.no_grad():
        logits = padded(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    out["padded"] = (padded.vocab_size_padded, logits[..., : spec.vocab_size].clone(), logits[..., spec.vocab_size:].clone())
    export_hf(padded, export_dir)
    g = torch.Generator().manual_seed(0)
    s, b = 12, 3
    q = torch.randn(s, b, 4, 16, generator=g)
    k, v = torch.randn(s, b, 2, 16, generator=g), torch.randn(s, b, 2, 16, generator=g)
    causal = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    pad = causal.expand(b, 1, s, s).clone()
    pad[1, :, :, :4] = True  # left padding for sample 1 ...
    pad[1, :, torch.arange(4), torch.arange(4)] = False  # ... padded queries still see themselves
    diffs, outs = {}, {}
    for window in (None, (3, 0)):
        cfg = transformer_config(dataclasses.replace(spec, num_query_groups=2), window_size=window)  # GQA
        ours, ref = (cls(cfg, 1, AttnMaskType.causal, "self") for cls in (SDPAttention, DotProductAttention))
        masks = {"causal": causal} if window else {"causal": causal, "padding": pad}
        for name, mask in masks.items():
            outs[(window, name)] = ours(q, k, v, mask)
            diffs[(window, name)] = (outs[(window, name)] - ref(q, k, v, mask)).abs().max().item()
        if window is None:
            diffs[(window, "none_is_causal")] = (ours(q, k, v, None) - ref(q, k, v, causal)).abs().max().item()
            tail = torch.ones(1, 1, 5, s, dtype=torch.bool).triu(1 + s - 5)  # 5 new queries, s keys
            diffs[(window, "none_sq<sk")] = (ours(q[-5:], k, v, None) - ref(q[-5:], k, v, tail)).abs().max().item()
    wide = SDPAttention(transformer_config(dataclasses.replace(spec, num_query_groups=2), window_size=(s, 0)),
                        1, AttnMaskType.causal, "self")
    diffs["non-binding window"] = (wide(q, k, v, None) - outs[(None, "causal")]).abs().max().item()
    out["attention_diffs"] = diffs
    causal_out = outs[(None, "causal")]  # the masks matter, so the comparisons above can fail
    out["mask_effects"] = [(outs[key] - causal_out).abs().max().item() for key in [(None, "padding"), ((3, 0), "causal")]]

    for name, path in broken.items():
        model = build_model(spec, attention="sdpa")
        try:
            load_hf_checkpoint(model, path)
            out[name] = "no error"
        except (ValueError, KeyError, FileNotFoundError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.integration
def test_sdpa_attention_and_load_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    made = _make("llama", tmp_path / "good", 5)
    good = made["dir"]
    state = load_file(os.path.join(good, "model.safetensors"))
    broken = {}

    def variant(name, tensors=None, files=None):
        d = tmp_path / name
        os.makedirs(d)
        shutil.copy(os.path.join(good, "config.json"), d)
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"))
        for fn, content in (files or {}).items():
            (d / fn).write_text(content)
        broken[name] = str(d)

    variant("missing_tensor", {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"})
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    variant("bad_shape", bad)
    variant("missing_shard", files={"model.safetensors.index.json": json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00002-of-00002.safetensors" for k in state}})})
    res = run_ranks(_attention_and_load_errors, 1, good, broken, made["ids"], str(tmp_path / "export"))[0]

    vocab_padded, logits, pad_logits = res["padded"]
    assert vocab_padded == 130 and torch.all(pad_logits == 0)
    assert (logits - made["logits"]).abs().max() < 1e-4
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(exported) == set(state)
    assert all(torch.equal(exported[k], v) for k, v in state.items()), "padded-vocab export changed weights"

    for key, d in res["attention_diffs"].items():
        assert d < 1e-5, f"SDPA vs DotProductAttention {key}: {d}"
    assert min(res["mask_effects"]) > 1e-2, res["mask_effects"]
    assert res["missing_tensor"].startswith("KeyError") and "model.layers.1.mlp.up_proj.weight" in res["missing_tensor"]
    assert res["bad_shape"].startswith("ValueError")
    assert "model.layers.0.self_attn.k_proj.weight" in res["bad_shape"] and "[32, 64]" in res["bad_shape"]
    assert "[64, 64]" in res["bad_shape"]
    assert res["missing_shard"].startswith("FileNotFoundError")
    assert "model-00002-of-00002.safetensors" in res["missing_shard"] and "embed_tokens" in res["missing_shard"]
