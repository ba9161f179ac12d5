"""The tokenize worker (a Ray actor): read one part, cut it into units, publish each unit.

A unit is at most `unit_lines` records and at most `part_bytes` of input; it becomes its own
shard + rejects + (dedup) hashes + unit record. A unit's bytes depend only on its input records
and the run's settings, never on which worker or which attempt produced it; that is what makes
worker count and kill/restart invisible in the output.

Memory is bounded by the unit: its records, its texts, and its tokens as one numpy array (never
Python int lists longer than one encode batch of ~1 MB of text). Nothing here imports torch or
megatron-core: shards are written by data_pipeline.indexed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import Counter

import numpy as np

from data_pipeline import indexed, store
from data_pipeline.normalize import extract
from data_pipeline.sources import PartReader

# texts per encode call: bounds the per-call ids (lists or arrays) to ~1 MB of text. A call never spans
# units, and a unit is at most --part-bytes of input (1 MiB on corpora up to 512 MiB), so above that this
# limit only saves the short second call of a unit a little over it (tokenize --encode-batch-chars).
ENCODE_BATCH_CHARS = 1 << 20


def _raw_preview(raw, limit=1000) -> str:
    if raw is None:
        return ""
    if isinstance(raw, bytes):
        raw = raw[:limit].decode("utf-8", errors="backslashreplace")
    return str(raw)[:limit]


def encode_to_array(tok, texts: list[str], eod: int, dtype,
                    batch_chars: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(flat tokens with EOD after every document, int64 lengths incl. EOD) as numpy arrays.
    Uses the tokenizer's numpy output where it has one (no Python int per token). One encode call
    takes texts up to `batch_chars` characters (default ENCODE_BATCH_CHARS; a longer text alone)."""
    arrays = getattr(tok, "encode_batch_arrays", None)
    limit = ENCODE_BATCH_CHARS if batch_chars is None else batch_chars
    flats, lens, i = [], [], 0
    while i < len(texts):
        j, chars = i, 0
        while j < len(texts) and (j == i or chars + len(texts[j]) <= limit):
            chars += len(texts[j])
            j += 1
        ids = (arrays or tok.encode_batch)(texts[i:j])
        n = np.fromiter(map(len, ids), dtype=np.int64, count=j - i)
        if arrays is not None:
            flat = np.concatenate(ids).astype(dtype, copy=False)
        else:
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(n.sum()))
        del ids
        flats.append(np.insert(flat, np.cumsum(n), eod))  # EOD after each document
        lens.append(n + 1)
        i = j
    if not flats:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    return np.concatenate(flats), np.concatenate(lens)


def _units(records, unit_lines: int, unit_bytes: int):
    """Cut a record stream into units: <= unit_lines records and about <= unit_bytes of input each."""
    chunk, size = [], 0
    for rec in records:
        chunk.append(rec)
        raw = rec[1]
        size += len(raw) + 1 if raw is not None else 1
        if len(chunk) >= unit_lines or size >= unit_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class TokenizeWorker:
    """Holds the tokenizer; `process(task)` yields one record per unit (a Ray streaming generator)."""

    def __init__(self, cfg: dict):
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: one core per worker
        from data_pipeline.tokenizer import Tokenizer

        self.cfg = cfg
        self.tok = Tokenizer(cfg["tokenizer"], cfg.get("eod_token"))
        self.dtype = indexed.token_dtype(self.tok.vocab_size)
        self.work = store.work_dir(cfg["output_prefix"])
        self.ready_t = time.time()  # bench: steady rate from the first actor ready (conservative)

    def ready(self) -> float:
        return self.ready_t

    def process(self, task: dict):
        """Yield unit records; a failure is yielded as {"error": one line naming the file}, not raised,
        so the driver can print it without a Ray traceback."""
        try:
            yield from self._process_part(task)
        except store.OutputError as e:
            yield {"error": str(e)}
        except Exception as e:  # name the input: the driver prints this one line
            yield {"error": f"{task['info']['path']} (part {task['part_i']}): {type(e).__name__}: {e}"}

    def _process_part(self, task: dict):
        cfg, info, fi, pi = self.cfg, task["info"], task["file_i"], task["part_i"]
        done = set(task["done"])
        reader = PartReader(info, task["part"], cfg["field"], cfg["txt_mode"])
        n_chunks, t0, c0, pos0 = 0, time.perf_counter(), time.process_time(), 0
        for ci, chunk in enumerate(_units(reader, cfg["unit_lines"], cfg["part_bytes"])):
            n_chunks = ci + 1
            name = store.unit_name(fi, pi, ci)
            if name in done:
                continue
            rec = self.process_unit(name, info, chunk)
            rec.update(file=fi, part=pi, chunk=ci)
            store.write_json(os.path.join(self.work, name + ".json"), rec)
            t1, c1 = time.perf_counter(), time.process_time()  # includes reading: bench compares to raw
            yield {"unit": name, "docs": rec["docs_written"], "tokens": rec["tokens"], "lines": rec["lines"],
                   "rejected": sum(rec["rejected"].values()), "pos": reader.pos - pos0, "busy_s": t1 - t0,
                   "cpu_s": c1 - c0, "ready_t": self.ready_t, "done_t": time.time(), "worker": os.getpid()}
            t0, c0, pos0 = t1, c1, reader.pos
        store.write_json(os.path.join(self.work, store.part_name(fi, pi) + ".done.json"), {"chunks": n_chunks})
        yield {"part_done": True, "pos": task["part"]["bytes"] - pos0, "busy_s": time.perf_counter() - t0,
               "cpu_s": time.process_time() - c0}

    def process_unit(self, name: str, info: dict, chunk: list) -> dict:
        cfg, path, fmt = self.cfg, info["path"], info["format"]
        texts, rejects, reasons, has_field, keys = [], [], Counter(), 0, None
        first_line, n_lines = chunk[0][0], len(chunk)
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
        del chunk[:]  # the raw records are no longer needed: free them before encoding
        tokens, lengths = encode_to_array(self.tok, texts, self.tok.eod_id, self.dtype, cfg.get("encode_batch_chars"))
        prefix = os.path.join(self.work, name)
        if len(lengths):
            store.write_shard(prefix, tokens, lengths)
        if rejects:  # absent file == no rejects (saves a rename per clean unit)
            store.write_bytes(prefix + ".rejects.jsonl", "".join(r + "\n" for r in rejects).encode())
        if cfg["dedup"]:
            hashes = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts]
            store.write_bytes(prefix + ".hashes", np.asarray(hashes, dtype=np.uint64).tobytes())
        return {"unit": name, "first_line": first_line, "lines": n_lines, "docs_written": len(lengths),
                "tokens": int(len(tokens)), "rejected": dict(sorted(reasons.items())),
                "has_field": has_field, "keys_seen": keys}
