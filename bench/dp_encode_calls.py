"""Tokenizer calls of raw's loop and of `tokenize --workers 1` on a corpus, without tokenizing.

    python bench/dp_encode_calls.py --input corpus.jsonl --tokenizer tok.model [-- TOKENIZE ARGS ...]

Raw: data_pipeline.bench.raw_loop (256 documents a call). Ours: the real `tokenize --workers 1` run
(parts, units, worker.encode_to_array's batching) with SentencePiece's encode replaced by a counter
that returns one token per document, into a temporary output. Prints one JSON line each: calls and
characters per call (mean, median). Extra arguments after `--` go to tokenize (e.g. `--part-bytes
4194304 --encode-batch-chars 4194304`). Used for the batch-size A/B in docs/data_pipeline.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data_pipeline import bench, tokenize, tokenizer  # noqa: E402


def _stats(what: str, calls: list[int]) -> dict:
    return {"what": what, "calls": len(calls), "chars_mean": round(statistics.mean(calls)),
            "chars_median": round(statistics.median(calls))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more tokenize arguments")
    a = p.parse_args()
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    raw: list[int] = []
    bench.raw_loop(a.input, lambda batch: raw.append(sum(map(len, batch))) or [[]] * len(batch))
    print(json.dumps(_stats("raw (bench.raw_loop, 256 documents a call)", raw)))
    ours: list[int] = []

    def counting(self):
        return lambda texts: ours.append(sum(map(len, texts))) or [np.zeros(1, np.int32)] * len(texts)

    tokenizer.Tokenizer._sp_arrays = counting
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
        assert tokenize.main(["--input", a.input, "--tokenizer", a.tokenizer, "--output-prefix", d + "/o",
                              "--workers", "1", "--max-doc-chars", str(10**9), *extra]) == 0
    print(json.dumps(_stats(" ".join(["ours --workers 1", *extra]), ours)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
