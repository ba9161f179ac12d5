"""Input discovery, planning and record reading for jsonl[.gz] / parquet / txt[.gz] shards.

Planning reads every file once (sha256 for the manifest) and, for uncompressed line files, cuts
them at newline boundaries into byte-range *parts* so one large file still spreads over workers.
Compressed and parquet files are one part each (they cannot be entered mid-stream cheaply).
Records carry 1-based line numbers (row numbers for parquet) so rejects can point at them.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os

import pyarrow.fs as pafs

_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt", ".text": "txt"}
_BLOCK = 8 << 20


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or any pyarrow-supported URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def detect_format(name: str, forced: str = "auto") -> tuple[str, bool]:
    """(format, gzip-compressed) from the file name, or the forced format."""
    low = name.lower()
    gz = low.endswith(".gz")
    if gz:
        low = low[:-3]
    if forced != "auto":
        return forced, gz
    for ext, fmt in _EXT.items():
        if low.endswith(ext):
            if fmt == "parquet" and gz:
                break
            return fmt, gz
    raise ValueError(f"{name}: unknown input format (expected .jsonl/.json/.ndjson/.txt[.gz] or .parquet); "
                     f"pass --format")


def list_inputs(specs: list[str], forced: str = "auto") -> list[str]:
    """Expand files / directories / local globs to a deterministic, duplicate-free list (local: absolute)."""
    out = []
    for spec in specs:
        if "://" not in spec and any(c in spec for c in "*?["):
            found = sorted(os.path.abspath(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"--input {spec}: glob matched no files")
            out += found
            continue
        fs, path = filesystem(spec)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--input {spec}: no such file or directory")
        if info.type != pafs.FileType.Directory:
            out.append(spec if "://" in spec else path)  # absolute: Ray workers may run elsewhere
            continue
        keep = []
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if i.type == pafs.FileType.File:
                try:
                    detect_format(i.path, forced)
                    keep.append(i.path)
                except ValueError:
                    pass
        if not keep:
            raise FileNotFoundError(f"--input {spec}: directory holds no input files")
        scheme = spec.split("://")[0] + "://" if "://" in spec else ""
        out += [scheme + n for n in sorted(keep)]
    return list(dict.fromkeys(out))


def plan_file(uri: str, forced: str, part_bytes: int, txt_mode: str) -> dict:
    """Size, sha256 and parts of one input file (one sequential read)."""
    fmt, gz = detect_format(uri, forced)
    fs, path = filesystem(uri)
    splittable = fmt in ("jsonl", "txt") and not gz and not (fmt == "txt" and txt_mode == "file")
    h, pos, lines, parts = hashlib.sha256(), 0, 0, []
    part_start, part_line, cut_at = 0, 1, part_bytes
    with fs.open_input_stream(path, compression=None) as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)
            if splittable:
                while cut_at < pos + len(block):
                    i = block.find(b"\n", max(cut_at - pos, 0))
                    if i < 0:
                        break
                    end_line = lines + block.count(b"\n", 0, i + 1)
                    parts.append({"start": part_start, "end": pos + i + 1, "first_line": part_line})
                    part_start, part_line, cut_at = pos + i + 1, end_line + 1, pos + i + 1 + part_bytes
                lines += block.count(b"\n")
            pos += len(block)
    if pos > part_start:
        parts.append({"start": part_start, "end": pos, "first_line": part_line})
    info = {"path": uri, "format": fmt, "gzip": gz, "size": pos, "sha256": h.hexdigest(), "parts": parts}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            info["rows"] = meta.num_rows
            info["columns"] = [meta.schema.column(i).name for i in range(len(meta.schema))]
    return info


def _lines(stream, budget: int | None):
    """Yield lines (without the trailing newline) from a binary stream, reading at most `budget` bytes."""
    rest = b""
    while budget is None or budget > 0:
        block = stream.read(_BLOCK if budget is None else min(_BLOCK, budget))
        if not block:
            break
        if budget is not None:
            budget -= len(block)
        pieces = (rest + block).split(b"\n")
        rest = pieces.pop()
        yield from pieces
    if rest:
        yield rest


def read_part(info: dict, part: dict, field: str, txt_mode: str):
    """Yield (line_number, record) for one part: bytes per line / per file, or parquet cell (str|None)."""
    fs, path = filesystem(info["path"])
    fmt = info["format"]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            n = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=[field]):
                for v in batch.column(0).to_pylist():
                    n += 1
                    yield n, v
        return
    if info["gzip"]:
        with fs.open_input_stream(path, compression=None) as raw, gzip.GzipFile(fileobj=raw) as f:
            if fmt == "txt" and txt_mode == "file":
                yield 1, f.read()
            else:
                yield from enumerate(_lines(f, None), start=1)
        return
    with fs.open_input_file(path) as f:
        f.seek(part["start"])
        if fmt == "txt" and txt_mode == "file":
            yield 1, f.read(part["end"] - part["start"])
        else:
            yield from enumerate(_lines(f, part["end"] - part["start"]), start=part["first_line"])
