"""data_pipeline pieces without Ray: normalisation, planning into parts, record extraction, tokenizer training."""
import gzip
import json
import unicodedata

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


def test_parts_cover_file_exactly(tmp_path):
    """Parts cut at newlines; reading all parts gives exactly the file's lines with their line numbers."""
    lines = [json.dumps({"text": "w" * (i % 37)}).encode() for i in range(500)] + [b"", b"last-no-newline"]
    data = b"\n".join(lines)
    p = tmp_path / "a.jsonl"
    p.write_bytes(data)
    info = plan_file(str(p), "auto", 1000, "line")
    assert info["size"] == len(data) and len(info["parts"]) > 5
    import hashlib

    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert [pt["start"] for pt in info["parts"][1:]] == [pt["end"] for pt in info["parts"][:-1]]
    assert info["parts"][-1]["end"] == len(data)
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
