"""Output layout and atomic writes: everything a restart trusts is published by rename.

<prefix>.bin/.idx            merged dataset        <prefix>.manifest.json  plan + counts
<prefix>.rejects.jsonl       every rejected line   <prefix>.work/          per-unit shards (deleted at the end)
<prefix>.lock                flock of the running run (guard.output_lock; the file stays, the lock does not)
A unit counts as done only once its `<unit>.json` exists, and that file is renamed into place
after the unit's shard, rejects and hashes, so a kill can never leave a half-recorded unit.
"""
from __future__ import annotations

import json
import os
import uuid

import numpy as np

from data_pipeline import indexed


def unit_name(file_i: int, part_i: int, chunk_i: int) -> str:
    return f"f{file_i:06d}-p{part_i:05d}-c{chunk_i:06d}"


def part_name(file_i: int, part_i: int) -> str:
    return f"f{file_i:06d}-p{part_i:05d}"


def work_dir(prefix: str) -> str:
    return prefix + ".work"


def _tmp(path: str) -> str:
    """A temp name no other writer uses (pids repeat across nodes of a cluster)."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def _publish(path: str, data: bytes) -> None:
    """Write to a temp name, then rename; a failed write (full disk) leaves no temp file behind."""
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    _publish(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_bytes(path: str, data: bytes) -> None:
    _publish(path, data)


def write_shard(prefix: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Write documents (flat tokens + per-document lengths) as `prefix`.bin/.idx via tmp files + rename."""
    _publish(prefix + ".bin", np.ascontiguousarray(tokens).tobytes())
    _publish(prefix + ".idx", indexed.idx_bytes(lengths, tokens.dtype))


class OutputError(Exception):
    """An output-side write failed (read-only or full disk, ...): the message names the output path."""

    def __init__(self, path: str, err: OSError):
        super().__init__(f"{path}: cannot write output ({err.strerror or err}); check free space and permissions "
                         "of the output folder or choose another --output-prefix")
        self.path = path


def output_errors(fn):
    """Decorator: OSError from a writer becomes OutputError naming the file being written."""
    def wrapped(path, *a, **k):
        try:
            return fn(path, *a, **k)
        except OSError as e:
            name = e.filename if isinstance(e.filename, str) and e.filename else path
            raise OutputError(name.split(".tmp-")[0], e) from e
    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


write_json = output_errors(write_json)
write_bytes = output_errors(write_bytes)
write_shard = output_errors(write_shard)
