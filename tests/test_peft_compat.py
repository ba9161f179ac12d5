"""Adapters on the canonical targets of the fused megatron layers equal Hugging Face PEFT's
per-projection adapters: our TP=2 forward == PEFT's forward on the same weights (loaded through
our PEFT-format export), and the merged HF export's transformers logits == our adapter model's."""
import pytest
import torch

from dist import run_ranks

pytestmark = pytest.mark.integration  # multi-process / subprocess: outside the fast unit subset

S, B, V = 12, 2, 96
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def _make_hf(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.1) if "norm" not in n else p.uniform_(0.5, 1.5)
    m.save_pretrained(path)


def _ours(rank, hf_dir, method, out):
    import zlib

    from megatron.core import parallel_state as ps

    from mora_dist.adapters import AdapterConfig
    from mora_dist.export.peft import export_peft
    from mora_dist.models import build_model, export_hf, load_hf_checkpoint
    from mora_dist.parallel.inject import adapted_layers, apply_adapters, unwrap_adapters

    model = build_model(hf_dir, parallel_output=False).eval()
    load_hf_checkpoint(model, hf_dir)
    kw = {"r": 4, "alpha": 8} if method == "lora" else {"r": 16}  # alpha is LoRA's key only
    cfg = AdapterConfig(method=method, targets=TARGETS, seed=5, **kw)
    apply_adapters(model, cfg)
    # non-trivial adapter values, identical full tensors on every layout
    for i, layer in enumerate(adapted_layers(model)):
        for t, a in layer.adapters.items():
            full = {}
            for n, p in a.named_parameters():
                shape = list(p.shape)
                if a.is_sharded(n):
                    shape[a.layout_dim(n)] = a.shard.d_out if a.layout[n] == "out" else a.shard.d_in
                g = torch.Generator().manual_seed(zlib.crc32(f"{i}{t}{n}".encode()))
                full[n] = torch.randn(shape, generator=g) * 0.3
            a.load_full_(full)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(S).expand(B, -1)
    with torch.no_grad():
        logits = model(ids, pos, None)[..., :V]
    export_peft(model, cfg, f"{out}/adapter")
    unwrap_adapters(model)
    export_hf(model, f"{out}/merged")
    return dict(ids=ids, logits=logits if ps.get_tensor_model_parallel_rank() == 0 else None)


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_peft_forward_and_merged_export_match(tmp_path, method):
    import peft
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    _make_hf(hf_dir)
    res = run_ranks(_ours, 2, str(hf_dir), method, str(tmp_path), tp=2)[0]
    ids, ours = res["ids"], res["logits"]
    base = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        plain = base(ids).logits
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = pm(ids).logits
    assert (ours - plain).abs().max() > 0.1  # the adapters matter
    assert (ours - theirs).abs().max() < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (merged(ids).logits - ours).abs().max() < 1e-4
