"""data_pipeline pieces without Ray: normalisation, planning into parts, record extraction, tokenizer training."""
import gzip
import json
import os
import unicodedata

import numpy as np

import pytest

from data_pipeline.normalize import extract, normalise
from data_pipeline.sources import list_inputs, plan_file, read_part


def _reference_normalise(t):
    return unicodedata.normalize("NFC", t.replace("\r\n", "\n").replace("\r", "\n")).strip()


def test_normalise_rule():
    for t in ["  cafe\u0301 \r\n x\r y\n\n", "\ufeff\u00a0plain\t", "Å vs A\u030a", "", "  \n "]:
        assert normalise(t) == _reference_normalise(t)
    assert normalise("cafe\u0301") == "caf\u00e9"


@pytest.mark.parametrize("raw,reason", [
    (b'{"text": "abc', "bad_json"), (b'{"text": "caf\xe9"}', "invalid_utf8"), (b'{"body": "x"}', "missing_field"),
    (b'{"text": null}', "missing_field"), (b'{"text": 5}', "bad_field_type"), (b"[1, 2]", "not_object"),
    (b'{"text": "  \\n "}', "empty"), (b"   ", "empty"), (b'{"text": "a\\ud800b"}', "invalid_unicode"),
    (b'{"text": "' + b"x" * 11 + b'"}', "oversize"), (b'{"text": " ok\\r\\n"}', None)])
def test_extract_reasons(raw, reason):
    ex = extract(raw, "jsonl", "text", 10)
    assert ex.reason == reason
    if reason is None:
        assert ex.text == "ok"


def _lines_of(path, info, txt_mode="line"):
    return [(n, r) for p in info["parts"] for n, r in read_part(info, p, "text", txt_mode)]


def test_parts_cover_file_exactly(tmp_path, monkeypatch):
    """Parts cut at newlines; reading all parts gives exactly the file's lines with their line numbers
    (many cuts in one read block, and, with a tiny block, cuts and lines across block boundaries)."""
    import hashlib

    from data_pipeline import sources

    lines = [json.dumps({"text": "w" * (i % 37)}).encode() for i in range(500)] + [b"", b"last-no-newline"]
    data = b"\n".join(lines)
    p = tmp_path / "a.jsonl"
    p.write_bytes(data)
    for block in (sources._BLOCK, 777, 64):
        monkeypatch.setattr(sources, "_BLOCK", block)
        info = plan_file(str(p), "auto", 1000, "line")
        assert info["size"] == len(data) and len(info["parts"]) > 5
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert [pt["start"] for pt in info["parts"][1:]] == [pt["end"] for pt in info["parts"][:-1]]
        assert info["parts"][-1]["end"] == len(data)
        assert [pt["first_line"] for pt in info["parts"]] == [data.count(b"\n", 0, pt["start"]) + 1
                                                               for pt in info["parts"]]
        assert _lines_of(p, info) == list(enumerate(lines, start=1))
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(data + b"\n"))
    ginfo = plan_file(str(gz), "auto", 1000, "line")
    assert len(ginfo["parts"]) == 1 and _lines_of(gz, ginfo) == list(enumerate(lines, start=1))


def test_list_inputs_and_format_errors(tmp_path):
    (tmp_path / "d").mkdir()
    for n in ["b.jsonl", "a.txt", "c.parquet", "skip.csv"]:
        (tmp_path / "d" / n).write_text("x")
    got = list_inputs([str(tmp_path / "d")])
    assert [g.rsplit("/", 1)[1] for g in got] == ["a.txt", "b.jsonl", "c.parquet"]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match="skip.csv: unknown input format"):
        plan_file(str(tmp_path / "d" / "skip.csv"), "auto", 100, "line")


def test_train_tokenizer_byte_fallback_round_trip(tmp_path):
    """Unseen characters come back exactly through byte fallback; eos is the EOD id."""
    import sentencepiece as spm

    from data_pipeline import train_tokenizer

    corpus = tmp_path / "c.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "protein", "kinase", "binding", "cell"]
    corpus.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % 8] for j in range(12))}) + "\n"
                              for i in range(300)))
    assert train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(tmp_path / "t"), "--vocab-size",
                                 "300", "--model-type", "unigram", "--sample-docs", "100"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    assert sp.eos_id() == 2
    for text in ["kinase 😀 Ω≈ç  two  spaces\n\tnew line", "漢字 binding"]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode("😀"))


