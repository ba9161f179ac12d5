"""A whole training run: set-up, resume, the step loop with eval/checkpoints/metrics, shutdown."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist

from mora_dist.parallel.inject import adapted_layers

from mora_dist.training.config import Config


def run(cfg: Config, stop: dict | None = None) -> dict:
    """Train per `cfg` on this rank; `stop["signal"]` set by a handler ends the run after the current
    step with a checkpoint. Returns {rank0, step, loss, stopped_by}. Raises preflight.RunError (one
    line, the same on every rank) when the run must not start: folder locked by another run,
    no intact checkpoint, changed configuration, token ids outside the vocabulary."""
    from mora_dist.parallel.state import destroy_distributed, init_distributed
    from mora_dist.training import preflight

    stop = stop if stop is not None else {}
    init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.model.seed, vpp=cfg.parallel.vpp)
    try:
        plan = preflight.prepare(cfg)  # lock, checkpoint choice, config and token checks (RunError)
    except BaseException:
        destroy_distributed()
        raise
    try:
        return _train(cfg, stop, plan)
    finally:
        plan.release()


def _train(cfg: Config, stop: dict, plan) -> dict:
    from mora_dist.checkpoint import state
    from mora_dist.metrics.flops import DecoderShape, flops_per_token
    from mora_dist.metrics.logger import MetricsLogger
    from mora_dist.metrics.profile import profiled
    from mora_dist.metrics.throughput import StepMeter
    from mora_dist.parallel.state import destroy_distributed
    from mora_dist.training.loop import Trainer
    from mora_dist.training.model import llama_spec

    rank0 = dist.get_rank() == 0
    if rank0:
        for note in plan.notes:
            print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
    trainer = Trainer(cfg)
    ckpt = cfg.checkpoint.dir
    if plan.resume:
        state.load(trainer, plan.resume)
        if rank0:
            print(f"resumed from {plan.resume} at step {trainer.step}", flush=True)
    if rank0:
        print(str(trainer.report), flush=True)
        if cfg.parallel.tp > 1 and cfg.parallel.sp:
            print(f"SP exchanges between TP ranks: {trainer.tp_transport} (parallel.tp_transport="
                  f"{cfg.parallel.tp_transport})", flush=True)
    world = dist.get_world_size()
    logger = MetricsLogger(cfg.run.out_dir, cfg.run.name, cfg.to_dict(), cfg.run.wandb, rank=dist.get_rank(),
                           num_gpus=world, log_every=cfg.train.log_every)
    adapter_params = _global_trainable(trainer)
    shape = DecoderShape.from_config(llama_spec(cfg.model), cfg.data.seq_length)
    meter = StepMeter(cfg.train.global_batch * cfg.data.seq_length, world,
                      flops_per_token(shape, full_finetune=False, adapter_params=adapter_params),
                      peak_flops=cfg.run.peak_tflops * 1e12)
    last, active = {}, False
    first, n_prof = (int(v) for v in cfg.run.profile) if cfg.run.profile else (0, 0)
    with contextlib.ExitStack() as profiling:  # the profiler of the steps `run.profile` names (GPU only)
        while trainer.step < cfg.train.steps:
            nxt = trainer.step + 1
            if torch.cuda.is_available() and nxt == first:
                path = os.path.join(cfg.run.out_dir, f"profile_rank{dist.get_rank()}.txt")
                profiling.enter_context(profiled(path, f"{cfg.run.name} rank {dist.get_rank()} steps "
                                                       f"{first}..{first + n_prof - 1}", n_prof))
                active = True
            m = trainer.train_step()
            # graph warm-up / capture and the profiler's overhead are not a measure of speed
            excluded = bool(m.pop("graph_warmup", False) or active)
            if active and nxt == first + n_prof - 1:
                profiling.close()  # the tables are written when the last profiled step ends
                active = False
            m.update(meter.record(m.pop("step_time"), exclude=excluded))
            if cfg.train.eval_every and trainer.step % cfg.train.eval_every == 0:
                m.update(trainer.evaluate())
            last = logger.log(m.pop("step"), m)
            sig = _agreed_signal(stop)
            due = cfg.checkpoint.every and trainer.step % cfg.checkpoint.every == 0
            if ckpt and (due or sig or trainer.step == cfg.train.steps):
                path = state.save(trainer, ckpt, cfg.checkpoint.keep)
                if rank0:
                    print(f"checkpoint {path}" + (f" (on {sig})" if sig else ""), flush=True)
            if sig:
                break
    logger.close()
    if rank0:
        print("throughput: " + json.dumps({k: v for k, v in meter.summary().items() if v is not None}), flush=True)
    result = dict(rank0=rank0, step=trainer.step, loss=last.get("loss"), stopped_by=stop.get("signal"))
    trainer.close()  # the CUDA graphs go first, else destroying the NCCL groups hangs
    destroy_distributed()
    return result


def _global_trainable(trainer) -> int:
    """Adapter parameters of the whole model: shards summed over TP and stages over PP, replicas once."""
    from megatron.core import parallel_state as ps

    n = torch.zeros(1, dtype=torch.float64)
    for layer in adapted_layers(trainer.model):
        for a in layer.adapters.values():
            for name, p in a.named_parameters():
                if a.is_sharded(name) or ps.get_tensor_model_parallel_rank() == 0:
                    n += p.numel()
    dist.all_reduce(n, group=ps.get_model_parallel_group())
    return int(n.item())



def _agreed_signal(stop: dict):
    """A signal seen by any rank stops all ranks after the same step."""
    flag = torch.tensor([1.0 if stop.get("signal") else 0.0])
    dist.all_reduce(flag)
    if flag.item() and not stop.get("signal"):
        stop["signal"] = "peer"
    return stop.get("signal") if flag.item() else None
