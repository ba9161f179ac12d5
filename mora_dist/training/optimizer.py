"""What the Trainer trains besides the adapters, which optimizer steps it, and one view of the Adam
state for checkpoints and restarts whichever optimizer holds it.

Full-rank parts (`train.full_rank`): ReLoRA / ReMoRA train the embeddings, the output layer and the
norms in full next to the adapters (launch/research/pretrain_relora.py does the same with
`common.is_full_rank_part`). `enable_full_rank` makes those parameters of a megatron GPTModel
trainable before DDP wraps the model (DDP buckets only trainable parameters). The linear layers'
base weights stay frozen, so the adapters' merged-weight path (`AdaptedLinear._use_merged`) is
untouched. They are a second Adam param group with peak LR `train.full_rank_lr` on the same jagged
schedule as the adapters: a restart merges the adapters, which moves the function the full-rank
parts were fitted to, so they re-warm with them (the research script's default, `jagged`).

Optimizers (`train.optimizer`):
- torch AdamW (`adamw`; the CPU path, and `auto` without full-rank parts): every DP rank steps every
  trainable parameter; fused on a GPU. The state of the adapters alone is small (LoRA r=8 on 1.1B:
  50 MB), so sharding it would save little.
- megatron's DistributedOptimizer (`distributed`; `auto` on a GPU with full-rank parts): the Adam
  moments (and, for a bf16 base, the fp32 master copy of each trainable bf16 parameter) are sharded
  over DP, the gradients reduce-scattered and the parameters all-gathered after the step. Built with
  megatron-core's own `get_megatron_optimizer`; it computes the global gradient norm, clips and steps
  (`DistributedAdam.step`). Full-rank parts are large (Llama-3 8B: embedding and head 2 x 525M
  parameters, 8.4 GB of Adam moments in fp32), which is where sharding pays. megatron's optimizers
  assert CUDA tensor types, hence torch AdamW on the CPU.

`adam_state(opt)` (optim/adam_state.py) is the per-parameter view of either optimizer's Adam state
(moments, step count, fp32 master) that checkpoints (checkpoint/state.py, canonical layout, so a checkpoint written with
one optimizer resumes with the other) and restarts (restarts.py) use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mora_dist.optim.adam_state import DistributedAdamState

_NORM = re.compile(r"(^|\.)\w*layernorm\.weight$")


def part_of(name: str) -> str | None:
    """The `train.full_rank` part a GPTModel parameter belongs to (None: not a full-rank part)."""
    if name == "embedding.word_embeddings.weight":
        return "embedding"
    if name == "output_layer.weight":
        return "output_layer"
    if _NORM.search(name):
        return "norms"
    return None


@dataclass
class FullRankParam:
    key: str  # checkpoint key: "full_rank." + the parameter name with the global layer index
    param: torch.nn.Parameter
    part: str
    sharded: bool  # split over TP (vocab-parallel embedding / output layer); False: replicated (norms)
    replica: bool  # the tied output layer's copy on the last pipeline stage (the embedding is the original)

    def sharded_tensor(self, key: str, t: torch.Tensor):
        """megatron ShardedTensor of `t` (this parameter or a tensor shaped like it) in the canonical
        (TP/PP/DP-independent) layout: vocab rows split over TP (model.vocab_size % tp == 0, checked by
        the config), norms whole, written once (TP rank 0, DP rank 0, not the tied copy)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        dp, copy = ps.get_data_parallel_rank(), int(self.replica)
        if self.sharded and tp > 1:
            return ShardedTensor.from_rank_offsets(key, t, (0, tp_rank, tp), replica_id=(copy, 0, dp))
        return ShardedTensor.from_rank_offsets(key, t, replica_id=(copy, tp_rank, dp))


def global_param_names(model) -> dict:
    """parameter -> its name with the global transformer-layer index (the same under every PP split)."""
    from mora_dist.parallel.inject import _global_names, _rename

    prefixes = _global_names(model)
    return {p: _rename(n, prefixes) for n, p in model.named_parameters()}


