"""Shared helpers for the research experiments (issue 8): single-process megatron setup on CPU or one
CUDA GPU, a tiny Llama, adapter/full-rank parameter selection, and ReLoRA/ReMoRA restarts for a
plain loop."""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PRECISIONS = ("fp32", "tf32")


def device() -> torch.device:
    """The current CUDA device when there is one (init_distributed selects it), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def setup_single_process(threads: int = 1, seed: int = 0, precision: str = "tf32") -> torch.device:
    """One rank (gloo on CPU, NCCL+gloo on a GPU), TP=PP=1 megatron parallel state. On a GPU,
    precision 'tf32' lets fp32 matmuls/convolutions use TF32 tensor cores (parameters, optimizer
    state and everything else stay fp32); 'fp32' keeps full fp32 matmuls. Returns the device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch.set_num_threads(threads)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    # Port 0: the one rank's store binds a port the OS picks at bind time. (Asking for a free
    # port first and binding it later races with the other runs the study starts at once.)
    os.environ.setdefault("MASTER_PORT", "0")
    from mora_dist.compat import mcore_cpu
    from mora_dist.parallel.state import init_distributed

    mcore_cpu.apply()  # megatron on a CPU-only torch (no-op with CUDA)
    init_distributed(tp=1, pp=1, seed=seed)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return device()


def tiny_model(vocab: int, hidden: int, layers: int, heads: int, ffn: int, max_pos: int, seed: int):
    """A random-init Llama (megatron GPTModel via mora_dist.models.build_model) on `device()`.
    The weights depend on `seed` alone (CPU and megatron's CUDA RNG tracker are re-seeded here), so
    every method and run seed of an experiment starts from the same base."""
    from megatron.core import tensor_parallel

    from mora_dist.models import LlamaSpec, build_model

    spec = LlamaSpec(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                     num_query_groups=heads, ffn_hidden_size=ffn, max_position_embeddings=max_pos)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = build_model(spec, pre_process=True, post_process=True, params_dtype=torch.float32,
                        attention="sdpa")
    return model.to(device())


def attach(model, method: str, r: int, mora_type: str = "sharing", seed: int = 0, alpha: float | None = None):
    """method: fft (all trainable) | lora | mora | vera. Returns the number of trainable params."""
    if method == "fft":
        for p in model.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    from mora_dist.adapters import AdapterConfig
    from mora_dist.parallel.inject import apply_adapters

    own = {"lora": {"alpha": float(alpha if alpha is not None else 2 * r)}, "mora": {"mora_type": mora_type}}
    cfg = AdapterConfig(method=method, r=r, seed=seed, **own.get(method, {}))  # each method takes only its keys
    return apply_adapters(model, cfg).trainable


def adapter_scale(model):
    """The scale of the model's adapters as built (LoRA: alpha / r), None without adapters or for a
    method without a scale (MoRA, VeRA)."""
    from mora_dist.parallel.inject import adapted_layers

    for layer in adapted_layers(model):
        for a in layer.adapters.values():
            return getattr(a.cfg, "scale", None)
    return None


def adamw(params, lr: float, betas, weight_decay: float):
    """torch AdamW over a list of parameters or of param groups (dicts with "params"); the fused CUDA
    kernel on a GPU (one launch for all parameters)."""
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    cuda = all(p.is_cuda for p in flat)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, **({"fused": True} if cuda else {}))


def is_full_rank_part(name: str) -> bool:
    """Embeddings, output layer and norms: trained in full next to the adapters in ReLoRA/ReMoRA."""
    return any(k in name for k in ("embedding", "output_layer", "layernorm", "final_norm"))


def mora_types(spec: str) -> tuple:
    """'1,2' -> ReMoRA's type schedule as operator types (mora_dist.adapters.mora.cycle_of); '' -> ()."""
    from mora_dist.adapters.mora import cycle_of

    return cycle_of([int(x) if x.strip().isdigit() else x.strip() for x in spec.split(",")]) if spec.strip() else ()


@torch.no_grad()
def restart_adapters(model, opt, n_restart: int, types: tuple, prune: float, delete_state: bool = False,
                     seed: int = 0) -> None:
    """ReLoRA/ReMoRA restart for a plain loop (mora_dist/training/restarts.py)."""
    from mora_dist.training.restarts import restart_model

    restart_model(model, opt, n_restart, seed, types, prune, delete_state)


def vera_equal_budget_r(layer_dims, budget: int) -> int:
    """VeRA's shared rank r whose trainable count (r + d_out per adapted matrix) comes closest to
    `budget`; layer_dims: (d_in, d_out) of every adapted matrix."""
    n, outs = len(layer_dims), sum(o for _, o in layer_dims)
    return max(1, round((budget - outs) / n))
