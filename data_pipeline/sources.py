"""Input discovery, planning and record reading for jsonl[.gz] / parquet / txt[.gz] / Arrow shards.

Planning reads every file once (sha256 for the manifest) and cuts it into *parts* of about
`part_bytes`: uncompressed line files at newline boundaries, parquet files at row-group
boundaries, Arrow IPC streams (HF `save_to_disk`) at record-batch boundaries, so one large file
still spreads over every worker. Gzip files are one part each (they cannot be entered mid-stream).
Records carry 1-based line numbers (row numbers for parquet/Arrow) so rejects can point at them.

Directories are listed recursively; metadata files of HF layouts (`dataset_info.json`,
`state.json`, `dataset_dict.json`, ...) and hidden folders (`.cache/` of a hub snapshot) are
skipped, so a `save_to_disk` folder or a hub snapshot folder can be passed as it is.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import os

import pyarrow.fs as pafs

_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow",
        ".txt": "txt", ".text": "txt"}
_BLOCK = 8 << 20
# HF datasets / hub metadata next to the data files: never documents
_METADATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json", "config.json",
             "dataset_config.json", "tokenizer.json", "tokenizer_config.json"}


def auto_part_bytes(total_bytes: int) -> int:
    """Default part size: ~512 parts per corpus, 1-32 MiB each.

    Depends on the corpus size only (never on the worker count), so the plan, the manifest and a
    resume are the same for any number of workers. Workers pull one part at a time, so with
    hundreds of parts every worker stays busy to the end; 32 MiB bounds a worker's memory."""
    return int(min(32 << 20, max(1 << 20, total_bytes // 512)))


def _skipped(rel: str) -> bool:
    parts = rel.replace(os.sep, "/").split("/")
    return parts[-1] in _METADATA or any(p.startswith(".") for p in parts)


def _in_split(rel: str, split: str | None) -> bool:
    """HF layouts name splits as a folder (`train/0000.parquet`) or a file prefix (`train-00000-of-00002`)."""
    if split is None:
        return True
    return any(p == split or p.startswith(split + "-") or p.startswith(split + ".") or p.startswith(split + "_")
               for p in rel.replace(os.sep, "/").split("/"))


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


def list_inputs(specs: list[str], forced: str = "auto", split: str | None = None) -> list[str]:
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
            rel = i.path[len(path):].lstrip("/")
            if _skipped(rel) or not _in_split(rel, split):
                continue
            if i.type == pafs.FileType.File:
                try:
                    detect_format(i.path, forced)
                    keep.append(i.path)
                except ValueError:
                    pass
        if not keep:
            raise FileNotFoundError(f"--input {spec}: directory holds no input files"
                                    + (f" of split '{split}'" if split else ""))
        scheme = spec.split("://")[0] + "://" if "://" in spec else ""
        out += [scheme + n for n in sorted(keep)]
    return list(dict.fromkeys(out))


def plan_file(uri: str, forced: str, part_bytes: int, txt_mode: str) -> dict:
    """Size, sha256 and parts of one input file (one sequential read; parquet/Arrow also read metadata)."""
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
            if splittable:  # newlines are counted once each: `lines` = newlines before block[at:]
                at = 0
                while cut_at < pos + len(block):
                    i = block.find(b"\n", max(cut_at - pos, 0))
                    if i < 0:
                        break
                    lines += block.count(b"\n", at, i + 1)
                    at = i + 1
                    parts.append({"start": part_start, "end": pos + i + 1, "first_line": part_line})
                    part_start, part_line, cut_at = pos + i + 1, lines + 1, pos + i + 1 + part_bytes
                lines += block.count(b"\n", at)
            pos += len(block)
    info = {"path": uri, "format": fmt, "gzip": gz, "size": pos, "sha256": h.hexdigest(), "parts": parts}
    if fmt in ("parquet", "arrow"):
        _plan_table(info, fs, path, part_bytes)
    elif pos > part_start:
        parts.append({"start": part_start, "end": pos, "first_line": part_line})
    for p in parts:  # plan bytes per part: progress and ETA count these
        p["bytes"] = p["end"] - p["start"] if "rows" not in p else p.pop("bytes_est")
    return info


def _plan_table(info: dict, fs, path: str, part_bytes: int) -> None:
    """Parts of a parquet file (row groups) or an Arrow IPC stream (record batches), ~part_bytes each.

    A part is [start, end) in row groups / batches; its size in the plan is the file size times its
    share of the uncompressed bytes, so the parts of a file add up to the file size."""
    if info["format"] == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            pieces = [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
            info["columns"] = [meta.schema.column(i).name for i in range(len(meta.schema))]
    else:
        with fs.open_input_file(path) as f:
            reader = _open_ipc(f)
            info["columns"] = reader.schema.names
            pieces = [(b.num_rows, b.nbytes) for b in _batches(reader)]
    info["rows"] = sum(n for n, _ in pieces)
    total = max(1, sum(b for _, b in pieces))
    start, acc, row, first = 0, 0, 0, 1
    for i, (n, b) in enumerate(pieces):
        acc += b
        row += n
        if acc >= part_bytes or i == len(pieces) - 1:
            info["parts"].append({"start": start, "end": i + 1, "first_line": first, "rows": row - first + 1,
                                  "bytes_est": acc})
            start, acc, first = i + 1, 0, row + 1
    if info["parts"]:  # scale uncompressed estimates to file bytes; the last part takes the rounding
        scaled = [p["bytes_est"] * info["size"] // total for p in info["parts"]]
        scaled[-1] = info["size"] - sum(scaled[:-1])
        for p, s in zip(info["parts"], scaled):
            p["bytes_est"] = s


def _open_ipc(f):
    """HF `save_to_disk` writes the Arrow IPC *stream* format; also accept the file format."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        return ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        return ipc.open_file(f)


def _batches(reader):
    if hasattr(reader, "num_record_batches"):  # file format
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


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


class _Counting:
    """A stream that counts the bytes read from it (the compressed offset of a gzip file)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, size=-1):
        b = self.f.read(size)
        self.n += len(b)
        return b


class PartReader:
    """Iterate (line_number, record) of one part: bytes per line / per file, or a table cell (str|None).

    `pos` is how much of the part's plan bytes has been read (exact for uncompressed line files,
    from the compressed offset for gzip, by rows for parquet/Arrow): progress and ETA use it."""

    def __init__(self, info: dict, part: dict, field: str, txt_mode: str):
        self.info, self.part, self.field, self.txt_mode, self.pos = info, part, field, txt_mode, 0

    def __iter__(self):
        info, part = self.info, self.part
        fs, path = filesystem(info["path"])
        fmt = info["format"]
        if fmt in ("parquet", "arrow"):
            yield from self._table(fs, path)
            return
        if info["gzip"]:
            with fs.open_input_stream(path, compression=None) as stream:
                raw = _Counting(stream)
                with gzip.GzipFile(fileobj=raw) as f:
                    if fmt == "txt" and self.txt_mode == "file":
                        yield 1, f.read()
                    else:
                        for item in enumerate(_lines(f, None), start=1):
                            self.pos = raw.n
                            yield item
            self.pos = part["bytes"]
            return
        with fs.open_input_file(path) as f:
            f.seek(part["start"])
            if fmt == "txt" and self.txt_mode == "file":
                yield 1, f.read(part["end"] - part["start"])
            else:
                for n, line in enumerate(_lines(f, part["end"] - part["start"]), start=part["first_line"]):
                    self.pos += len(line) + 1
                    yield n, line
        self.pos = part["bytes"]

    def _table(self, fs, path):
        part, n = self.part, self.part["first_line"] - 1
        with fs.open_input_file(path) as f:
            if self.info["format"] == "parquet":
                import pyarrow.parquet as pq

                batches = pq.ParquetFile(f).iter_batches(batch_size=8192, columns=[self.field],
                                                          row_groups=range(part["start"], part["end"]))
                cols = (b.column(0) for b in batches)
            else:
                reader = _open_ipc(f)
                cols = (b.column(self.field) for b in itertools.islice(_batches(reader), part["start"], part["end"]))
            for col in cols:
                for v in col.to_pylist():
                    n += 1
                    yield n, v
                self.pos = part["bytes"] * (n - part["first_line"] + 1) // max(1, part["rows"])


def read_part(info: dict, part: dict, field: str, txt_mode: str):
    """Yield (line_number, record) for one part (see PartReader)."""
    return iter(PartReader(info, part, field, txt_mode))
