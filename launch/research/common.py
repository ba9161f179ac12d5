"""Shared helpers for the research experiments (issue 8): single-process megatron setup, a tiny
Llama, adapter/full-rank parameter selection, and ReLoRA/ReMoRA restarts for a plain loop."""
from __future__ import annotations

import os
import socket
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_single_process(threads: int = 1, seed: int = 0) -> None:
    """One gloo rank, TP=PP=1 megatron parallel state."""
    torch.set_num_threads(threads)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from mora_dist.parallel.state import init_distributed

    init_distributed(tp=1, pp=1, seed=seed)


def tiny_model(vocab: int, hidden: int, layers: int, heads: int, ffn: int, max_pos: int, seed: int):
    from mora_dist.models import LlamaSpec, build_model

    spec = LlamaSpec(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                     num_query_groups=heads, ffn_hidden_size=ffn, max_position_embeddings=max_pos)
    torch.manual_seed(seed)
    return build_model(spec, pre_process=True, post_process=True, params_dtype=torch.float32,
                       attention="sdpa")


def attach(model, method: str, r: int, mora_type: str = "sharing", seed: int = 0, alpha: float | None = None):
    """method: fft (all trainable) | lora | mora | vera. Returns the number of trainable params."""
    if method == "fft":
        for p in model.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    from mora_dist.adapters import AdapterConfig
    from mora_dist.parallel.inject import apply_adapters

    cfg = AdapterConfig(method=method, r=r, alpha=float(alpha if alpha is not None else 2 * r),
                        mora_type=mora_type, seed=seed)
    return apply_adapters(model, cfg).trainable


@torch.no_grad()
def restart_adapters(model, opt, n_restart: int, cycle_mora_types: bool, prune: float, seed: int = 0) -> None:
    """ReLoRA/ReMoRA restart for a plain loop (mora_dist/training/restarts.py)."""
    from mora_dist.training.restarts import restart_model

    restart_model(model, opt, n_restart, seed, cycle_mora_types, prune)