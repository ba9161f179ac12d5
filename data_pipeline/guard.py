"""Guards around one tokenize run: the output-prefix lock and the check of a finished output.

Why: two runs writing one prefix interleave unit files and merge over each other; and a
"complete" manifest says nothing about whether `<prefix>.bin/.idx` are still whole (a truncated
copy, a deleted file). Both used to pass silently.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

from data_pipeline import indexed, store


class PipelineError(Exception):
    """An expected failure; its message is one line naming the file or folder and what to do."""


@contextlib.contextmanager
def output_lock(prefix: str):
    """Exclusive lock on `<prefix>.lock` for the whole run. flock is released by the kernel when the
    process dies, so a killed run never leaves a stale lock; the file itself stays (harmless)."""
    path = prefix + ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise store.OutputError(path, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise PipelineError(f"{path}: another tokenize run (pid {holder}) is writing output prefix {prefix}; "
                                "wait for it to finish or use another --output-prefix") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def verify_outputs(prefix: str, manifest: dict) -> list[str]:
    """Problems of a finished output against its manifest (empty list: the output is whole).

    Checks sizes (tokens x itemsize for .bin, the exact .idx size for the document count, the
    recorded rejects size) and the document count and dtype in the .idx header."""
    t, dtype = manifest["totals"], indexed.np.dtype(manifest["dtype"])
    want = {".bin": t["tokens"] * dtype.itemsize, ".idx": indexed.idx_size(t["docs_written"])}
    recorded = manifest.get("output", {}).get("bytes", {})
    if "rejects" in recorded:
        want[".rejects.jsonl"] = recorded["rejects"]
    problems = []
    for ext, size in want.items():
        path = prefix + ext
        if not os.path.exists(path):
            problems.append(f"{path}: missing (manifest says complete)")
        elif os.path.getsize(path) != size:
            problems.append(f"{path}: {os.path.getsize(path)} bytes, manifest expects {size}")
    if not problems:
        try:
            got_dtype, lengths = indexed.read_index(prefix + ".idx")
        except ValueError as e:
            return [str(e)]
        if got_dtype != dtype or len(lengths) != t["docs_written"] or int(lengths.sum(dtype="int64")) != t["tokens"]:
            problems.append(f"{prefix}.idx: {len(lengths)} documents / {int(lengths.sum())} tokens of {got_dtype}, "
                            f"manifest says {t['docs_written']} / {t['tokens']} of {dtype}")
    return problems
