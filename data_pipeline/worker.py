"""Ray Data actor UDF: read one part, cut it into fixed units of `unit_lines` records, and
publish each unit as its own shard + rejects + (dedup) hashes + unit record.

A unit's bytes depend only on its input lines and the run's settings, never on which worker or
which attempt produced it; that is what makes worker count and kill/restart invisible in the output.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import Counter

import numpy as np

from data_pipeline import store
from data_pipeline.normalize import extract
from data_pipeline.sources import read_part


def _raw_preview(raw, limit=1000) -> str:
    if raw is None:
        return ""
    if isinstance(raw, bytes):
        raw = raw[:limit].decode("utf-8", errors="backslashreplace")
    return str(raw)[:limit]


class UnitProcessor:
    """Holds the tokenizer; processes tasks {file_i, part_i, info, part, done} into unit records."""

    def __init__(self, cfg: dict):
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: one core per worker
        from data_pipeline.tokenizer import Tokenizer

        self.cfg = cfg
        self.tok = Tokenizer(cfg["tokenizer"], cfg.get("eod_token"))
        self.dtype = store.token_dtype(self.tok.vocab_size)
        self.work = store.work_dir(cfg["output_prefix"])
        self.ready_t = time.time()  # bench: steady rate from the first actor ready (conservative)

    def __call__(self, batch):
        for task in batch["task"]:
            task = json.loads(task)
            try:
                yield from self.process_part(task)
            except Exception as e:  # name the input: Ray's traceback alone does not
                raise RuntimeError(f"{task['info']['path']} (part {task['part_i']}): {type(e).__name__}: {e}") from e

    def process_part(self, task: dict):
        cfg, info, fi, pi = self.cfg, task["info"], task["file_i"], task["part_i"]
        done = set(task["done"])
        records = read_part(info, task["part"], cfg["field"], cfg["txt_mode"])
        n_chunks = 0
        for ci in itertools.count():
            t0, c0 = time.perf_counter(), time.process_time()  # includes reading: bench compares to raw encode
            chunk = list(itertools.islice(records, cfg["unit_lines"]))
            if not chunk:
                break
            n_chunks = ci + 1
            name = store.unit_name(fi, pi, ci)
            if name in done:
                continue
            rec = self.process_unit(name, info, chunk)
            rec.update(file=fi, part=pi, chunk=ci)
            store.write_json(os.path.join(self.work, name + ".json"), rec)
            yield {"unit": [name], "docs": [rec["docs_written"]], "tokens": [rec["tokens"]],
                   "lines": [rec["lines"]], "rejected": [sum(rec["rejected"].values())],
                   "busy_s": [time.perf_counter() - t0],
                   "cpu_s": [time.process_time() - c0], "ready_t": [self.ready_t], "done_t": [time.time()]}
        store.write_json(os.path.join(self.work, store.part_name(fi, pi) + ".done.json"), {"chunks": n_chunks})

    def process_unit(self, name: str, info: dict, chunk: list) -> dict:
        cfg, path, fmt = self.cfg, info["path"], info["format"]
        texts, rejects, reasons, has_field, keys = [], [], Counter(), 0, None
        for line, raw in chunk:
            ex = extract(raw, fmt, cfg["field"], cfg["max_doc_chars"])
            has_field += ex.has_field
            if ex.reason is None:
                texts.append(ex.text)
                continue
            reasons[ex.reason] += 1
            if ex.keys is not None and keys is None:
                keys = ex.keys
            rejects.append(json.dumps({"file": path, "line": line, "reason": ex.reason, "detail": ex.detail,
                                       "raw": _raw_preview(raw)}, ensure_ascii=True))
        docs = self.tok.encode_batch(texts) if texts else []
        eod = self.tok.eod_id
        for d in docs:
            d.append(eod)
        prefix = os.path.join(self.work, name)
        if docs:
            store.write_shard(prefix, docs, self.dtype)
        if rejects:  # absent file == no rejects (saves a rename per clean unit)
            store.write_bytes(prefix + ".rejects.jsonl", "".join(r + "\n" for r in rejects).encode())
        if cfg["dedup"]:
            hashes = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts]
            store.write_bytes(prefix + ".hashes", np.asarray(hashes, dtype=np.uint64).tobytes())
        return {"unit": name, "first_line": chunk[0][0], "lines": len(chunk), "docs_written": len(docs),
                "tokens": int(sum(map(len, docs))), "rejected": dict(sorted(reasons.items())),
                "has_field": has_field, "keys_seen": keys}
