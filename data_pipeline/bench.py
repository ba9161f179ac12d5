"""Benchmark: raw single-process SentencePiece encode vs the pipeline's per-worker rate at 1 and 2 workers.

    python -m data_pipeline.bench [--input X.jsonl ... --tokenizer tok.model] [--copies 20] [--cores 64 512]

Without --input it builds a corpus from real offline text (stdlib docstrings) and trains a BPE
tokenizer on it. Per-worker pipeline rate is reported two ways: "in-worker" (tokens / summed unit
busy time: read + parse + normalise + encode + write), "steady" (tokens / wall time from the first
actor ready to the last unit / workers: includes scheduling, driver and Ray overhead) and
"end-to-end" (tokens / Ray Data wall time / workers, also including actor start-up). Per CPU-second
figures (worker process CPU time vs the raw loop's) show the pipeline's own overhead even when
other jobs share the machine.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

from data_pipeline import tokenize as dp_tokenize
from data_pipeline.report import human
from data_pipeline.train_tokenizer import iter_documents, train

_MODULES = ("json os re collections argparse email.message http.client logging pathlib subprocess asyncio.tasks "
            "statistics textwrap decimal fractions csv difflib heapq bisect functools itertools inspect "
            "unittest.case zipfile tarfile typing dataclasses enum threading socket ssl sqlite3 urllib.request "
            "xml.etree.ElementTree datetime calendar random string struct codecs io shutil tempfile").split()


def stdlib_docstrings() -> list[str]:
    out = []
    for m in _MODULES:
        try:
            mod = importlib.import_module(m)
        except ImportError:
            continue
        for name in sorted(dir(mod)):
            obj = getattr(mod, name, None)
            members = [getattr(obj, n, None) for n in sorted(vars(obj))] if isinstance(obj, type) else []
            for o in [obj] + members:
                d = getattr(o, "__doc__", None)
                if isinstance(d, str) and len(d) > 60:
                    out.append(d)
    return list(dict.fromkeys(out))


def make_corpus(root: str, copies: int, n_files: int = 8) -> list[str]:
    texts = stdlib_docstrings()
    paths = [os.path.join(root, f"bench{i:02d}.jsonl") for i in range(n_files)]
    files = [open(p, "w") for p in paths]
    for c in range(copies):
        for i, t in enumerate(texts):
            files[(c * len(texts) + i) % n_files].write(json.dumps({"text": t}) + "\n")
    for f in files:
        f.close()
    return paths


def raw_rate(tokenizer: str, docs: list[str], repeat: int = 2) -> tuple[float, float, int]:
    """Best-of-`repeat` single-process, single-thread batch encode rate: (tokens/wall s, tokens/CPU s, tokens)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    best, best_cpu, n = 0.0, 0.0, 0
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for i in range(0, len(docs), 2000):
            n += sum(map(len, sp.encode(docs[i:i + 2000], out_type=int, num_threads=1)))
        best = max(best, n / (time.perf_counter() - t0))
        best_cpu = max(best_cpu, n / (time.process_time() - c0))
    return best, best_cpu, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="*", default=None)
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: train one on the corpus)")
    p.add_argument("--field", default="text")
    p.add_argument("--copies", type=int, default=20, help="built-in corpus: copies of the stdlib docstrings")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--unit-lines", type=int, default=2000)
    p.add_argument("--cores", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    import ray

    tmp = a.workdir or tempfile.mkdtemp(prefix="dp_bench_")
    inputs = a.input or make_corpus(tmp, a.copies)
    docs = list(iter_documents(inputs, a.field))
    tok = a.tokenizer or train(docs[: max(1, len(docs) // a.copies if not a.input else 20000)],
                               os.path.join(tmp, "tok"), a.vocab_size)
    raw, raw_cpu, n_tok = raw_rate(tok, docs)
    print(f"[bench] corpus: {len(inputs)} files, {len(docs)} docs, {human(n_tok)} tokens; tokenizer {tok}")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for w in (1, 2):
            man = dp_tokenize.run(["--input", *inputs, "--tokenizer", tok, "--field", a.field, "--output-prefix",
                                   os.path.join(tmp, f"out_w{w}"), "--workers", str(w), "--unit-lines",
                                   str(a.unit_lines), "--progress-interval", "1e9"])
            r = man["_run"]
            tokens = r["tokens_this_run"]
            rows.append((w, tokens / r["worker_busy_s"], tokens / r["steady_seconds"] / w,
                         tokens / r["ray_seconds"] / w, tokens / r["worker_cpu_s"]))
    finally:
        ray.shutdown()
    print("\n| measurement | tokens/s per worker | vs raw |\n|---|---:|---:|")
    print(f"| raw SentencePiece encode, 1 process 1 thread | {human(raw)} | 100% |")
    print(f"| raw, per CPU-second (contention-free) | {human(raw_cpu)} | 100% |")
    for w, busy, steady, e2e, cpu in rows:
        print(f"| pipeline {w} worker(s), in-worker per CPU-second | {human(cpu)} | {cpu / raw_cpu:.0%} (of CPU) |")
        print(f"| pipeline {w} worker(s), in-worker | {human(busy)} | {busy / raw:.0%} |")
        print(f"| pipeline {w} worker(s), steady wall (first actor ready -> last unit) | {human(steady)} | "
              f"{steady / raw:.0%} |")
        print(f"| pipeline {w} worker(s), end-to-end wall (incl. actor start) | {human(e2e)} | {e2e / raw:.0%} |")
    _, busy2, steady2, e2e2, cpu2 = rows[1]
    print(f"\nratio pipeline/raw per worker at 2 workers: per CPU-second {cpu2 / raw_cpu:.2f}, in-worker wall "
          f"{busy2 / raw:.2f}, steady wall {steady2 / raw:.2f}, end-to-end wall {e2e2 / raw:.2f} (target >= 0.85); "
          f"machine has {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("\nestimated wall for 1e9 tokens, one worker per core (2-worker rates):")
    print("| cores | per CPU-second rate | in-worker wall rate | steady wall rate |\n|---:|---:|---:|---:|")
    for n in a.cores:
        print(f"| {n} | {1e9 / (cpu2 * n) / 60:.1f} min | {1e9 / (busy2 * n) / 60:.1f} min | "
              f"{1e9 / (steady2 * n) / 60:.1f} min |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
