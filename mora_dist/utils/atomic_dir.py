"""Write an output folder atomically: build it beside the target, then rename it into place.

Exports written in place over an older export leave the old one's files behind (a pipeline-parallel
export's `model-0000k-of-0000n.safetensors` and index next to a new single-file export, and the HF
reader then follows the stale index), and a crash halfway leaves a mix. Here every rank writes
into `<out>.tmp.<id>/` (same parent, so the rename stays on one filesystem); rank 0 renames it to
`<out>` only after every rank finished. An existing non-empty `<out>` is refused unless
`overwrite=True`; then it is first renamed to `<out>.old.<id>` and deleted after the new one is
in place (a crash between those two renames leaves the previous export at `<out>.old.<id>`).
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager


def check_output(out_dir: str, overwrite: bool, what: str = "output") -> None:
    """Raise FileExistsError (one line, naming the folder) when writing `out_dir` would replace something."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{what} {out_dir} exists and is not a folder; choose another path")
    if not overwrite and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{what} {out_dir} already exists and is not empty; pass --overwrite (overwrite=True) "
                              "to replace it, or choose another path")


def publish(tmp: str, out_dir: str) -> None:
    """Rename the finished `tmp` to `out_dir`, replacing what was there (one process only)."""
    old = None
    if os.path.lexists(out_dir):
        old = f"{out_dir}.old.{uuid.uuid4().hex[:12]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output(out_dir: str, overwrite: bool = False, what: str = "output"):
    """Collective over the default process group. Yields the staging folder (the same on every rank)."""
    import torch.distributed as dist

    out_dir = os.path.normpath(os.fspath(out_dir))
    rank0 = dist.get_rank() == 0
    box = [None]
    if rank0:
        try:
            check_output(out_dir, overwrite, what)
            tmp = f"{out_dir}.tmp.{uuid.uuid4().hex[:12]}"
            os.makedirs(tmp)
            box[0] = ("ok", tmp)
        except OSError as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    try:
        yield value
    except BaseException:
        if rank0:  # only this output's own staging folder
            shutil.rmtree(value, ignore_errors=True)
        raise
    dist.barrier()
    if rank0:
        publish(value, out_dir)
    dist.barrier()
