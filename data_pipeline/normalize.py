"""Document extraction and normalisation: one rule, applied identically everywhere.

Rule (documented in docs/data_pipeline.md): CRLF/CR -> LF, Unicode NFC, then Python ``str.strip()``.
NFC keeps the text visually identical while making equal strings byte-equal (needed for dedup);
nothing stronger (NFKC, whitespace collapsing) so that decode(encode(doc)) returns the stored text.
"""
from __future__ import annotations

import json
import re
import unicodedata

# Reasons a line can be rejected; the manifest counts each, the rejects file records each line.
REASONS = ("invalid_utf8", "bad_json", "not_object", "missing_field", "bad_field_type",
           "invalid_unicode", "binary", "empty", "oversize")
# Characters that do not occur in text: C0/C1 controls other than tab, newline, vertical tab, form feed
# and escape (man pages and source files use those), DEL, and U+FFFD (a decoder already gave up).
_NON_TEXT = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f\ufffd]")
# Every byte but those a _NON_TEXT character's UTF-8 starts with (C0 controls and DEL are single bytes,
# C1 controls are 0xC2 0x80-0x9F, U+FFFD is 0xEF 0xBF 0xBD): deleting these from a document's UTF-8 leaves
# nothing when it cannot hold a _NON_TEXT character, a C-speed pass ~10x cheaper than the regex scan.
_CANNOT_START_NON_TEXT = bytes(b for b in range(256) if not (b <= 0x08 or 0x0e <= b <= 0x1a or 0x1c <= b <= 0x1f
                                                            or b in (0x7f, 0xc2, 0xef)))
BINARY_SHARE = 0.10  # more than this share of non-text characters: the "document" is binary data


def normalise(text: str) -> str:
    """Apply the pipeline's normalisation rule (see module docstring)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.strip()


class Extracted:
    """Outcome for one input record: either ``text`` or a ``reason`` (+ ``detail``)."""

    __slots__ = ("text", "reason", "detail", "has_field", "keys")

    def __init__(self, text=None, reason=None, detail="", has_field=True, keys=None):
        self.text, self.reason, self.detail, self.has_field, self.keys = text, reason, detail, has_field, keys


def _finish(text: str, max_chars: int) -> Extracted:
    try:
        utf8 = text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from JSON \ud800 escapes
        return Extracted(reason="invalid_unicode", detail=f"unencodable character at offset {e.start}")
    norm = normalise(text)  # the same object when the rule changes nothing
    if not norm:
        return Extracted(reason="empty", detail="empty after normalisation")
    if len(norm) > max_chars:
        return Extracted(reason="oversize", detail=f"{len(norm)} chars > --max-doc-chars {max_chars}")
    # the UTF-8 pre-check is of the text before normalisation: valid for the result only if unchanged
    if (norm is not text or utf8.translate(None, _CANNOT_START_NON_TEXT)) and _NON_TEXT.search(norm):
        bad = len(_NON_TEXT.findall(norm))
        if bad > BINARY_SHARE * len(norm):
            return Extracted(reason="binary", detail=f"{bad} of {len(norm)} characters are control or "
                                                     "replacement characters: binary data, not text")
    return Extracted(text=norm)


def extract(raw, fmt: str, field: str, max_chars: int) -> Extracted:
    """Turn one raw record (bytes for jsonl/txt, str-or-None for parquet/arrow) into text or a reject."""
    if fmt in ("parquet", "arrow"):
        if raw is None:
            return Extracted(reason="missing_field", detail=f"null '{field}'", has_field=False)
        if not isinstance(raw, str):
            return Extracted(reason="bad_field_type", detail=f"'{field}' is {type(raw).__name__}")
        return _finish(raw, max_chars)
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Extracted(reason="invalid_utf8", detail=f"byte {e.start}: {e.reason}", has_field=False)
    if fmt == "txt":
        return _finish(s, max_chars)
    if not s.strip():
        return Extracted(reason="empty", detail="blank line", has_field=False)
    try:
        obj = json.loads(s)
    except ValueError as e:
        return Extracted(reason="bad_json", detail=str(e), has_field=False)
    if not isinstance(obj, dict):
        return Extracted(reason="not_object", detail=f"JSON {type(obj).__name__}, expected object", has_field=False)
    val = obj.get(field)
    if val is None:
        return Extracted(reason="missing_field", detail=f"no '{field}'", has_field=False, keys=sorted(obj)[:20])
    if not isinstance(val, str):
        return Extracted(reason="bad_field_type", detail=f"'{field}' is {type(val).__name__}")
    return _finish(val, max_chars)
