"""Export trained LoRA / VeRA adapters in Hugging Face PEFT's format (adapter_config.json +
adapter_model.safetensors), so `peft.PeftModel.from_pretrained(hf_model, dir)` loads what we
trained. Canonical targets map to HF module names (q -> self_attn.q_proj, ..., down ->
mlp.down_proj); TP shards are gathered and PP stages collected on global rank 0, which writes.
VeRA's shared projections are stored too (PEFT's `save_projection=True`), so loading does not
depend on regenerating them.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _full(adapter, name: str, t: torch.Tensor) -> torch.Tensor:
    """Gather a TP-sharded adapter tensor to its full (TP=1) shape on every TP rank."""
    if not adapter.is_sharded(name):
        return t
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, adapter.layout_dim(name))


def export_peft(model, cfg, out_dir: str, base_model: str | None = None, overwrite: bool = False) -> None:
    """Collective over all ranks. `cfg` is the adapter config (MethodConfig) the model was adapted with. Atomic like
    export_hf: staged beside `out_dir`; an existing non-empty `out_dir` is refused unless `overwrite`."""
    import re

    from megatron.core import parallel_state as ps

    from mora_dist.utils.atomic_dir import atomic_output
    from mora_dist.parallel.inject import named_adapters

    if cfg.method not in ("lora", "vera"):
        raise ValueError(f"PEFT export supports lora and vera adapters, not {cfg.method!r}")
    bad = [t for t in cfg.targets if t not in HF_NAMES]
    if bad:
        raise ValueError(f"PEFT export needs canonical targets {sorted(HF_NAMES)}; got {bad}")
    tensors, vera_shapes = {}, None
    for key, _, target, a in named_adapters(model):
        layer = int(re.search(r"layers\.(\d+)", key).group(1))
        prefix = f"base_model.model.model.layers.{layer}.{HF_NAMES[target]}"
        full = {n: _full(a, n, p.detach().float()) for n, p in a.named_parameters()}
        if cfg.method == "lora":
            tensors[f"{prefix}.lora_A.weight"] = full["A"]
            tensors[f"{prefix}.lora_B.weight"] = full["B"]
        else:
            tensors[f"{prefix}.vera_lambda_d"] = full["d"]
            tensors[f"{prefix}.vera_lambda_b"] = full["b"]
            vera_shapes = (a.vera_in_max, a.vera_out_max)
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((tensors if writer else {}, vera_shapes), gathered, dst=0)
    with atomic_output(out_dir, overwrite, "PEFT export") as tmp:  # no file of an older export survives
        if dist.get_rank() == 0:
            _write(tmp, gathered, cfg, base_model)


def _write(out_dir, gathered, cfg, base_model) -> None:
    """Rank 0: adapter_model.safetensors + adapter_config.json from every rank's gathered tensors."""
    from safetensors.torch import save_file

    from mora_dist.adapters.vera import shared_projections

    allt = {k: v.contiguous() for d, _ in gathered for k, v in d.items()}
    common = dict(base_model_name_or_path=base_model, task_type="CAUSAL_LM", bias="none",
                  target_modules=sorted(HF_NAMES[t].split(".")[1] for t in cfg.targets), r=cfg.r,
                  inference_mode=True)
    if cfg.method == "lora":
        conf = dict(common, peft_type="LORA", lora_alpha=cfg.alpha if cfg.allora is None else cfg.r,
                    use_rslora=cfg.rslora and cfg.allora is None, lora_dropout=0.0,
                    init_lora_weights=True, fan_in_fan_out=False)
    else:
        shapes = next(s for _, s in gathered if s)
        A, B = shared_projections(cfg.seed, cfg.r, *shapes)
        allt["base_model.vera_A"], allt["base_model.vera_B"] = A.contiguous(), B.contiguous()
        conf = dict(common, peft_type="VERA", projection_prng_key=cfg.seed, save_projection=True,
                    vera_dropout=0.0, d_initial=cfg.vera_d_init, fan_in_fan_out=False)
    save_file(allt, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=2)
