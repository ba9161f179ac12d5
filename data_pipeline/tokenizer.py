"""The model's tokenizer behind one small interface: SentencePiece `.model` or HF `tokenizer.json`.

EOD is the id appended after every document; training configs need it as `data.eod_id`, so it is
resolved here once (SentencePiece eos, or a known end-of-text special token for HF) and recorded.
"""
from __future__ import annotations

import hashlib
import os

_HF_EOD = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """encode_batch(list[str]) -> list[list[int]] without special tokens; decode(ids) -> str;
    encode_batch_arrays(list[str]) -> list of numpy int arrays, the same ids (None if unsupported)."""

    encode_batch_arrays = None

    def __init__(self, path: str, eod_token: str | None = None):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tokenizer {path}: no such file")
        self.path, self.sha256 = path, file_sha256(path)
        if path.endswith(".json"):
            self._init_hf(eod_token)
        else:
            self._init_sp(eod_token)

    def _init_sp(self, eod_token):
        import sentencepiece as spm

        self.kind = "sentencepiece"
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        if eod_token is not None:
            self.eod_id = self._sp.piece_to_id(eod_token)
            if self._sp.id_to_piece(self.eod_id) != eod_token:
                raise ValueError(f"--eod-token {eod_token!r} is not a piece of {self.path}")
        else:
            self.eod_id = self._sp.eos_id()
            if self.eod_id < 0:
                raise ValueError(f"{self.path} has no eos piece; pass --eod-token")
        self.encode_batch = lambda texts: self._sp.encode(texts, out_type=int, num_threads=1)
        self.decode = lambda ids: self._sp.decode(list(map(int, ids)))
        self.encode_batch_arrays = self._sp_arrays()

    def _sp_arrays(self):
        """A SentencePiece whose encode takes `return_type="numpy"` (the 0.2.3 of this venv) returns a
        batch's ids as int32 numpy arrays straight from its C++ buffers: no Python int per token to
        create, copy into numpy and free (docs/data_pipeline.md: the worker's Python-side CPU halves).
        None where the installed version lacks it or returns other ids (checked once on a probe text)."""
        probe = ["probe: Caf\u00e9 \u4e2d\u6587 12345"]
        try:
            arrays = self._sp.encode(probe, return_type="numpy", num_threads=1)
        except (TypeError, ValueError):
            return None
        if [a.tolist() for a in arrays] != self.encode_batch(probe):
            return None
        return lambda texts: self._sp.encode(texts, return_type="numpy", num_threads=1)

    def _init_hf(self, eod_token):
        from tokenizers import Tokenizer as HF

        self.kind = "hf"
        self._tok = HF.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = (eod_token,) if eod_token is not None else _HF_EOD
        ids = [(n, self._tok.token_to_id(n)) for n in names]
        ids = [(n, i) for n, i in ids if i is not None]
        if not ids:
            raise ValueError(f"{self.path}: none of {list(names)} is a token; pass --eod-token")
        self.eod_token, self.eod_id = ids[0]
        # encode_batch_fast skips offsets (not needed here): the same ids, less work per token
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.encode_batch = lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]
        self.decode = lambda ids: self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def describe(self) -> dict:
        return {"path": self.path, "kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eod_id": self.eod_id}
