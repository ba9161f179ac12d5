"""Adapter demo (README's main command until the training loop lands): a tiny Llama-style
megatron-core GPTModel at TP=2 on CPU/gloo, MoRA (sharing) on all 7 canonical projections, a few
dozen Adam steps memorising a fixed batch, then an exact merge into the sharded weights.

Run: .venv/bin/torchrun --standalone --nproc_per_node=2 launch/demo.py [--method mora] [--steps 40]
"""
from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="mora", choices=["lora", "mora", "vera"])
    ap.add_argument("--mora-type", default="sharing")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args()

    import torch.distributed as dist

    from mora_dist.parallel.state import init_distributed

    init_distributed(tp=int(__import__("os").environ.get("WORLD_SIZE", 1)))
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.adapters import AdapterConfig
    from mora_dist.parallel import mcore_cpu
    from mora_dist.parallel.inject import apply_adapters, merge_adapters

    rank0 = dist.get_rank() == 0
    tp = ps.get_tensor_model_parallel_world_size()
    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        add_bias_linear=False, tensor_model_parallel_size=tp, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, **mcore_cpu.config_overrides())
    torch.manual_seed(0)
    S, B, V = 32, 4, 256
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=V, max_sequence_length=S, position_embedding_type="rope")
    acfg = AdapterConfig(method=args.method, r=args.r, mora_type=args.mora_type)
    report = apply_adapters(model, acfg)
    if rank0:
        print(f"TP={tp}, {args.method} ({args.mora_type if args.method == 'mora' else f'r={args.r}'})\n{report}")
    lr = args.lr or {"lora": 3e-3, "mora": 3e-3, "vera": 3e-2}[args.method]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, S), generator=g)
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)
    mask = torch.ones(1, 1, S, S, dtype=torch.bool).tril().logical_not()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        loss = model(x, pos, mask, labels=x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank0 and (step == 1 or step % 10 == 0):
            print(f"step {step:3d}  loss {loss.item():.4f}  ({(time.time() - t0) / step * 1e3:.0f} ms/step)", flush=True)
    with torch.no_grad():
        before = model(x, pos, mask)
        merge_adapters(model)
        after = model(x, pos, mask)
    diff = (after - before).abs().max().item()
    if rank0:
        print(f"merged adapters into the TP shards: max |logits diff| = {diff:.2e}")
    from mora_dist.parallel.state import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
