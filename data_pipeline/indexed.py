"""Megatron's indexed-dataset file format (`.bin` + `.idx`), written and read with numpy only.

Why our own: importing megatron-core pulls in torch (~5 CPU-s per process), and the tokenize
driver and every worker would pay it only to write a 34-byte header and three arrays. The format
(megatron.core.datasets.indexed_dataset, version 1, no sequence modes):

    .bin  the tokens of every document, back to back, in `dtype`
    .idx  b"MMIDIDX\\x00\\x00" | <Q 1 | <B dtype code | <Q n sequences | <Q n+1 document indices
          | int32 lengths[n] | int64 byte pointers[n] | int64 document indices [0, 1, ..., n]

One document is one sequence here (that is what megatron's `add_document(t, [len(t)])` makes).
tests/test_data_pipeline_units.py checks the bytes against megatron's IndexedDatasetBuilder and
reads our files back with megatron's IndexedDataset.
"""
from __future__ import annotations

import struct

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
          np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_DTYPES = {c: d for d, c in _CODES.items()}
_FIXED = len(HEADER) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> np.dtype:
    """megatron's rule (DType.optimal_dtype): uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def idx_size(n_docs: int) -> int:
    """Exact .idx size for n one-sequence documents (used to verify a finished output)."""
    return _FIXED + 4 * n_docs + 8 * n_docs + 8 * (n_docs + 1)


def idx_bytes(lengths: np.ndarray, dtype) -> bytes:
    """The .idx for documents of these token lengths."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    return b"".join([HEADER, struct.pack("<Q", 1), struct.pack("<B", _CODES[dtype]), struct.pack("<Q", n),
                     struct.pack("<Q", n + 1), lengths.astype(np.int32).tobytes(), pointers.tobytes(),
                     np.arange(n + 1, dtype=np.int64).tobytes()])


def read_index(path_idx: str) -> tuple[np.dtype, np.ndarray]:
    """(dtype, int32 lengths) of an .idx this module (or megatron, one sequence per document) wrote."""
    with open(path_idx, "rb") as f:
        head = f.read(_FIXED)
        if len(head) < _FIXED or head[:len(HEADER)] != HEADER:
            raise ValueError(f"{path_idx}: not a megatron indexed-dataset index (bad header)")
        version, code, n, n_doc = struct.unpack("<QBQQ", head[len(HEADER):])
        if version != 1 or code not in _DTYPES or n_doc != n + 1:
            raise ValueError(f"{path_idx}: unsupported index (version {version}, dtype code {code}, "
                             f"{n} sequences, {n_doc} document indices)")
        raw = f.read(4 * n)
    if len(raw) != 4 * n:
        raise ValueError(f"{path_idx}: truncated ({len(raw)} of {4 * n} bytes of lengths)")
    return _DTYPES[code], np.frombuffer(raw, dtype=np.int32)
