"""Which checkpoint a run may resume from, decided from the files alone (no process group needed).

A step folder is *intact* when every file megatron's `torch_dist` format needs is there and long
enough: `metadata.json` (parses), `common.pt` (loads), `.metadata` (loads) and every shard file it
lists at least as long as the furthest byte it indexes. That catches a deleted folder, a truncated
shard, a missing or torn common file, without reading the shards themselves.

`select_resume` prefers the folder `latest` names; when that one is missing or damaged it falls
back to the newest intact `step_N` with a warning, so a damaged `latest` never silently restarts a
run at step 0 (whose saves and rotation would then replace the intact older checkpoints). When
checkpoints exist but none is intact it raises a one-line `CheckpointError` naming the folder.

Checkpoints are pickles (`common.pt`, `.metadata`): load only checkpoints you trust.
"""
from __future__ import annotations

import json
import os
import re

STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every published `step_N` folder, oldest first (temporaries are not listed)."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            out.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(out)


def problem(path: str) -> str | None:
    """Why the checkpoint folder `path` cannot be loaded, or None when it is intact."""
    import pickle

    import torch

    if not os.path.isdir(path):
        return "folder is missing"
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        with open(os.path.join(path, "metadata.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"metadata.json is unreadable ({type(e).__name__})"
    try:
        common = torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=False)
        if "common" not in common or "step" not in common["common"]:
            return "common.pt holds no training state"
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        return f"common.pt is unreadable ({type(e).__name__})"
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            meta = pickle.load(f)
        ends: dict[str, int] = {}
        for info in meta.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # noqa: BLE001
        return f".metadata is unreadable ({type(e).__name__})"
    for rel, end in sorted(ends.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"shard {rel} is missing"
        size = os.path.getsize(full)
        if size < end:
            return f"shard {rel} is truncated ({size} of {end} bytes)"
    return None


def read_common(path: str) -> dict:
    """The checkpoint's common state (step, restarts, config, ...)."""
    import torch

    return torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=False)["common"]


def _named_by_latest(ckpt_dir: str) -> tuple[str | None, str | None]:
    """(folder `latest` names, problem with the latest file itself)."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(path):
        return None, "no latest file"
    try:
        with open(path) as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"latest is unreadable ({type(e).__name__})"
    if not STEP_RE.match(name):
        return None, f"latest names {name[:40]!r}, not a step_N folder"
    return os.path.join(ckpt_dir, name), None


def select_resume(ckpt_dir: str) -> tuple[str | None, list[str]]:
    """(checkpoint to resume from or None for a fresh start, warnings to print).

    Raises CheckpointError when checkpoints exist but none is intact."""
    named, latest_problem = _named_by_latest(ckpt_dir)
    steps = step_dirs(ckpt_dir)
    if named is None and not steps:
        if latest_problem != "no latest file":
            raise CheckpointError(f"checkpoint.dir {ckpt_dir}: {latest_problem} and there are no step_N folders; "
                                  "remove the latest file to start from step 0")
        return None, []
    warnings, damaged = [], []
    if named is not None:
        why = problem(named)
        if why is None:
            return named, []
        damaged.append(f"{os.path.basename(named)}: {why}")
        warnings.append(f"checkpoint {named} (named by {ckpt_dir}/latest) is unusable: {why}")
    else:
        warnings.append(f"checkpoint.dir {ckpt_dir}: {latest_problem}")
    for _, path in reversed(steps):
        if path == named:
            continue
        why = problem(path)
        if why is None:
            warnings.append(f"resuming from the newest intact checkpoint {path} instead")
            return path, warnings
        damaged.append(f"{os.path.basename(path)}: {why}")
        warnings.append(f"checkpoint {path} is unusable too: {why}")
    raise CheckpointError(f"checkpoint.dir {ckpt_dir} holds no intact checkpoint ({'; '.join(damaged)}); "
                          "repair them, move them and latest away to start from step 0, or point checkpoint.dir elsewhere")
