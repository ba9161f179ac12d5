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
    """--workers 1 on the local machine runs in the driver's process (no Ray) and writes the bytes of
    Ray's 2-worker run."""
    prefix = str(tmp_path / "ds")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        man = dp_tokenize.run(args(corpus, prefix, 1))
    assert "1 worker, in this process" in buf.getvalue() and "on Ray" not in buf.getvalue()
    assert man["_run"]["ray_seconds"] == 0.0 and man["_run"]["tokens_this_run"] == run2[1]["_run"]["tokens_this_run"]
    assert outputs(prefix) == outputs(run2[0])
    before = open(prefix + ".manifest.json").read()
    again = dp_tokenize.run(args(corpus, prefix, 1))  # complete: nothing to do, nothing changes
    assert again["complete"] and open(prefix + ".manifest.json").read() == before
    with pytest.raises(SystemExit, match="different settings.*unit_lines"):
        dp_tokenize.run(args(corpus, prefix, 1)[:-2] + ["--unit-lines", "7"])


@pytest.mark.parametrize("killed", ["ray", "in_process"])
def test_sigkill_then_restart_is_byte_identical(corpus, run2, ray_session, tmp_path, killed):
    """A run killed mid-way (one Ray worker, or --workers 1 in the driver's process) resumes on 2 Ray
    workers to the bytes of an uninterrupted run."""
    prefix = str(tmp_path / "ds")
    extra = ("--address", ray_session) if killed == "ray" else ()
    cmd = [sys.executable, "-m", "data_pipeline.tokenize", *args(corpus, prefix, 1, *extra)]
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


# ---- issue 21: scheduling, no torch, progress; issue 18.7 / 18.9: faults

