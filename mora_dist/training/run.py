"""A whole training run: set-up, resume, the step loop with eval/checkpoints/metrics, shutdown."""
from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.distributed as dist

from mora_dist.training.config import Config


def run(cfg: Config, stop: dict | None = None) -> dict:
    from mora_dist.checkpoint import state
    from mora_dist.parallel.state import destroy_distributed, init_distributed
    from mora_dist.training.loop import Trainer

    stop = stop if stop is not None else {}
    init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.model.seed)
    rank0 = dist.get_rank() == 0
    trainer = Trainer(cfg)
    ckpt = cfg.checkpoint.dir
    if ckpt and cfg.checkpoint.resume and state.latest(ckpt):
        path = state.latest(ckpt)
        state.load(trainer, path)
        if rank0:
            print(f"resumed from {path} at step {trainer.step}", flush=True)
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    log = _truncated_log(os.path.join(cfg.run.out_dir, "metrics.jsonl"), trainer.step) if rank0 else None
    if rank0:
        print(str(trainer.report), flush=True)
        with open(os.path.join(cfg.run.out_dir, "run.json"), "w") as f:
            json.dump(dict(config=cfg.to_dict(), num_gpus=dist.get_world_size()), f, indent=1)
    last = {}
    tokens = cfg.train.global_batch * cfg.data.seq_length
    while trainer.step < cfg.train.steps:
        m = trainer.train_step()
        m["tokens_per_s"] = tokens / m["step_time"]
        if cfg.train.eval_every and trainer.step % cfg.train.eval_every == 0:
            m.update(trainer.evaluate())
        last = m
        if rank0:
            log.write(json.dumps(m) + "\n")
            log.flush()
            if trainer.step % cfg.train.log_every == 0 or trainer.step == cfg.train.steps:
                extra = "".join(f" {k.split('/')[1]} {v:.2f}" for k, v in m.items() if k.endswith("_ppl"))
                print(f"step {m['step']:5d} loss {m['loss']:.4f} lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
                      f"{m['tokens_per_s']:.0f} tok/s{extra}", flush=True)
        sig = _agreed_signal(stop)
        due = cfg.checkpoint.every and trainer.step % cfg.checkpoint.every == 0
        if ckpt and (due or sig or trainer.step == cfg.train.steps):
            path = state.save(trainer, ckpt, cfg.checkpoint.keep)
            if rank0:
                print(f"checkpoint {path}" + (f" (on {sig})" if sig else ""), flush=True)
        if sig:
            break
    result = dict(rank0=rank0, step=trainer.step, loss=last.get("loss"), stopped_by=stop.get("signal"))
    if log:
        log.close()
    destroy_distributed()
    return result


def _agreed_signal(stop: dict):
    """A signal seen by any rank stops all ranks after the same step."""
    flag = torch.tensor([1.0 if stop.get("signal") else 0.0])
    dist.all_reduce(flag)
    if flag.item() and not stop.get("signal"):
        stop["signal"] = "peer"
    return stop.get("signal") if flag.item() else None


def _truncated_log(path: str, step: int):
    """Open the JSONL log for appending, dropping records of steps after `step` (a resumed run
    redoes them)."""
    if os.path.exists(path):
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return open(path, "a")
