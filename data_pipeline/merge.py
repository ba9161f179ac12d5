"""Deterministic final merge: unit shards in unit order -> <prefix>.bin/.idx, rejects -> one file.

Shard `.bin` files are appended whole (a stream copy) and their document lengths concatenated;
the `.idx` is written once at the end by data_pipeline.indexed (no megatron/torch import in the
driver). Exact dedup happens here, not in workers, because "first occurrence wins" needs the
global unit order; a worker only records a 64-bit blake2b hash per kept document.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from data_pipeline import indexed, store


def merge(prefix: str, units: list[dict], dtype, dedup: bool) -> None:
    """Fill units[i]['duplicates'/'docs_final'/'tokens_final'] and publish the merged dataset."""
    work = store.work_dir(prefix)
    dtype = np.dtype(dtype)
    tmp = prefix + ".merge-tmp"  # only the driver merges (under the prefix lock); a kill leaves it to overwrite
    seen: set[int] = set()
    lengths = []
    try:
        with open(tmp + ".bin", "wb") as out:
            for u in units:
                u.update(duplicates=0, docs_final=u["docs_written"], tokens_final=u["tokens"])
                if u["docs_written"] == 0:
                    continue
                shard = os.path.join(work, u["unit"])
                shard_dtype, lens = indexed.read_index(shard + ".idx")
                if shard_dtype != dtype or len(lens) != u["docs_written"]:
                    raise ValueError(f"{shard}.idx: {len(lens)} documents of {shard_dtype}, the unit record says "
                                     f"{u['docs_written']} of {dtype}; delete {work} and re-run")
                keep = None
                if dedup:
                    hashes = np.fromfile(shard + ".hashes", dtype=np.uint64).tolist()
                    keep = np.zeros(len(hashes), dtype=bool)
                    for i, h in enumerate(hashes):
                        if h not in seen:
                            seen.add(h)
                            keep[i] = True
                if keep is None or keep.all():
                    with open(shard + ".bin", "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
                    lengths.append(lens)
                    continue
                tokens = np.fromfile(shard + ".bin", dtype=dtype)
                out.write(tokens[np.repeat(keep, lens)].tobytes())
                lengths.append(lens[keep])
                u.update(duplicates=int((~keep).sum()), docs_final=int(keep.sum()),
                         tokens_final=int(lens[keep].sum()))
        all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
        with open(tmp + ".idx", "wb") as f:
            f.write(indexed.idx_bytes(all_lengths, dtype))
        with open(tmp + ".rejects", "wb") as out:
            for u in units:
                if sum(u["rejected"].values()):
                    with open(os.path.join(work, u["unit"] + ".rejects.jsonl"), "rb") as f:
                        shutil.copyfileobj(f, out)
    except OSError as e:
        name = e.filename if isinstance(e.filename, str) and e.filename else tmp
        if name.startswith(tmp):  # a write failed: name the output, not the shard being read
            raise store.OutputError(name, e) from e
        raise
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    os.replace(tmp + ".rejects", prefix + ".rejects.jsonl")
