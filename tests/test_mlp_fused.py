"""The fused adapted MLP (mora_dist/parallel/mlp.py) against megatron's MLP forward over the same
adapted linears: loss, every adapter gradient and the input gradient, in float64. The fused Function
runs its Triton kernels, so it serves only on a GPU or under TRITON_INTERPRET=1 (the subprocess of
test_fused_mlp_interpreted); in a plain CPU run the test checks that megatron's forward is taken."""
import os
import subprocess
import sys

import pytest
import torch

from dist import run_ranks

H, FFN, NH, NG, V, S, B, L = 32, 40, 4, 2, 64, 9, 2, 2
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def _model(dtype):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.compat import mcore_cpu

    cfg = TransformerConfig(
        num_layers=L, hidden_size=H, ffn_hidden_size=FFN, num_attention_heads=NH, num_query_groups=NG,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        add_bias_linear=False, params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
        **mcore_cpu.config_overrides())
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=V, max_sequence_length=S, position_embedding_type="rope")


def _case(rank, method, fixed):
    from mora_dist.adapters import AdapterConfig
    from mora_dist.parallel import mlp
    from mora_dist.parallel.inject import apply_adapters, fixed_adapters

    model = _model(torch.float64)
    model.to(torch.float64)
    apply_adapters(model, AdapterConfig(method=method, r=3, targets=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B is zero at init: give every factor a value so each gradient is tested
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    x = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)
    mask = torch.ones(1, 1, S, S, dtype=torch.bool).tril().logical_not()
    calls, real = [], mlp._FusedMLP.apply
    mlp._FusedMLP.apply = lambda *a: (calls.append(1), real(*a))[1]
    served = mlp._served

    def run(fused: bool):
        mlp._served = served if fused else (lambda *a: None)
        model.zero_grad(set_to_none=True)
        emb = model.embedding(x, pos).detach().requires_grad_(True)  # the decoder's input, to check dx too
        with fixed_adapters(model) if fixed else torch.enable_grad():
            h = model.decoder(emb, mask, rotary_pos_emb=model.rotary_pos_emb(S))
            loss = model.output_layer(h)[0].double().pow(2).mean()
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), emb.grad.clone(), grads

    try:
        ref = run(False)
        n_ref = len(calls)
        got = run(True)
    finally:
        mlp._FusedMLP.apply, mlp._served = real, served
    err = max([(got[0] - ref[0]).abs().item(), (got[1] - ref[1]).abs().max().item()]
              + [(got[2][n] - ref[2][n]).abs().max().item() for n in ref[2]])
    scale = max([ref[1].abs().max().item()] + [g.abs().max().item() for g in ref[2].values()])
    return dict(ref_calls=n_ref, calls=len(calls), rel=err / scale, n_grads=len(ref[2]))


@pytest.mark.integration
@pytest.mark.parametrize("method,fixed", [("lora", False), ("lora", True), ("mora", False)])
def test_fused_mlp_matches_megatron_mlp(method, fixed, monkeypatch):
    """LoRA: the fused Function serves every layer (on a GPU / the interpreter), with the step's weight
    (`fixed_adapters`) or one built in its forward, and equals megatron's path to 1e-10 relative;
    MoRA (block adapters) never takes it."""
    monkeypatch.setenv("MORA_DIST_FUSED_MLP", "1")  # opt-in (parallel/mlp.py); the ranks inherit it
    r = run_ranks(_case, 1, method, fixed)[0]
    kern = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    assert r["ref_calls"] == 0
    assert r["calls"] == (L if kern and method == "lora" else 0), r
    assert r["n_grads"] == L * 14 if method == "lora" else r["n_grads"] > 0
    assert r["rel"] < 1e-10, r


@pytest.mark.integration
def test_fused_mlp_interpreted():
    """test_fused_mlp_matches_megatron_mlp with the fused Function's Triton kernels executed by Triton's
    interpreter on the CPU (TRITON_INTERPRET=1 must be set before triton is imported: a subprocess)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_fused_mlp_matches_megatron_mlp"],
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "3 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_install_once_and_env_switch(monkeypatch):
    """install() wraps an MLP's forward only with MORA_DIST_FUSED_MLP=1 (opt-in until timed on a GPU),
    and once however often adapters are applied."""
    from mora_dist.parallel import mlp

    class Dense:
        def forward(self, x):
            return x

    off, on = Dense(), Dense()
    monkeypatch.delenv("MORA_DIST_FUSED_MLP", raising=False)
    mlp.install(off)
    assert "forward" not in vars(off)
    monkeypatch.setenv("MORA_DIST_FUSED_MLP", "1")
    mlp.install(on)
    first = vars(on)["forward"]
    mlp.install(on)
    assert vars(on)["forward"] is first and on._fused_mlp
