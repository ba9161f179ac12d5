"""Where the tokenize worker spends CPU beyond raw SentencePiece, part by part, in one process (no Ray).

    python bench/dp_worker_parts.py replay --input corpus.jsonl --tokenizer tok.model --workdir DIR
    python bench/dp_worker_parts.py interleave --input corpus.jsonl --tokenizer tok.model [--passes 1]

replay: data_pipeline.worker.TokenizeWorker run on every part of the plan `python -m
data_pipeline.tokenize --workers 1` makes (same parts, same order, shards written), with process CPU
(`time.process_time`: every thread, SentencePiece encodes in a thread of its own) around each part of
the work: extract (json.loads + normalisation + checks), the SentencePiece call, the numpy work
around it, the shard and unit-record writes; the rest (reading, cutting units) by difference.

interleave: the same documents, cut in ~1 MiB units, each unit encoded by (a) the bench's raw loop
(json.loads, batches of 256, Python int lists), (b) the worker's path (extract + encode_to_array),
(c) the worker's path with one SentencePiece call per document in the calling thread; the three
one right after the other on each unit, in rotating order, so the slow drift of a shared VM's speed
(+-15% between runs of identical work) falls on all three alike. Prints sums and per-unit ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import store, tokenize, worker  # noqa: E402
from data_pipeline.normalize import extract  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402


def _timed(acc: dict, name: str, fn):
    def f(*a, **k):
        c = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            acc[name] = acc.get(name, 0.0) + time.process_time() - c
    return f


def replay(a) -> dict:
    acc: dict[str, float] = {}
    worker.extract = _timed(acc, "extract", worker.extract)
    worker.store.write_shard = _timed(acc, "write_shard", store.write_shard)
    worker.store.write_json = _timed(acc, "write_json", store.write_json)
    worker.encode_to_array = _timed(acc, "encode_to_array", worker.encode_to_array)
    t = tokenize.parse_args(["--input", a.input, "--tokenizer", a.tokenizer, "--output-prefix",
                             os.path.join(a.workdir, "out"), "--workers", "1", "--max-doc-chars", str(10**9)])
    files = tokenize._plan(t)
    os.makedirs(store.work_dir(t.output_prefix), exist_ok=True)
    tasks, _ = tokenize._pending_tasks(t.output_prefix, files)
    cfg = {"tokenizer": os.path.abspath(a.tokenizer), "eod_token": None, "output_prefix": os.path.abspath(t.output_prefix),
           "field": "text", "txt_mode": "line", "unit_lines": t.unit_lines, "part_bytes": t.part_bytes,
           "max_doc_chars": t.max_doc_chars, "dedup": False}
    w = worker.TokenizeWorker(cfg)
    w.tok.encode_batch_arrays = _timed(acc, "sentencepiece_call", w.tok.encode_batch_arrays)
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for task in tasks:
        for rec in w.process(task):
            if "error" in rec:
                raise SystemExit(rec["error"])
    total, r1 = time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF)
    parts = {"extract": acc["extract"], "sentencepiece_call": acc["sentencepiece_call"],
             "numpy_around_the_call": acc["encode_to_array"] - acc["sentencepiece_call"],
             "write_shard": acc["write_shard"], "write_unit_json": acc["write_json"]}
    parts["reading_units_rest"] = total - sum(parts.values())
    return {"mode": "replay", "parts_of_plan": len(tasks), "cpu_s": round(total, 2),
            "utime_s": round(r1.ru_utime - r0.ru_utime, 2), "stime_s": round(r1.ru_stime - r0.ru_stime, 2),
            "cpu_s_by_part": {k: round(v, 2) for k, v in parts.items()}}


def interleave(a) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    tok = Tokenizer(a.tokenizer)
    dtype = np.dtype(np.uint16 if tok.vocab_size < 65500 else np.int32)
    units, cur, size = [], [], 0
    with open(a.input, "rb") as f:
        for line in f:
            cur.append(line.rstrip(b"\n"))
            size += len(line)
            if size >= 1 << 20:
                units.append(cur)
                cur, size = [], 0
    if cur:
        units.append(cur)

    def raw(u):  # data_pipeline.bench._peer_raw's loop
        texts = [json.loads(x)["text"] for x in u]
        return sum(sum(map(len, sp.encode(texts[i:i + 256], out_type=int, num_threads=1)))
                   for i in range(0, len(texts), 256))

    def ours(u):
        texts = [extract(x, "jsonl", "text", 10**9).text for x in u]
        flat, lens = worker.encode_to_array(tok, texts, tok.eod_id, dtype)
        return len(flat) - len(lens)

    def ours_per_doc(u):
        texts = [extract(x, "jsonl", "text", 10**9).text for x in u]
        return int(sum(len(sp.encode(t, return_type="numpy")) for t in texts))

    variants = [raw, ours, ours_per_doc]
    cpu = {f.__name__: [0.0] * len(units) for f in variants}
    tokens = {}
    for p in range(a.passes):
        for k, u in enumerate(units):
            r = (k + p) % len(variants)
            for f in variants[r:] + variants[:r]:
                c = time.process_time()
                tokens[f.__name__] = tokens.get(f.__name__, 0) + f(u)
                cpu[f.__name__][k] += time.process_time() - c
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"token counts differ: {tokens}")
    out = {"mode": "interleave", "units": len(units), "passes": a.passes, "tokens_per_pass": tokens["raw"] // a.passes,
           "cpu_s": {k: round(sum(v), 2) for k, v in cpu.items()}}
    for k in ("ours", "ours_per_doc"):
        ratios = [x / y for x, y in zip(cpu[k], cpu["raw"]) if y > 0.05]
        out[f"{k}_vs_raw"] = {"of_sums": round(sum(cpu[k]) / sum(cpu["raw"]), 3),
                              "per_unit_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("replay", "interleave"))
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--workdir", default=None, help="replay: shards are written under it")
    p.add_argument("--passes", type=int, default=1)
    a = p.parse_args()
    if a.mode == "replay" and not a.workdir:
        p.error("replay needs --workdir")
    out = replay(a) if a.mode == "replay" else interleave(a)
    out["input_mb"] = round(os.path.getsize(a.input) / 1e6, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
