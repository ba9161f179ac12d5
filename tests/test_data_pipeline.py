"""data_pipeline end to end on a real local Ray: real text, planted bad lines, dedup, formats,
1 vs 2 workers, SIGKILL + restart, GPTDataset over the output, HF tokenizer.json.

Every expectation is computed here independently from the corpus the test writes: which lines
are good, the normalised text, the tokens (SentencePiece called directly), the rejects.
"""
import contextlib
import glob
import io
import gzip
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from data_pipeline import tokenize as dp_tokenize
from data_pipeline import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_CHARS = 20000
UNIT = 40


def norm(t):
    return unicodedata.normalize("NFC", t.replace("\r\n", "\n").replace("\r", "\n")).strip()


def real_texts():
    """Docstrings of stdlib modules and license files shipped in site-packages (offline, real prose)."""
    out = []
    for m in ["json", "os", "re", "collections", "argparse", "email.message", "http.client", "logging", "pathlib",
              "subprocess", "asyncio.tasks", "statistics", "textwrap", "decimal", "fractions", "csv", "difflib",
              "heapq", "bisect", "functools", "itertools", "inspect", "unittest.case", "zipfile", "tarfile"]:
        mod = importlib.import_module(m)
        for name in sorted(dir(mod)):
            obj = getattr(mod, name, None)
            members = [getattr(obj, n, None) for n in sorted(vars(obj))] if isinstance(obj, type) else []
            for o in [obj] + members:
                d = getattr(o, "__doc__", None)
                if isinstance(d, str) and len(d) > 60:
                    out.append(d)
    site = os.path.dirname(os.path.dirname(pa.__file__))
    for p in sorted(glob.glob(os.path.join(site, "*.dist-info", "LICENSE*")))[:15]:
        with open(p, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    seen, uniq = set(), []
    for t in out:
        if t not in seen:
            seen.add(t)
            uniq.append(t)
    return uniq


class Corpus:
    """Writes shards in several formats with planted bad lines; records the expected outcome."""

    def __init__(self, root):
        self.root, self.expected, self.rejects, self.seen = root, [], [], set()
        self.n_read = 0

    def _good(self, text):
        t = norm(text)
        if not t:
            return "empty"
        if len(t) > MAX_CHARS:
            return "oversize"
        if t in self.seen:
            self.expected_dups += 1
        else:
            self.seen.add(t)
            self.expected.append(t)
        return None

    def jsonl(self, name, records, gz=False):
        """records: list of bytes lines (planted) or str texts (good)."""
        lines, path = [], os.path.join(self.root, name)
        for rec in records:
            if isinstance(rec, tuple):
                raw, reason = rec
                lines.append(raw)
                self.rejects.append((path, len(lines), reason))
            else:
                lines.append(json.dumps({"text": rec, "meta": 1}).encode())
                reason = self._good(rec)
                if reason:
                    self.rejects.append((path, len(lines), reason))
        data = b"\n".join(lines) + b"\n"
        with open(path, "wb") as f:
            f.write(gzip.compress(data, mtime=0) if gz else data)
        self.n_read += len(lines)
        return path


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never join a cluster another job started
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    texts = real_texts()
    assert len(texts) > 800
    c = Corpus(root)
    c.expected_dups = 0
    a, b = texts[: len(texts) // 2], texts[len(texts) // 2:]
    planted = [
        (b'{"text": "broken json', "bad_json"), (b'{"text": "caf\xe9 au lait"}', "invalid_utf8"),
        (b"", "empty"), (b'{"text": " \\r\\n  "}', "empty"), (b'{"body": "no text field"}', "missing_field"),
        (json.dumps({"text": "x " * 15000}).encode(), "oversize"), (b'{"text": 42}', "bad_field_type"),
        (b"[1, 2, 3]", "not_object"), (b'{"text": "lone \\ud800 surrogate"}', "invalid_unicode"),
    ]
    recs = list(a[:200])
    for i, p in enumerate(planted):  # spread the bad lines over several units
        recs.insert(7 + i * 23, p)
    recs += ["  Caf\u0065\u0301 line one\r\nline two  ", a[3], a[5]] + a[200:]  # NFC, CRLF, strip, 2 duplicates
    c.jsonl("a.jsonl", recs)
    c.jsonl("b.jsonl.gz", [(b"{not json}", "bad_json")] + b[:300] + [a[10]], gz=True)
    pq_texts = b[300:]
    rows = pq_texts[:50] + [None] + pq_texts[50:]
    path = os.path.join(root, "c.parquet")
    pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}), path, row_group_size=64)
    for i, t in enumerate(rows, start=1):
        if t is None:
            c.rejects.append((path, i, "missing_field"))
        else:
            r = c._good(t)
            if r:
                c.rejects.append((path, i, r))
    c.n_read += len(rows)
    tok_prefix = os.path.join(root, "tok")
    assert train_tokenizer.main(["--input", os.path.join(root, "a.jsonl"), os.path.join(root, "b.jsonl.gz"),
                                 "--model-prefix", tok_prefix, "--vocab-size", "1200", "--sample-docs", "600"]) == 0
    c.tokenizer = tok_prefix + ".model"
    c.inputs = [os.path.join(root, n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")]
    return c


def args(c, prefix, workers, *extra):
    return ["--input", *c.inputs, "--tokenizer", c.tokenizer, "--output-prefix", prefix, "--unit-lines", str(UNIT),
            "--part-bytes", "200000", "--max-doc-chars", str(MAX_CHARS), "--dedup", "--workers", str(workers),
            "--progress-interval", "1", *extra]


def outputs(prefix):
    return {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx", ".rejects.jsonl")}


@pytest.fixture(scope="module")
def run2(ray_session, corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("out2") / "ds")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        man = dp_tokenize.run(args(corpus, prefix, 2))
    man["_console"] = buf.getvalue()
    return prefix, man


def test_round_trip_counts_and_rejects(corpus, run2):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, man = run2
    sp = spm.SentencePieceProcessor(model_file=corpus.tokenizer)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(corpus.expected) > 1000
    for i, text in enumerate(corpus.expected):
        toks = ds[i].tolist()
        assert toks == sp.encode(text) + [2], i
        assert sp.decode(toks[:-1]) == text, i
    t = man["totals"]
    assert t["tokens"] == int(ds.sequence_lengths.sum()) == os.path.getsize(prefix + ".bin") // 2
    assert t["docs_written"] == len(corpus.expected) and t["duplicates"] == corpus.expected_dups == 3
    assert t["docs_read"] == corpus.n_read
    assert t["docs_rejected"] == len(corpus.rejects) == t["docs_read"] - t["docs_written"] - t["duplicates"]
    got = [json.loads(line) for line in open(prefix + ".rejects.jsonl")]
    assert [(r["file"], r["line"], r["reason"]) for r in got] == corpus.rejects
    reasons = {}
    for _, _, r in corpus.rejects:
        reasons[r] = reasons.get(r, 0) + 1
    assert t["rejected_by_reason"] == reasons and len(reasons) == 8
    assert man["tokenizer"]["eod_id"] == 2 and man["complete"]
    assert sum(u["tokens"] for u in man["units"]) == t["tokens"]
    for f in man["files"]:
        assert f["sha256"] == hashlib.sha256(open(f["path"], "rb").read()).hexdigest()
    assert len(man["files"][0]["parts"]) > 1  # a.jsonl was split into byte-range parts
    assert not os.path.exists(prefix + ".work")
    out = man["_console"]
    assert "[tokenize]" in out and "tok/s" in out and "data.eod_id=2" in out
    total_row = next(line for line in out.splitlines() if line.startswith("TOTAL")).split()
    assert total_row[1:] == [str(t[k]) for k in ("docs_read", "docs_rejected", "duplicates", "docs_written", "tokens")]


def test_one_worker_identical_and_restart_noop(corpus, run2, tmp_path):
    prefix = str(tmp_path / "ds")
    dp_tokenize.run(args(corpus, prefix, 1))
    assert outputs(prefix) == outputs(run2[0])
    before = open(prefix + ".manifest.json").read()
    again = dp_tokenize.run(args(corpus, prefix, 1))  # complete: nothing to do, nothing changes
    assert again["complete"] and open(prefix + ".manifest.json").read() == before
    with pytest.raises(SystemExit, match="different settings.*unit_lines"):
        dp_tokenize.run(args(corpus, prefix, 1)[:-2] + ["--unit-lines", "7"])


def test_sigkill_then_restart_is_byte_identical(corpus, run2, ray_session, tmp_path):
    prefix = str(tmp_path / "ds")
    cmd = [sys.executable, "-m", "data_pipeline.tokenize", *args(corpus, prefix, 1, "--address", ray_session)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work, deadline = prefix + ".work", time.time() + 120
    try:
        while time.time() < deadline:
            done = glob.glob(os.path.join(work, "f*-c*.json"))
            if len(done) >= 3:
                break
            assert proc.poll() is None, "pipeline exited before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    n_done = len(glob.glob(os.path.join(work, "f*-c*.json")))
    total_units = len(run2[1]["units"])
    assert 3 <= n_done < total_units and not os.path.exists(prefix + ".bin")
    assert not json.load(open(prefix + ".manifest.json"))["complete"]
    man = dp_tokenize.run(args(corpus, prefix, 2))
    assert outputs(prefix) == outputs(run2[0])
    strip = lambda m: {k: v for k, v in m.items() if k not in ("output", "_run", "_console")}
    assert strip(man) == strip(run2[1])
    assert man["_run"]["tokens_this_run"] < run2[1]["totals"]["tokens"]  # finished units were skipped


def test_gpt_dataset_reads_output(corpus, run2):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mora_dist.training.data import build_dataset

    prefix, man = run2
    seq = 64
    gpt = build_dataset([prefix], None, 40, seq, 1234, man["tokenizer"]["eod_id"], man["tokenizer"]["vocab_size"])
    ind = IndexedDataset(prefix)
    stream = np.concatenate([ind[int(d)] for d in gpt.document_index])
    starts = np.concatenate([[0], np.cumsum(ind.sequence_lengths[gpt.document_index])])
    for i in range(40):
        j = gpt.shuffle_index[i]
        pos, off = gpt.sample_index[j]
        ref = stream[starts[pos] + off: starts[pos] + off + seq + 1]
        s = gpt[i]
        assert s["tokens"].tolist() == ref[:-1].tolist() and s["labels"].tolist() == ref[1:].tolist()
    assert (stream == 2).sum() == len(gpt.document_index)  # one EOD per document


def test_missing_field_everywhere_is_an_error(ray_session, tmp_path, corpus):
    p = tmp_path / "wrong.jsonl"
    p.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(30)))
    buf = io.StringIO()
    with pytest.raises(SystemExit, match=r"wrong.jsonl: text field 'text' is missing in every line \(30 lines\); "
                                         r"keys present: \['body'\]"), contextlib.redirect_stdout(buf):
        dp_tokenize.run(["--input", str(p), "--tokenizer", corpus.tokenizer, "--output-prefix",
                         str(tmp_path / "o"), "--workers", "1"])
    assert "WARNING" in buf.getvalue() and "none of the first 30 lines has 'text'" in buf.getvalue()
    bad = tmp_path / "truncated.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "a b c"}\n' * 2000)[:-40])
    with pytest.raises(Exception, match="truncated.jsonl.gz .part 0.: EOFError"):
        dp_tokenize.run(["--input", str(bad), "--tokenizer", corpus.tokenizer, "--output-prefix",
                         str(tmp_path / "o3"), "--workers", "1"])
    with pytest.raises(SystemExit, match=r"c.parquet: text field 'body' is not a column"):
        dp_tokenize.run(["--input", corpus.inputs[2], "--tokenizer", corpus.tokenizer, "--field", "body",
                         "--output-prefix", str(tmp_path / "o2")])


def test_hf_tokenizer_json_round_trip(ray_session, tmp_path, corpus):
    """A byte-level BPE tokenizer.json (HF tokenizers) on txt input, one document per line."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = [norm(t) for t in real_texts()[:300]]
    lines = [t.replace("\n", " ") for t in texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    man = dp_tokenize.run(["--input", str(tmp_path / "d.txt"), "--tokenizer", str(tmp_path), "--output-prefix",
                           str(tmp_path / "o"), "--workers", "2", "--unit-lines", "50"])
    ds = IndexedDataset(str(tmp_path / "o"))
    eod = tok.token_to_id("<|endoftext|>")
    assert man["tokenizer"]["eod_id"] == eod == 0 and len(ds) == len(lines)
    for i, line in enumerate(lines):
        ids = ds[i].tolist()
        assert ids == tok.encode(norm(line)).ids + [eod]
        assert tok.decode(ids[:-1]) == norm(line)
