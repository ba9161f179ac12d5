"""Check the token data against the model before training: ids inside the vocabulary, files whole.

Without this, a token id >= the model's vocabulary crashes an embedding lookup at TP=1 but, at
TP>1, lands in another rank's vocabulary shard and trains silently on garbage (megatron's
vocab-parallel embedding masks out-of-range ids to zero), and an `eod_id` outside the vocabulary
trains silently too. An empty dataset or a `.bin` shorter than its `.idx` says fails later without
naming the file. Every error here is one line naming the config key and the file.

The largest id is known without reading the data when the `.bin` dtype cannot hold an id >= the
vocabulary (uint8 data, vocabulary >= 256) or when the data pipeline's complete manifest
(`<prefix>.manifest.json`) records a tokenizer whose vocabulary fits; otherwise the `.bin` is
scanned once per start, in chunks (about a second per GB).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

_CHUNK = 1 << 26  # tokens per scan step


class TokenError(ValueError):
    pass


def model_vocab_size(cfg) -> int:
    """The vocabulary the model is built with (from `model.hf_dir`'s config.json when given)."""
    if cfg.model.hf_dir:
        from mora_dist.training.model import llama_spec

        return llama_spec(cfg.model).vocab_size
    return cfg.model.vocab_size


def datasets(cfg) -> list[tuple[str, str]]:
    """(config key, prefix) of every dataset the run reads."""
    out = [(f"data.train[{i}].path", item["path"]) for i, item in enumerate(cfg.data.train)]
    for name in ("eval_domain", "eval_general"):
        if getattr(cfg.data, name):
            out.append((f"data.{name}", getattr(cfg.data, name)))
    return out


def _index(prefix: str):
    """(dtype, number of sequences, bytes the index addresses in the .bin)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, _IndexReader

    with open(prefix + ".idx", "rb") as f:
        head = f.read(18)
    if len(head) < 18 or head[:9] != _INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise ValueError("not a megatron indexed dataset index (bad header)")
    dtype = DType.dtype_from_code(head[17])
    idx = _IndexReader(prefix + ".idx", multimodal=False)
    n = len(idx.sequence_lengths)
    end = int(idx.sequence_pointers[-1]) + int(idx.sequence_lengths[-1]) * np.dtype(dtype).itemsize if n else 0
    return dtype, n, end


def _manifest_tokenizer(prefix: str) -> dict:
    """The tokenizer data_pipeline recorded for a complete output ({} when there is none)."""
    try:
        with open(prefix + ".manifest.json") as f:
            m = json.load(f)
        return dict(m["tokenizer"]) if m.get("complete") else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def max_token_id(prefix: str, dtype, n_bytes: int) -> int:
    """Largest id in the first `n_bytes` of `<prefix>.bin` (-1 for negative ids in signed data)."""
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(n_bytes // np.dtype(dtype).itemsize,))
    hi, lo = -1, 0
    for s in range(0, len(data), _CHUNK):
        part = data[s:s + _CHUNK]
        hi, lo = max(hi, int(part.max())), min(lo, int(part.min()))
    return -1 if lo < 0 else hi


def check_token_ids(cfg) -> list[str]:
    """Raise TokenError naming the key and file of the first problem; return notes to print."""
    vocab, notes = model_vocab_size(cfg), []
    src = f"model.hf_dir {cfg.model.hf_dir}" if cfg.model.hf_dir else "model.vocab_size"
    eod = cfg.data.eod_id
    if not 0 <= eod < vocab:
        raise TokenError(f"data.eod_id={eod} is outside the model vocabulary ({vocab} tokens, from {src}); "
                         "set the eod id the data was tokenized with")
    for key, prefix in datasets(cfg):
        try:
            dtype, seqs, end = _index(prefix)
        except (OSError, ValueError, AssertionError) as e:
            raise TokenError(f"{key}: {prefix}.idx is unreadable ({e}); re-run the tokenizer") from None
        if seqs == 0:
            raise TokenError(f"{key}: {prefix} holds no documents; tokenize some text or remove it from the config")
        if not os.path.isfile(prefix + ".bin"):
            raise TokenError(f"{key}: {prefix}.bin not found (the .idx is there); re-run the tokenizer")
        size = os.path.getsize(prefix + ".bin")
        if size < end:
            raise TokenError(f"{key}: {prefix}.bin has {size} bytes but {prefix}.idx indexes {end} "
                             "(truncated, or from another tokenize run); re-run the tokenizer")
        tok = _manifest_tokenizer(prefix)
        if "eod_id" in tok and tok["eod_id"] != eod:
            notes.append(f"warning: data.eod_id={eod} but {prefix} was tokenized with eod_id={tok['eod_id']} "
                         f"({prefix}.manifest.json)")
        if np.issubdtype(dtype, np.unsignedinteger) and np.iinfo(dtype).max < vocab:
            continue  # the dtype cannot hold an id outside the vocabulary
        if isinstance(tok.get("vocab_size"), int) and tok["vocab_size"] <= vocab:
            continue
        top = max_token_id(prefix, dtype, end)
        if top < 0:
            raise TokenError(f"{key}: {prefix}.bin holds negative token ids; re-run the tokenizer")
        if top >= vocab:
            raise TokenError(f"{key}: {prefix}.bin holds token id {top} but the model vocabulary has {vocab} tokens "
                             f"(from {src}); tokenize with the model's tokenizer or fix the model vocabulary")
    return notes
