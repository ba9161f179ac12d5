"""Llama-family models on megatron-core vs transformers: logits at TP=1/TP=2(+SP)/PP=2, SDPA vs
local attention, HF round trip, and the errors for bad checkpoints.

Three tiny random models are made with `transformers` (weights perturbed so norms, biases and
logits are far from their trivial init): Llama with llama3 rope scaling (MHA, untied), Mistral
(GQA, sliding window shorter than the sequence) and Qwen2 (GQA, qkv bias, tied embeddings, saved
as a sharded checkpoint with an index). The reference is transformers' eager fp32 forward.
"""
import json
import os

import pytest
import torch

from dist import run_ranks

S, B, VOCAB, TOL = 16, 2, 128, 1e-4
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager")


def _hf_config(kind):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if kind == "llama":
        return LlamaConfig(**COMMON, num_key_value_heads=4, tie_word_embeddings=False, rope_scaling=dict(
            rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))
    if kind == "mistral":
        return MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=6, rope_theta=1e6,
                             tie_word_embeddings=False, head_dim=16)
    return Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6)


def _make(kind, path, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(kind)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, max_shard_size="40KB" if kind == "qwen2" else "1GB")
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed + 100))
    with torch.no_grad():
        logits = model(ids).logits
    return dict(dir=str(path), ids=ids, logits=logits, state=model.state_dict())


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {k: _make(k, root / k, seed) for seed, k in enumerate(["llama", "mistral", "qwen2"])}
    assert os.path.isfile(root / "qwen2" / "model.safetensors.index.json"), "qwen2 should be sharded"
    return out


