"""Peer anchor: Hugging Face transformers + PEFT adapter training throughput on one GPU.
(A copy of the anchors' peer script, only this line added, so docs/design.md section 5 and launch/bench.py can be reproduced from the repo.)

Measures tokens/s and peak memory of a Llama-style model (random init, bf16 base) with
LoRA / VeRA / full fine-tuning, so the project's numbers can be put side by side.
Usage: python3 bench/peer_peft.py [--size 1b|8b] [--seq 2048] [--mbs 4] [--methods lora,vera,full] [--grad-ckpt] [--liger]
"""
import argparse, json, time, os
import torch
import transformers, peft
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {
    "160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    # Llama-3-8B shape (vocab 128256): the size continual-pretraining users actually adapt
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def flops_per_token(cfg, seq, trainable_full):
    h, L, f, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    n_lin = L * (2 * h * h + 2 * h * kv + 3 * h * f) + h * V  # matmul params incl. lm head
    attn = L * 2 * 2 * seq * h  # QK^T and AV, forward, causal counted full (Megatron convention)
    fwd = 2 * n_lin + attn
    # full FT: fwd + 2x bwd; frozen base: fwd + input-grad bwd (weight grads skipped)
    return fwd * 3 if trainable_full else fwd * 2


def run(method, size, seq, mbs, steps=8, warm=3, grad_ckpt=False, liger=False):
    torch.manual_seed(0)
    if liger:  # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy): what speed-minded HF users add
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    cfg = LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": seq, **SIZES[size]})
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).cuda()
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    elif method == "vera":
        model = peft.get_peft_model(model, peft.VeraConfig(r=256, target_modules=TARGETS))
    if grad_ckpt:  # what HF users turn on when activations do not fit
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    ntrain = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (mbs, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    def step():
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(warm):
        step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / steps
    tok_s = mbs * seq / dt
    fpt = flops_per_token(cfg, seq, method == "full")
    res = dict(method=method, size=size, grad_ckpt=grad_ckpt, liger=liger, seq=seq, mbs=mbs, trainable=ntrain, step_ms=round(dt * 1e3, 1),
               tokens_per_s=round(tok_s), model_tflops=round(tok_s * fpt / 1e12, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del model, opt
    torch.cuda.empty_cache()
    return res


def matmul_peak():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t) / 1e12


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--methods", default="lora,vera,full")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--liger", action="store_true")
    a = ap.parse_args()
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                          transformers=transformers.__version__, peft=peft.__version__,
                          bf16_matmul_tflops=round(matmul_peak(), 1))))
    for m in a.methods.split(","):
        try:
            print(json.dumps(run(m, a.size, a.seq, a.mbs, grad_ckpt=a.grad_ckpt, liger=a.liger)), flush=True)
        except Exception as e:  # report and go on
            print(json.dumps(dict(method=m, error=repr(e)[:300])), flush=True)
