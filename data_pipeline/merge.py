"""Deterministic final merge: unit shards in unit order -> <prefix>.bin/.idx, rejects -> one file.

Shards are appended to megatron's IndexedDatasetBuilder (index lists + raw .bin copy, see
`_append_whole`). Exact dedup happens here, not in workers, because "first occurrence wins" needs
the global unit order; a worker only records a 64-bit blake2b hash per kept document.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from data_pipeline import store


def _append_whole(builder, ds, shard: str) -> None:
    """What IndexedDatasetBuilder.add_index does, minus its per-call gc.collect(): with torch loaded
    that costs ~0.2 s, i.e. minutes over the thousands of shards of a billion-token run."""
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(ds.sequence_lengths.tolist())
    builder.document_indices.extend((offset + ds.document_indices[1:]).tolist())
    with open(shard + ".bin", "rb") as f:
        shutil.copyfileobj(f, builder.data_file, 16 << 20)


def merge(prefix: str, units: list[dict], dtype, dedup: bool) -> None:
    """Fill units[i]['duplicates'/'docs_final'/'tokens_final'] and publish the merged dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    work = store.work_dir(prefix)
    tmp = prefix + ".merge-tmp"  # only the driver merges; a fixed name is overwritten after a kill
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    seen: set[int] = set()
    for u in units:
        u.update(duplicates=0, docs_final=u["docs_written"], tokens_final=u["tokens"])
        if u["docs_written"] == 0:
            continue
        shard = os.path.join(work, u["unit"])
        keep = None
        if dedup:
            hashes = np.fromfile(shard + ".hashes", dtype=np.uint64).tolist()
            keep = []
            for i, h in enumerate(hashes):
                if h not in seen:
                    seen.add(h)
                    keep.append(i)
        ds = IndexedDataset(shard)
        if keep is None or len(keep) == u["docs_written"]:
            _append_whole(builder, ds, shard)
            del ds
            continue
        for i in keep:
            builder.add_document(ds[i], [int(ds.sequence_lengths[i])])
        u.update(duplicates=u["docs_written"] - len(keep), docs_final=len(keep),
                 tokens_final=int(ds.sequence_lengths[keep].sum()) if keep else 0)
        del ds
    builder.finalize(tmp + ".idx")
    with open(tmp + ".rejects", "wb") as out:
        for u in units:
            if sum(u["rejected"].values()):
                with open(os.path.join(work, u["unit"] + ".rejects.jsonl"), "rb") as f:
                    out.write(f.read())
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    os.replace(tmp + ".rejects", prefix + ".rejects.jsonl")
