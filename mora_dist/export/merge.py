"""Merge a training checkpoint's adapters into the base and write the merged model as a Megatron
(dist_checkpointing) checkpoint and as Hugging Face safetensors + config.json.

The base comes from the run's source (`model.hf_dir`, or the seeded random init) with the
checkpoint's folded restart rows and its trained full-rank parts (`train.full_rank`: embedding,
output layer, norms) applied; the adapters' last dW is merged on top. Runs under any
TP/PP layout (not necessarily the training one): the checkpoint is stored in canonical layout.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

from mora_dist.training.config import Config, config_from_dict


def config_from_checkpoint(path: str, tp: int | None = None, pp: int | None = None, vpp: int | None = None) -> Config:
    """The run's stored config at the layout given (default: the training layout). A new `pp` without
    `vpp` turns virtual pipeline stages off (the training vpp need not fit the new split)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(path)["common"]
    cfg = config_from_dict(common["config"], f"{path} (stored config)")
    if tp:
        cfg.parallel.tp = tp
    if pp:
        cfg.parallel.pp = pp
        cfg.parallel.vpp = 1
    if vpp:
        cfg.parallel.vpp = vpp
    cfg.parallel.sp = False
    return cfg


def load_merged(cfg: Config, path: str):
    """Build this stage's adapted model chunks (one, or one per virtual stage under parallel.vpp),
    load the checkpoint, merge; returns (the list of plain GPTModel chunks, the checkpoint's step)."""
    from mora_dist.checkpoint import state
    from mora_dist.parallel.inject import unwrap_adapters
    from mora_dist.training.loop import build_adapted_chunks, stage_module
    from mora_dist.training.optimizer import enable_full_rank

    chunks, _ = build_adapted_chunks(cfg)
    # the checkpoint's trained values load into these
    full_rank = [f for c in chunks for f in enable_full_rank(c, cfg.train.full_rank)]
    model = stage_module(chunks)
    params = [p for p in model.parameters() if p.requires_grad]
    holder = SimpleNamespace(model=model, cfg=cfg, step=0, restarts=0, opt=torch.optim.AdamW(params),
                             full_rank=full_rank)
    state.load(holder, path)
    return [unwrap_adapters(c) for c in chunks], holder.step


def merge_and_export(cfg: Config, path: str, out_dir: str, hf_dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> dict:
    """Collective. Writes out_dir/hf (safetensors) and out_dir/megatron (dist checkpoint), atomically:
    both are staged in a folder beside out_dir that replaces it only when complete, so an older
    export's files never survive and a crash leaves the previous export (or nothing) in place.
    An existing non-empty out_dir is refused (FileExistsError) unless `overwrite`."""
    from megatron.core import dist_checkpointing

    from mora_dist.utils.atomic_dir import atomic_output
    from mora_dist.models import export_hf

    chunks, step = load_merged(cfg, path)
    with atomic_output(out_dir, overwrite, "merge output") as tmp:
        export_hf(chunks, os.path.join(tmp, "hf"), dtype=hf_dtype)
        mdir = os.path.join(tmp, "megatron")
        if dist.get_rank() == 0:
            os.makedirs(mdir, exist_ok=True)
        dist.barrier()
        # virtual stages: one sub-dict per chunk, as megatron-LM saves them (the chunks' local module
        # names repeat; the sharded tensors' keys carry global layer numbers, so any layout loads them)
        sd = chunks[0].sharded_state_dict() if len(chunks) == 1 else {
            f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
        dist_checkpointing.save(sd, mdir)
    return dict(step=step, hf=os.path.join(out_dir, "hf"), megatron=os.path.join(out_dir, "megatron"))