def enable_full_rank(model, parts) -> list[FullRankParam]:
    """Make the parameters of the full-rank `parts` (train.full_rank) trainable; returns them in
    model order. Call before DDP wraps the model."""
    parts = set(parts)
    if not parts:
        return []
    names = global_param_names(model)
    out = []
    for name, p in model.named_parameters():
        part = part_of(name)
        if part not in parts:
            continue
        # tied embeddings at PP > 1: the last stage's output layer is a copy of the embedding, kept
        # equal by megatron's embedding-group all-reduce of their gradients (marked `shared`)
        tied_copy = part == "output_layer" and getattr(p, "shared", False)
        key = "full_rank." + ("embedding.word_embeddings.weight" if tied_copy else names[p])
        p.requires_grad_(True)
        out.append(FullRankParam(key, p, part, bool(getattr(p, "tensor_model_parallel", False)), tied_copy))
    return out


def build_optimizer(cfg, ddps: list, params: list, full_rank: list[FullRankParam], kind: str):
    """torch AdamW (`kind` adamw) or megatron's DistributedOptimizer (distributed) over the trainable
    `params` of the DDP-wrapped model chunks `ddps` (one, or one per virtual pipeline stage): the adapters' param group (peak LR train.lr) and, with full-rank parts, theirs
    (train.full_rank_lr). Each group's peak LR is its `max_lr` (megatron's key)."""
    t = cfg.train
    full_lr = t.lr if t.full_rank_lr is None else t.full_rank_lr
    full = {id(f.param) for f in full_rank}
    if kind == "distributed":
        return DistributedAdam(cfg, ddps, full, full_lr)
    groups = [{"params": [p for p in params if id(p) not in full], "max_lr": t.lr}]
    if full:
        groups.append({"params": [p for p in params if id(p) in full], "max_lr": full_lr})
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95),
                             fused=torch.cuda.is_available())


class DistributedAdam:
    """megatron-core's DistributedOptimizer (`get_megatron_optimizer`, a ChainedOptimizer of one)
    behind what the Trainer and `step.optimizer_step` use: `param_groups` (the LR per group) and
    `step()`, which completes the gradient norm, clips to train.clip_grad, steps and all-gathers the
    parameters over DP, returning the norm (`clips_itself`: optimizer_step leaves that to it)."""

    clips_itself = True

    def adam_state(self):
        """The per-parameter view of its sharded Adam state (`optim.adam_state`)."""
        return DistributedAdamState(self.opt)

    def __init__(self, cfg, ddps: list, full_rank_ids: set, full_rank_lr: float):
        from megatron.core.optimizer import OptimizerConfig, ParamKey, ParamPredicate, get_megatron_optimizer

        from mora_dist.parallel.inject import adapted_layers

        t = cfg.train
        bf16 = cfg.model.dtype == "bf16"
        conf = OptimizerConfig(optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=0.9,
                               adam_beta2=0.95, adam_eps=1e-8, bf16=bf16,
                               params_dtype=torch.bfloat16 if bf16 else torch.float32,
                               use_distributed_optimizer=True, clip_grad=t.clip_grad)
        # megatron counts a gradient in the global norm on every TP rank when its parameter is marked
        # tensor-parallel, else on TP rank 0 only: mark the TP-sharded adapter parameters like its own
        # (the replicated ones are counted once, as Trainer.grad_norm counts them)
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        for layer in [m for d in ddps for m in adapted_layers(d.module)]:
            for a in layer.adapters.values():
                for n, p in a.named_parameters():
                    if a.is_sharded(n) and a.shard.tp_size > 1:
                        set_tensor_model_parallel_attributes(p, True, a.layout_dim(n) % p.dim(), 1)
        # {} (not None): no default overrides, so weight decay applies to every parameter as torch
        # AdamW applies it; the full-rank parts are their own group with their peak LR
        overrides = {}
        if full_rank_ids:
            key = ParamKey(predicate=ParamPredicate(name="mora_full_rank", fn=lambda p: id(p) in full_rank_ids))
            overrides[key] = {"max_lr": full_rank_lr}
        self.opt = get_megatron_optimizer(conf, list(ddps), config_overrides=overrides)

    @property
    def param_groups(self) -> list:
        return self.opt.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none)

    def step(self) -> float:
        ok, norm, _ = self.opt.step()
        if not ok:  # only a loss scaler (fp16, not used here) skips steps
            raise RuntimeError("megatron's optimizer skipped the step (inf/nan gradients)")
        return float(norm)
