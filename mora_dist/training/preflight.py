"""Everything a run must settle before it trains, decided once on rank 0 and shared with all ranks.

1. lock `run.out_dir` and `checkpoint.dir` (run_lock.py): a second run on them stops here;
2. remove temporary folders of crashed saves (safe only now: the lock proves no live writer);
3. choose the checkpoint to resume from (integrity.py: `latest`, or the newest intact one with a
   warning), and refuse `checkpoint.resume=false` over existing checkpoints (its saves and rotation
   would replace them);
4. compare the checkpoint's config with this one (resume_check.py), unless
   `checkpoint.allow_config_change=true`;
5. check the token data against the model vocabulary (token_check.py).
Rank 0 alone touches the files, so the ranks cannot disagree about what they saw; its verdict is
broadcast and every rank raises the same one-line `RunError`, which launch/train.py prints.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

TEMP_RE = re.compile(r"^(step_\d+\.(tmp|old)(\..+)?|latest\.tmp(\..+)?)$")


class RunError(RuntimeError):
    pass


@dataclass
class Plan:
    resume: str | None = None  # checkpoint folder to load, None: start at step 0
    notes: list = field(default_factory=list)  # warnings for the console
    lock: object = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def remove_stale_temporaries(ckpt_dir: str) -> list[str]:
    """Delete leftovers of interrupted saves. Call only while holding the directory's lock."""
    gone = []
    if os.path.isdir(ckpt_dir):
        for name in sorted(os.listdir(ckpt_dir)):
            if TEMP_RE.match(name):
                path = os.path.join(ckpt_dir, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
                gone.append(name)
    return gone


def inspect(cfg) -> Plan:
    """Steps 3-5 (file checks only, no process group): the Plan, or RunError."""
    from mora_dist.checkpoint.integrity import CheckpointError, read_common, select_resume, step_dirs
    from mora_dist.training.resume_check import config_differences
    from mora_dist.training.token_check import TokenError, check_token_ids

    plan, ck = Plan(), cfg.checkpoint
    if ck.dir and not ck.resume:
        steps = step_dirs(ck.dir)
        if steps:
            raise RunError(f"checkpoint.resume=false but checkpoint.dir {ck.dir} already holds checkpoints "
                           f"({', '.join(os.path.basename(p) for _, p in steps[-3:])}); this run would replace "
                           "them: choose another checkpoint.dir or move them away")
    elif ck.dir:
        try:
            plan.resume, warnings = select_resume(ck.dir)
        except CheckpointError as e:
            raise RunError(str(e)) from None
        plan.notes += [f"warning: {w}" for w in warnings]
    if plan.resume:
        saved = read_common(plan.resume).get("config")
        diffs = config_differences(saved or {}, cfg) if saved is not None else ["no stored config"]
        if diffs and not ck.allow_config_change:
            raise RunError(f"checkpoint {plan.resume} was trained with another configuration ({'; '.join(diffs)}); "
                           "restore those values, use another checkpoint.dir, or set "
                           "checkpoint.allow_config_change=true to resume anyway")
        if diffs:
            plan.notes.append(f"warning: resuming {plan.resume} with a changed configuration "
                              f"(checkpoint.allow_config_change=true): {'; '.join(diffs)}")
    try:
        plan.notes += check_token_ids(cfg)
    except TokenError as e:
        raise RunError(str(e)) from None
    return plan


def _prepare_rank0(cfg) -> Plan:
    from mora_dist.training.run_lock import LockError, RunLock

    folders = [("run.out_dir", cfg.run.out_dir)] + ([("checkpoint.dir", cfg.checkpoint.dir)]
                                                     if cfg.checkpoint.dir else [])
    try:
        lock = RunLock(folders)
    except LockError as e:
        raise RunError(str(e)) from None
    try:
        plan = inspect(cfg)
    except BaseException:
        lock.release()
        raise
    plan.lock = lock
    if cfg.checkpoint.dir:
        gone = remove_stale_temporaries(cfg.checkpoint.dir)
        if gone:
            plan.notes.append(f"removed leftovers of an interrupted save in {cfg.checkpoint.dir}: {', '.join(gone)}")
    return plan


def prepare(cfg) -> Plan:
    """Collective (after init_distributed). Rank 0's Plan holds the locks; release() it when done."""
    import torch.distributed as dist

    box = [None]
    plan = None
    if dist.get_rank() == 0:
        try:
            plan = _prepare_rank0(cfg)
            box[0] = ("ok", plan.resume, plan.notes)
        except RunError as e:
            box[0] = ("error", str(e), [])
        except Exception as e:  # noqa: BLE001 - tell the other ranks instead of leaving them waiting
            box[0] = ("error", f"preflight failed on rank 0: {type(e).__name__}: {e}", [])
    dist.broadcast_object_list(box, src=0)
    status, value, notes = box[0]
    if status == "error":
        raise RunError(value)
    return plan if plan is not None else Plan(resume=value, notes=notes)