def test_txt_file_mode_and_file_uri(tmp_path):
    """--txt-mode file: one record per file; inputs given as file:// URIs go through pyarrow's filesystem."""
    (tmp_path / "d").mkdir()
    body = "Title\r\n\r\nSecond paragraph\n"
    (tmp_path / "d" / "a.txt").write_text(body, newline="")
    (tmp_path / "d" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n{"text": "y"}\n'))
    uris = list_inputs(["file://" + str(tmp_path / "d")])
    assert uris == ["file://" + str(tmp_path / "d" / "a.txt"), "file://" + str(tmp_path / "d" / "b.jsonl.gz")]
    info = plan_file(uris[0], "auto", 4, "file")
    assert len(info["parts"]) == 1
    recs = _lines_of(None, info, "file")
    assert recs == [(1, body.encode())] and extract(recs[0][1], "txt", "text", 100).text == "Title\n\nSecond paragraph"
    assert [extract(r, "jsonl", "text", 9).text for _, r in _lines_of(None, plan_file(uris[1], "auto", 4, "line"))] \
        == ["x", "y"]


# ---- issue 21 / 18: own indexed writer, numpy tokens, binary rejects, HF layouts, guards

def _megatron_write(prefix, docs, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.dtype(dtype).type)
    for d in docs:
        b.add_document(np.asarray(d, dtype=dtype), [len(d)])
    b.finalize(prefix + ".idx")


@pytest.mark.parametrize("vocab", [1200, 70000])
def test_own_indexed_writer_is_byte_identical_to_megatron(tmp_path, vocab):
    """Our shard writer vs megatron's IndexedDatasetBuilder: same .bin/.idx bytes; megatron reads ours back."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    from data_pipeline import indexed, store

    dtype = indexed.token_dtype(vocab)
    assert dtype == np.dtype(DType.optimal_dtype(vocab))
    for v in (1, 65499, 65500, 200000):
        assert indexed.token_dtype(v) == np.dtype(DType.optimal_dtype(v))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n).tolist() for n in [1, 7, 300, 2, 4096, 33]]
    _megatron_write(str(tmp_path / "m"), docs, dtype)
    store.write_shard(str(tmp_path / "o"), np.concatenate([np.asarray(d, dtype=dtype) for d in docs]),
                      np.array([len(d) for d in docs]))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"o{ext}").read_bytes() == (tmp_path / f"m{ext}").read_bytes(), ext
    ds = IndexedDataset(str(tmp_path / "o"))
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert os.path.getsize(tmp_path / "o.idx") == indexed.idx_size(len(docs))
    got_dtype, lens = indexed.read_index(str(tmp_path / "o.idx"))
    assert got_dtype == dtype and lens.tolist() == [len(d) for d in docs]
    (tmp_path / "t.idx").write_bytes((tmp_path / "o.idx").read_bytes()[:40])
    with pytest.raises(ValueError, match="t.idx: truncated"):
        indexed.read_index(str(tmp_path / "t.idx"))
    _megatron_write(str(tmp_path / "e"), [], dtype)  # empty dataset: same bytes too
    store.write_shard(str(tmp_path / "f"), np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64))
    assert (tmp_path / "f.idx").read_bytes() == (tmp_path / "e.idx").read_bytes()


def test_encode_to_array_matches_lists_over_several_batches(monkeypatch, tmp_path):
    """Tokens go to numpy per encode batch; the flat array + lengths equal encode() + EOD per document."""
    from data_pipeline import worker
    from data_pipeline.tokenizer import Tokenizer

    model = _tiny_sp(tmp_path)
    tok = Tokenizer(model)
    texts = [f"kinase {i} binds protein number {i * 7} in cell line {i % 5}" * (1 + i % 4) for i in range(60)]
    monkeypatch.setattr(worker, "ENCODE_BATCH_CHARS", 300)  # many batches, some of one long text
    flat, lens = worker.encode_to_array(tok, texts, tok.eod_id, np.dtype(np.uint16))
    want = [ids + [tok.eod_id] for ids in tok.encode_batch(texts)]
    assert flat.dtype == np.uint16 and lens.tolist() == [len(w) for w in want]
    assert flat.tolist() == [t for w in want for t in w]
    flat0, lens0 = worker.encode_to_array(tok, [], tok.eod_id, np.dtype(np.uint16))
    assert len(flat0) == len(lens0) == 0
    # the installed SentencePiece hands out numpy arrays (no Python int per token); the list path, for
    # versions without it, gives the same arrays
    assert tok.encode_batch_arrays is not None
    monkeypatch.setattr(tok, "encode_batch_arrays", None)
    flat1, lens1 = worker.encode_to_array(tok, texts, tok.eod_id, np.dtype(np.uint16))
    assert flat1.dtype == np.uint16 and flat1.tolist() == flat.tolist() and lens1.tolist() == lens.tolist()
    # batch_chars (tokenize --encode-batch-chars) sets the call size per run: fewer calls, the same arrays
    monkeypatch.undo()
    arrays, calls = tok.encode_batch_arrays, {}
    for limit in (300, 1200):
        got = calls.setdefault(limit, [])  # (texts, characters) of every call
        monkeypatch.setattr(tok, "encode_batch_arrays", lambda b: got.append((len(b), sum(map(len, b)))) or arrays(b))
        flat2, lens2 = worker.encode_to_array(tok, texts, tok.eod_id, np.dtype(np.uint16), batch_chars=limit)
        assert flat2.tolist() == flat.tolist() and lens2.tolist() == lens.tolist()
        assert sum(n for n, _ in got) == len(texts) and all(c <= limit or n == 1 for n, c in got)
    assert len(calls[1200]) < len(calls[300])


def _tiny_sp(tmp_path):
    from data_pipeline import train_tokenizer

    corpus = tmp_path / "sp.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "protein", "kinase", "binding", "cell", "number", "line", "in"]
    corpus.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % 11] for j in range(12))}) + "\n"
                              for i in range(300)))
    assert train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(tmp_path / "sp"), "--vocab-size",
                                 "400", "--sample-docs", "300"]) == 0
    return str(tmp_path / "sp.model")


def test_binary_documents_are_rejected_with_reason():
    """Binary data that happens to decode (controls, NULs, U+FFFD) is 'binary'; text with tabs/form feeds is not."""
    blob = bytes(range(32)) * 40 + b"PK\x03\x04"
    ex = extract(blob, "txt", "text", 10**6)
    assert ex.reason == "binary" and "control or replacement characters" in ex.detail
    ex = extract(json.dumps({"text": "\u0000\u0001\u0002abc\ufffd\ufffd"}).encode(), "jsonl", "text", 100)
    assert ex.reason == "binary" and ex.detail.startswith("5 of 8 characters")
    man = "NAME\n\tls - list\x0cdirectory contents\x1b[1m bold\x1b[0m " + "words " * 30
    assert extract(man.encode(), "txt", "text", 10**6).reason is None
    assert extract(b"one \x00 nul in a long enough line of ordinary text", "txt", "text", 100).reason is None


def test_binary_precheck_agrees_with_the_regex_rule():
    """The UTF-8 byte pre-check only skips the regex scan when it cannot match: every character that
    shares a lead byte with a non-text one (U+00A0-U+00BF, U+F000-U+FFFF), every C0/C1 control, in
    ASCII and non-ASCII text, changed or unchanged by normalisation, gets the reason the regex gives."""
    from data_pipeline.normalize import BINARY_SHARE, _NON_TEXT

    def reference(text):  # the rule without the pre-check
        t = normalise(text)
        bad = len(_NON_TEXT.findall(t))
        return "binary" if bad > BINARY_SHARE * len(t) else None

    chars = [chr(c) for c in range(0x100)] + [chr(c) for c in (0x2028, 0xf000, 0xfeff, 0xfffc, 0xfffd, 0xffff)]
    fillers = ["plain ascii words ", "caf\u00e9 \u4e2d\u6587 words ", "e\u0301 not NFC "]
    n = 0
    for ch in chars:
        for filler in fillers:
            for k in (1, 3, 8):
                for text in (ch * k + filler, filler + ch * k + " x", " " + ch * k + filler + "\r\n"):
                    ex = extract(json.dumps({"text": text}).encode(), "jsonl", "text", 10**6)
                    if ex.reason in (None, "binary"):
                        assert ex.reason == reference(text), (hex(ord(ch)), k, text)
                        n += ex.reason == "binary"
    assert n > 100  # the binary side is exercised too


def test_auto_part_bytes_depends_on_size_only():
    from data_pipeline.sources import auto_part_bytes

    assert auto_part_bytes(0) == auto_part_bytes(10 << 20) == 1 << 20
    assert auto_part_bytes(2 << 30) == 4 << 20 and auto_part_bytes(1 << 40) == 32 << 20


def test_parquet_and_arrow_split_into_row_group_parts(tmp_path):
    """Parquet row groups / Arrow record batches become several parts; reading them gives every row once."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"document {i} " + "text " * (i % 50) for i in range(3000)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "a.parquet", row_group_size=250)
    info = plan_file(str(tmp_path / "a.parquet"), "auto", 20000, "line")
    assert len(info["parts"]) > 4 and info["rows"] == 3000
    assert sum(p["bytes"] for p in info["parts"]) == info["size"]
    assert [v for _, v in _lines_of(None, info)] == rows
    assert [n for _, n in [(0, n) for n, _ in _lines_of(None, info)]] == list(range(1, 3001))
    datasets.Dataset.from_dict({"text": rows, "id": list(range(3000))}).save_to_disk(str(tmp_path / "hf"),
                                                                                     max_shard_size="100KB")
    files = list_inputs([str(tmp_path / "hf")])
    assert files and all(f.endswith(".arrow") for f in files)  # state.json / dataset_info.json skipped
    got = []
    for f in files:
        info = plan_file(f, "auto", 20000, "line")
        got += [v for _, v in _lines_of(None, info)]
    assert got == rows


def test_hub_snapshot_layout_and_split(tmp_path):
    """A hub snapshot (symlinks into blobs/, README, .gitattributes, .cache/) lists only its data files;
    --split keeps one split of folder- or prefix-named layouts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "0a1b2c"
    blobs.mkdir()
    (snap / "data").mkdir(parents=True)
    (snap / ".cache" / "huggingface").mkdir(parents=True)
    (snap / ".cache" / "huggingface" / "x.json").write_text("{}")
    (snap / "README.md").write_text("---\nlicense: mit\n---\n")
    (snap / ".gitattributes").write_text("*.parquet filter=lfs\n")
    (snap / "dataset_infos.json").write_text("{}")
    for name in ["train-00000-of-00002", "train-00001-of-00002", "test-00000-of-00001"]:
        pq.write_table(pa.table({"text": [name]}), blobs / name)
        (snap / "data" / f"{name}.parquet").symlink_to(blobs / name)
    got = [os.path.basename(p) for p in list_inputs([str(snap)])]
    assert got == ["test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [os.path.basename(p) for p in list_inputs([str(snap)], split="train")] == got[1:]
    with pytest.raises(FileNotFoundError, match="of split 'validation'"):
        list_inputs([str(snap)], split="validation")


def test_verify_outputs_catches_truncation_and_deletion(tmp_path):
    from data_pipeline import store
    from data_pipeline.guard import verify_outputs

    prefix = str(tmp_path / "ds")
    store.write_shard(prefix, np.arange(10, dtype=np.uint16), np.array([4, 6]))
    (tmp_path / "ds.rejects.jsonl").write_text("")
    man = {"dtype": "uint16", "totals": {"tokens": 10, "docs_written": 2},
           "output": {"bytes": {"rejects": 0}}}
    assert verify_outputs(prefix, man) == []
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(18)
    assert verify_outputs(prefix, man) == [f"{prefix}.bin: 18 bytes, manifest expects 20"]
    os.remove(prefix + ".idx")
    assert f"{prefix}.idx: missing (manifest says complete)" in verify_outputs(prefix, man)
    man["totals"]["docs_written"] = 3
    store.write_shard(prefix, np.arange(10, dtype=np.uint16), np.array([4, 6]))
    assert verify_outputs(prefix, man) == [f"{prefix}.idx: {os.path.getsize(prefix + '.idx')} bytes, manifest "
                                           f"expects {os.path.getsize(prefix + '.idx') + 20}"]


def test_bench_paired_rounds_cores_and_ratios():
    """The bench's paired rounds: which runs start together on which core, and CPU over raw's of the same run."""
    from data_pipeline.bench import paired_groups, paired_ratios

    # one core: all contenders together on it, every round
    assert [paired_groups(3, [1], r) for r in range(2)] == [[[(0, 1), (1, 1), (2, 1)]]] * 2
    # two cores: raw with each other contender, one per core, the cores swapped every round
    assert paired_groups(2, [0, 1], 0) == [[(0, 0), (1, 1)]] and paired_groups(2, [0, 1], 1) == [[(0, 1), (1, 0)]]
    assert paired_groups(3, [0, 1], 2) == [[(0, 0), (1, 1)], [(0, 0), (2, 1)]]
    rounds = [{"raw": 40.0, "ours": 41.0, "b4M": 39.0}, {"raw": 36.0, "ours": 36.0, "b4M": 37.8},
              {"raw": 50.0, "ours": 49.0, "b4M": 50.0}]
    got = paired_ratios(rounds, "raw")
    assert list(got) == ["ours", "b4M"]
    assert got["ours"] == {"per_round": [1.025, 1.0, 0.98], "median": 1.0, "min": 0.98, "max": 1.025}
    assert got["b4M"]["per_round"] == [0.975, 1.05, 1.0] and got["b4M"]["median"] == 1.0
    # pairs (two cores): each contender against the raw run of its own pair
    pairs = [{"raw": 34.0, "ours": 35.7}, {"raw": 35.0, "p4M": 36.4}, {"raw": 36.0, "ours": 36.0}]
    got = paired_ratios(pairs, "raw")
    assert got["ours"]["per_round"] == [1.05, 1.0] and got["ours"]["median"] == 1.025
    assert got["p4M"] == {"per_round": [1.04], "median": 1.04, "min": 1.04, "max": 1.04}
    assert paired_ratios([], "raw") == {}


def test_sentencepiece_bpe_as_hf_tokenizers_same_ids(tmp_path):
    """train_tokenizer --hf-json: the HF tokenizers file gives SentencePiece's ids on every text (runs of
    spaces, digits, byte fallback, empty, the text of <s> / </s> / <unk>) through data_pipeline.tokenizer, and the same EOD; decode round-trips.
    A unigram model is refused."""
    import random

    from data_pipeline import train_tokenizer
    from data_pipeline.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "protein", "kinase", "binding", "cell", "def", "x1", "2024", "(self):"]
    docs = ["".join(rng.choice(words) + rng.choice([" ", "  ", "\n", "    ", ", ", "\t"]) for _ in range(60))
            for _ in range(300)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = str(tmp_path / "t")
    assert train_tokenizer.main(["--input", str(corpus), "--model-prefix", prefix, "--vocab-size", "400",
                                 "--sample-docs", "200", "--hf-json"]) == 0
    sp, hf = Tokenizer(prefix + ".model"), Tokenizer(prefix + ".json")
    texts = docs[:50] + ["", " ", "  lead", "trail  ", "kinase😀 Ω≈ç 123456", "\n\n    def x1(self):", "漢字 binding",
                         'git rebase --strategy <s> </s>', "(?<s>\\g<p>)<unk>"]  # control pieces' text is text
    assert hf.encode_batch(texts) == sp.encode_batch(texts)
    assert (hf.eod_id, hf.vocab_size) == (sp.eod_id, sp.vocab_size)
    assert [hf.decode(ids) for ids in hf.encode_batch(texts)] == texts
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--input", str(corpus), "--model-prefix", prefix, "--model-type", "unigram", "--hf-json"])


def test_hf_conversion_of_a_corpus_without_the_probe_chars_and_refusal(tmp_path, capsys):
    """train_tokenizer --hf-json on a corpus with no digits and no "b" (the conversion's settings probe then
    reads byte-fallback pieces: it refused such models with a traceback before) gives SentencePiece's ids,
    digits and unseen letters included; a model trained with SentencePiece's default normalisation (extra
    whitespace removed) is refused by --to-hf with a one-line error and no file written."""
    import sentencepiece as spm

    from data_pipeline import train_tokenizer
    from data_pipeline.tokenizer import Tokenizer

    words = ["alpha", "gamma", "kinase", "cell", "def", "(self):"]
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(80)) for i in range(200)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = str(tmp_path / "t")
    assert train_tokenizer.main(["--input", str(corpus), "--model-prefix", prefix, "--vocab-size", "300",
                                 "--sample-docs", "200", "--hf-json"]) == 0
    sp, hf = Tokenizer(prefix + ".model"), Tokenizer(prefix + ".json")
    texts = docs[:5] + ["a  b12", "beta 2024  kinase", "x 0.5e-3 Ω"]
    assert hf.encode_batch(texts) == sp.encode_batch(texts)

    other = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=other, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--to-hf", other + ".model"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--to-hf" in err and "only models trained with this module's settings convert" in err
    assert not os.path.exists(other + ".json")
