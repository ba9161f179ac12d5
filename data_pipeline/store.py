"""Output layout and atomic writes: everything a restart trusts is published by rename.

<prefix>.bin/.idx            merged dataset        <prefix>.manifest.json  plan + counts
<prefix>.rejects.jsonl       every rejected line   <prefix>.work/          per-unit shards (deleted at the end)
A unit counts as done only once its `<unit>.json` exists, and that file is renamed into place
after the unit's shard, rejects and hashes, so a kill can never leave a half-recorded unit.
"""
from __future__ import annotations

import itertools
import json
import os
import uuid

import numpy as np


def unit_name(file_i: int, part_i: int, chunk_i: int) -> str:
    return f"f{file_i:06d}-p{part_i:05d}-c{chunk_i:06d}"


def part_name(file_i: int, part_i: int) -> str:
    return f"f{file_i:06d}-p{part_i:05d}"


def work_dir(prefix: str) -> str:
    return prefix + ".work"


def _tmp(path: str) -> str:
    """A temp name no other writer uses (pids repeat across nodes of a cluster)."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def write_json(path: str, obj) -> None:
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_bytes(path: str, data: bytes) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def token_dtype(vocab_size: int):
    """Smallest dtype megatron reads that holds every id (its own rule)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def write_shard(prefix: str, docs: list[list[int]], dtype) -> None:
    """Write docs as a megatron indexed dataset at `prefix`.bin/.idx via tmp files + rename."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = _tmp(prefix)
    lengths = [len(d) for d in docs]
    # one list->array conversion for the whole unit; per-document Python->numpy copies cost ~15%
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=sum(lengths))
    ends = np.cumsum(lengths).tolist()
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    for n, e in zip(lengths, ends):
        builder.add_document(flat[e - n:e], [n])
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