# ----------------------------------------------------------------------------- rank functions
def _pipeline_logits(model, ids):
    """Full-vocab logits through megatron's schedule (last stage, TP rank 0), else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(S).expand(B, -1)

    def step(it, m):
        out = m(next(it), pos, None)
        return out, lambda o, non_loss_data=False: o

    res = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
        seq_length=S, micro_batch_size=B, forward_only=True, collect_non_loss_data=True)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        return res[0][..., :VOCAB].detach().clone()
    return None


def _run_models(rank, cases, attentions, sequence_parallel, exports):
    """For every (case, attention) import the HF dir, return logits; export some cases."""
    from mora_dist.models import build_model, export_hf, load_hf_checkpoint

    out = {}
    for name, (path, ids) in cases.items():
        for att in attentions:
            torch.manual_seed(1234)
            model = build_model(path, attention=att, parallel_output=False,
                                sequence_parallel=sequence_parallel).eval()
            load_hf_checkpoint(model, path)
            with torch.no_grad():
                out[(name, att)] = _pipeline_logits(model, ids)
            if att == attentions[0] and name in exports:
                export_hf(model, exports[name])
    return out


def _check_logits(results, hf, attentions):
    got = [r for r in results if any(v is not None for v in r.values())]
    assert len(got) == 1, "exactly one rank (last stage, TP rank 0) returns logits"
    for (name, att), logits in got[0].items():
        ref = hf[name]["logits"]
        diff = (logits - ref).abs().max().item()
        assert diff < TOL, f"{name} attention={att}: max |ours - transformers| = {diff}"
    for name in {n for n, _ in got[0]}:  # SDPA and megatron's local attention agree too
        if len(attentions) == 2:
            d = (got[0][(name, attentions[0])] - got[0][(name, attentions[1])]).abs().max().item()
            assert d < 1e-5, f"{name}: sdpa vs local attention differ by {d}"


def _cases(hf):
    return {k: (v["dir"], v["ids"]) for k, v in hf.items()}


# ----------------------------------------------------------------------------- tests
def test_reference_is_sensitive(hf):
    """The checks below can fail: rope scaling, the sliding window and biases change the logits."""
    from transformers import AutoModelForCausalLM

    from mora_dist.models import LlamaSpec, rope_inv_freq

    spec = LlamaSpec.from_hf(hf["llama"]["dir"])
    assert spec.rope_scaling["rope_type"] == "llama3"
    plain = LlamaSpec.from_hf({**spec.to_hf_dict(), "rope_parameters": {"rope_theta": 10000.0}})
    assert (rope_inv_freq(spec) - rope_inv_freq(plain)).abs().max() > 1e-3
    m = AutoModelForCausalLM.from_pretrained(hf["mistral"]["dir"], attn_implementation="eager",
                                             sliding_window=None).eval()
    with torch.no_grad():
        no_window = m(hf["mistral"]["ids"]).logits
    assert (no_window - hf["mistral"]["logits"]).abs().max() > 1e-2
    assert LlamaSpec.from_hf(hf["qwen2"]["dir"]).qkv_bias
    assert hf["qwen2"]["state"]["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0.1


@pytest.mark.integration
def test_tp1_logits_match_transformers(hf):
    atts = ["sdpa", "local"]
    res = run_ranks(_run_models, 1, _cases(hf), atts, False, {})
    _check_logits(res, hf, atts)


@pytest.mark.integration
def test_tp2_logits_and_round_trip(hf, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    atts = ["sdpa", "local"]
    exports = {k: str(tmp_path / k) for k in hf}
    res = run_ranks(_run_models, 2, _cases(hf), atts, False, exports, tp=2)
    _check_logits(res, hf, atts)
    for name, out_dir in exports.items():
        files = {}
        for fn in os.listdir(out_dir):
            if fn.endswith(".safetensors"):
                files.update(load_file(os.path.join(out_dir, fn)))
        ref = hf[name]["state"]
        expect = {k for k in ref if not (k == "lm_head.weight" and name == "qwen2")}  # tied
        assert set(files) == expect, f"{name}: exported names differ: {set(files) ^ expect}"
        for k, v in files.items():
            assert torch.equal(v, ref[k]), f"{name}: {k} changed in the round trip"
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
        sd = reloaded.state_dict()
        for k, v in ref.items():
            assert torch.equal(sd[k], v), f"{name}: transformers reloads {k} differently"
        with torch.no_grad():
            assert torch.equal(reloaded(hf[name]["ids"]).logits, hf[name]["logits"])
        cfg = json.load(open(os.path.join(out_dir, "config.json")))
        assert cfg["model_type"] == name


@pytest.mark.integration
def test_tp2_sequence_parallel_logits(hf):
    res = run_ranks(_run_models, 2, _cases(hf), ["sdpa"], True, {}, tp=2)
    _check_logits(res, hf, ["sdpa"])


@pytest.mark.integration
def test_pp2_logits_and_export(hf, tmp_path):
    from transformers import AutoModelForCausalLM

    atts = ["sdpa", "local"]
    exports = {"mistral": str(tmp_path / "mistral"), "qwen2": str(tmp_path / "qwen2")}
    res = run_ranks(_run_models, 2, _cases(hf), atts, False, exports, pp=2)
    _check_logits(res, hf, atts)
    for name, out_dir in exports.items():
        assert os.path.isfile(os.path.join(out_dir, "model.safetensors.index.json"))
        sd = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
        for k, v in hf[name]["state"].items():
            assert torch.equal(sd[k], v), f"{name}: PP=2 export changed {k}"


@pytest.mark.integration
def test_tp2_pp2_logits_and_export(hf, tmp_path):
    from transformers import AutoModelForCausalLM

    exports = {"llama": str(tmp_path / "llama"), "qwen2": str(tmp_path / "qwen2")}
    res = run_ranks(_run_models, 4, _cases(hf), ["sdpa"], True, exports, tp=2, pp=2)
    _check_logits(res, hf, ["sdpa"])
    for name, out_dir in exports.items():
        sd = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
        for k, v in hf[name]["state"].items():
            assert torch.equal(sd[k], v), f"{name}: TP=2 PP=2 export changed {k}"