def _jsonl_of(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


def test_default_plan_keeps_both_workers_busy_and_streams_progress(ray_session, corpus, tmp_path):
    """One 3 MB file, no --part-bytes: it is cut into parts and both workers process units (before, a file
    under 256 MiB was one part: one worker did everything). Progress lines carry MB, tok/s and an ETA."""
    texts = [f"{i}: {t}" for i in range(8) for t in real_texts()]
    src = _jsonl_of(tmp_path / "one.jsonl", texts)
    assert 2.5e6 < os.path.getsize(src) < 8e6
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        man = dp_tokenize.run(["--input", src, "--tokenizer", corpus.tokenizer, "--output-prefix",
                               str(tmp_path / "o"), "--workers", "2", "--progress-interval", "0.2"])
    assert man["settings"]["part_bytes"] == 1 << 20 and len(man["files"][0]["parts"]) >= 3
    per_worker = man["_run"]["units_by_worker"]
    assert len(per_worker) == 2 and min(per_worker) >= 1, per_worker
    assert man["totals"]["docs_written"] == len(texts)
    lines = [line for line in buf.getvalue().splitlines() if " MB/s)" in line]
    assert lines and all("tok/s" in line and "ETA" in line for line in lines)
    assert lines[-1].split(" MB (")[0].endswith(f"/{os.path.getsize(src) / 1e6:.1f}")
    # a re-run without --part-bytes keeps the part size the output was planned with (an older default)
    mpath = str(tmp_path / "o.manifest.json")
    m = json.load(open(mpath))
    m["settings"]["part_bytes"] = 3 << 20
    json.dump(m, open(mpath, "w"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dp_tokenize.run(["--input", src, "--tokenizer", corpus.tokenizer, "--output-prefix", str(tmp_path / "o")])
    assert "is complete (outputs verified); nothing to do" in buf.getvalue()


def test_no_torch_or_megatron_in_driver_or_workers(ray_session, corpus, tmp_path):
    """The tokenize path imports neither torch nor megatron-core: driver (a fresh process running the
    whole CLI) and worker (an actor asked for its sys.modules after processing a part)."""
    code = ("import sys; from data_pipeline.tokenize import main; rc = main(sys.argv[1:]); "
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron'}), rc)")
    out = subprocess.run([sys.executable, "-c", code, *args(corpus, str(tmp_path / "d"), 1, "--address", ray_session)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "HEAVY [] 0" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    from data_pipeline.worker import TokenizeWorker

    cfg = {"tokenizer": corpus.tokenizer, "eod_token": None, "output_prefix": str(tmp_path / "w"), "field": "text",
           "txt_mode": "line", "unit_lines": 50, "part_bytes": 1 << 20, "max_doc_chars": MAX_CHARS, "dedup": False}
    os.makedirs(str(tmp_path / "w.work"))
    from data_pipeline.sources import plan_file

    info = plan_file(corpus.inputs[0], "auto", 1 << 20, "line")
    actor = ray.remote(num_cpus=1)(TokenizeWorker).remote(cfg)
    recs = [ray.get(r) for r in actor.process.remote({"file_i": 0, "part_i": 0, "info": info,
                                                      "part": info["parts"][0], "done": []})]
    assert sum(r.get("docs", 0) for r in recs) > 100 and "error" not in recs[-1]
    heavy = ray.get(actor.__ray_call__.remote(
        lambda self: sorted({m.split(".")[0] for m in sys.modules} & {"torch", "megatron"})))
    ray.kill(actor)
    assert heavy == []


def test_complete_output_is_verified_and_rebuilt(ray_session, corpus, tmp_path):
    """A complete manifest is not trusted blindly: a truncated .bin or a deleted .idx is found and rebuilt
    to the same bytes (before: 'complete; nothing to do')."""
    prefix = str(tmp_path / "ds")
    first = dp_tokenize.run(args(corpus, prefix, 2))
    want = outputs(prefix)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(len(want[".bin"]) - 2)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        man = dp_tokenize.run(args(corpus, prefix, 2))
    assert f"WARNING {prefix}.bin: {len(want['.bin']) - 2} bytes, manifest expects {len(want['.bin'])}; " \
           "rebuilding" in buf.getvalue()
    assert outputs(prefix) == want and man["_run"]["tokens_this_run"] == first["_run"]["tokens_this_run"] > 0
    os.remove(prefix + ".idx")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dp_tokenize.run(args(corpus, prefix, 1))
    assert f"{prefix}.idx: missing" in buf.getvalue() and outputs(prefix) == want
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dp_tokenize.run(args(corpus, prefix, 1))
    assert "is complete (outputs verified); nothing to do" in buf.getvalue()


def test_output_side_write_error_names_the_output(ray_session, corpus, tmp_path):
    """A write that fails in a worker (here: a folder where the first unit's shard must go) is one line
    naming that output file, not the input it was reading, and not a Ray traceback."""
    from data_pipeline.guard import PipelineError

    prefix = str(tmp_path / "ds")
    blocked = prefix + ".work/f000000-p00000-c000000.bin"
    os.makedirs(blocked)
    with pytest.raises(PipelineError) as e:
        dp_tokenize.run(args(corpus, prefix, 1))
    msg = str(e.value)
    assert msg.startswith(f"{blocked}: cannot write output (Is a directory)") and "\n" not in msg
    assert "a.jsonl" not in msg


def test_empty_and_all_rejected_inputs_fail_naming_the_path(ray_session, corpus, tmp_path):
    from data_pipeline.guard import PipelineError

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(PipelineError, match=rf"^{empty}: input is empty \(0 bytes\)"):
        dp_tokenize.run(["--input", str(empty), "--tokenizer", corpus.tokenizer, "--output-prefix",
                         str(tmp_path / "o1")])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "unterminated\n\n{oops}\n')
    with pytest.raises(PipelineError, match=rf"^{bad}: no documents to write \(3 records read; rejected: "
                                            r"bad_json=2, empty=1\)"):
        dp_tokenize.run(["--input", str(bad), "--tokenizer", corpus.tokenizer, "--output-prefix",
                         str(tmp_path / "o2"), "--workers", "1"])
    assert not os.path.exists(tmp_path / "o2.bin")


def test_binary_files_read_as_text_are_rejected(ray_session, corpus, tmp_path):
    """--txt-mode file over a folder with real text and two binary files: only the text becomes a document;
    each binary file is a reject naming the file and why."""
    d = tmp_path / "docs"
    d.mkdir()
    text = norm(real_texts()[3])
    (d / "a.txt").write_text(text)
    with open(sys.executable, "rb") as f:
        (d / "b.txt").write_bytes(f.read(65536))  # an ELF executable: not UTF-8
    (d / "c.txt").write_bytes((np.arange(8000) % 100).astype(np.uint8).tobytes())  # valid UTF-8, but numbers
    man = dp_tokenize.run(["--input", str(d), "--txt-mode", "file", "--tokenizer", corpus.tokenizer,
                           "--output-prefix", str(tmp_path / "o"), "--workers", "1"])
    assert man["totals"]["docs_written"] == 1
    rej = [json.loads(line) for line in open(tmp_path / "o.rejects.jsonl")]
    assert [(os.path.basename(r["file"]), r["reason"]) for r in rej] == [("b.txt", "invalid_utf8"), ("c.txt", "binary")]


def test_arrow_save_to_disk_and_split(ray_session, corpus, tmp_path):
    """A DatasetDict saved with save_to_disk, --split train: every train row once, in order, tokens exact."""
    import datasets
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = [norm(t) for t in real_texts()[:400]]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:300]}),
                               "test": datasets.Dataset.from_dict({"text": texts[300:]})})
    dd.save_to_disk(str(tmp_path / "hf"), max_shard_size="100KB")
    man = dp_tokenize.run(["--input", str(tmp_path / "hf"), "--split", "train", "--tokenizer", corpus.tokenizer,
                           "--output-prefix", str(tmp_path / "o"), "--workers", "2", "--part-bytes", "30000"])
    assert all("/train/" in f["path"] and f["format"] == "arrow" for f in man["files"])
    assert len(man["files"]) == 2  # two shards of the train split; the test split is left out
    sp = spm.SentencePieceProcessor(model_file=corpus.tokenizer)
    ds = IndexedDataset(str(tmp_path / "o"))
    assert [ds[i].tolist() for i in range(len(ds))] == [ids + [2] for ids in sp.encode(texts[:300])]


def test_worker_memory_stays_flat_over_many_parts(ray_session, corpus, tmp_path):
    """A tokenize actor's anonymous memory after part 4 and after part 16 differ by < 15 MB (glibc's
    per-thread arenas used to grow it part after part: MALLOC_ARENA_MAX=2 in its environment)."""
    from data_pipeline.raylife import actor_options
    from data_pipeline.sources import plan_file
    from data_pipeline.worker import TokenizeWorker

    base = real_texts()
    texts = [f"{i}: " + "\n\n".join(base[j:j + 12]) for i in range(9) for j in range(0, len(base), 3)]
    src = _jsonl_of(tmp_path / "m.jsonl", texts)
    info = plan_file(src, "auto", 1 << 20, "line")
    assert len(info["parts"]) >= 16, len(info["parts"])
    cfg = {"tokenizer": corpus.tokenizer, "eod_token": None, "output_prefix": str(tmp_path / "w"), "field": "text",
           "txt_mode": "line", "unit_lines": 2000, "part_bytes": 1 << 20, "max_doc_chars": 10**6, "dedup": False}
    os.makedirs(str(tmp_path / "w.work"))
    actor = ray.remote(**actor_options())(TokenizeWorker).remote(cfg)

    def rss_anon(self):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")) >> 10

    mem = []
    for pi, part in enumerate(info["parts"][:16]):
        recs = [ray.get(r) for r in actor.process.remote({"file_i": 0, "part_i": pi, "info": info, "part": part,
                                                          "done": []})]
        assert "error" not in recs[-1]
        mem.append(ray.get(actor.__ray_call__.remote(rss_anon)))
    ray.kill(actor)
    assert mem[-1] - mem[3] < 15, mem  # measured: +4 MB; without MALLOC_ARENA_MAX +33 MB


def test_local_ray_workers_run_at_the_drivers_priority(tmp_path):
    """A Ray the pipeline starts itself runs its workers at nice 0, as every peer runs (Ray's default of
    nice 15 starved them on a shared machine: docs/data_pipeline.md). A fresh process: the module's
    ray_session would be reused instead of started."""
    code = ("from data_pipeline.raylife import connect\n"
            "with connect(None, 1) as ray:\n"
            "    f = ray.remote(num_cpus=1)(lambda: __import__('os').nice(0))\n"
            "    print('niceness', ray.get(f.remote()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert "niceness 0" in r.stdout, r.stdout[-1000:] + r.stderr[-2000:]


def test_local_ray_has_no_idle_workers_the_actors_use_the_prestarted_ones(corpus, tmp_path):
    """A Ray the pipeline starts has one CPU per tokenize worker, and the actors run in the worker
    processes the raylet prestarted; no other worker process starts (before: a job runtime_env made
    each actor start a process of its own while the prestarted ones stayed ray::IDLE until Ray killed
    them: two wasted Python start-ups per run). A fresh process: the module's ray_session would be
    reused instead of started."""
    code = (
        "import json, os, sys, time\n"
        "from data_pipeline.raylife import actor_options, connect, default_workers\n"
        "from data_pipeline.worker import TokenizeWorker\n"
        "def tree(pid):\n"
        "    out, todo = [], [pid]\n"
        "    while todo:\n"
        "        p = todo.pop()\n"
        "        try:\n"
        "            for t in os.listdir(f'/proc/{p}/task'):\n"
        "                kids = [int(c) for c in open(f'/proc/{p}/task/{t}/children').read().split()]\n"
        "                out += kids\n"
        "                todo += kids\n"
        "        except OSError:  # exited meanwhile\n"
        "            pass\n"
        "    return out\n"
        "def title(p):\n"
        "    try:\n"
        "        return open(f'/proc/{p}/cmdline').read().split('\\0')[0].split(' ')[0]\n"
        "    except OSError:\n"
        "        return ''\n"
        "def workers():  # the Ray worker processes of this run (not its agents)\n"
        "    return {p for p in tree(os.getpid()) if title(p).startswith('ray::') and 'Agent' not in title(p)}\n"
        "cfg = json.loads(sys.argv[1])\n"
        "with connect(None, 2, max_workers=5) as ray:\n"
        "    t0 = time.time()\n"
        "    while len(workers()) < 2 and time.time() < t0 + 60:  # the raylet prestarts one per CPU\n"
        "        time.sleep(0.1)\n"
        "    prestarted, seen = workers(), set()\n"
        "    actors = [ray.remote(**actor_options())(TokenizeWorker).remote(cfg) for _ in range(2)]\n"
        "    refs = [a.__ray_call__.remote(lambda self: os.getpid()) for a in actors]\n"
        "    while ray.wait(refs, num_returns=2, timeout=0.05)[1] or time.time() < t0 + 5:\n"
        "        seen |= workers()\n"
        "    print('RESULT', json.dumps({'cpus': ray.cluster_resources().get('CPU'), 'default': default_workers(ray),\n"
        "                                'actors': sorted(ray.get(refs)), 'prestarted': sorted(prestarted),\n"
        "                                'seen': sorted(seen)}))\n")
    os.makedirs(str(tmp_path / "w.work"))
    cfg = {"tokenizer": corpus.tokenizer, "eod_token": None, "output_prefix": str(tmp_path / "w"), "field": "text",
           "txt_mode": "line", "unit_lines": 2000, "part_bytes": 1 << 20, "max_doc_chars": 10**6, "dedup": False}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=REPO))
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stdout[-1000:] + r.stderr[-2000:]
    res = json.loads(line[7:])
    assert res["cpus"] == 2 and res["default"] == 2, res
    # the actors are the two prestarted processes, and no other worker process was started meanwhile
    assert res["actors"] == res["prestarted"] == res["seen"], res
