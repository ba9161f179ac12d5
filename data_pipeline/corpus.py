"""A benchmark corpus of real text no one here wrote: this machine's Python sources, docs, man pages.

    python -m data_pipeline.corpus --output corpus.jsonl --target-mb 460
    python -m data_pipeline.corpus --output big.jsonl --target-mb 3600 --archives \
        --roots /usr/share /usr/lib /opt ~/.pyenv

One document per file (Python stdlib and site-packages sources and docs, /usr/share/doc,
/usr/share/man pages, gunzipped), exact duplicates and binary files skipped, files in sorted
order so the corpus is the same on the same machine. Used by `python -m data_pipeline.bench`.
`--roots` adds folders after the default ones (a folder already walked is not walked again);
with `--archives` the text members of the wheels / zip / tar(.gz) archives found under any root
are documents too (one per member, same rules). Documents are never repeated unless `--repeat` is given: then, when the
unique text runs out before the target, the same documents are written again in the same order
(a corpus for throughput only; the count of repeated documents is printed and returned).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import sysconfig
import tarfile
import zipfile

from data_pipeline.normalize import normalise

_TEXT_EXT = {".py", ".pyi", ".txt", ".md", ".rst", ".h", ".hpp", ".c", ".cc", ".cpp", ".cu", ".cuh", ".html",
             ".css", ".js", ".ts", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".sh", ".tex", ".pxd", ".pyx",
             ".proto", ".el", ".pl", ".tcl", ".svg", ".xml", ".csv", ".json"}
MAX_DOC_BYTES = 1 << 20


def roots() -> list[str]:
    """Where real text lives on a Linux machine with Python (no absolute paths of this project)."""
    paths = sysconfig.get_paths()
    out = ["/usr/share/doc", "/usr/share/man", "/usr/share/common-licenses", paths["stdlib"], paths["purelib"]]
    return [r for r in dict.fromkeys(os.path.realpath(p) for p in out) if os.path.isdir(r)]


_ARCHIVES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar", ".crate")
MAX_ARCHIVE_BYTES = 1 << 30


def _wanted(path: str) -> bool:
    name = path.lower()
    base = name[:-3] if name.endswith(".gz") else name
    in_docs = "/share/doc/" in path or "/share/man/" in path or "common-licenses" in path
    return os.path.splitext(base)[1] in _TEXT_EXT or in_docs


def _decode(data: bytes) -> str | None:
    if len(data) > MAX_DOC_BYTES or len(data) < 200 or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read(path: str) -> str | None:
    if not _wanted(path):
        return None
    try:
        if os.path.getsize(path) > MAX_DOC_BYTES:
            return None
        with (gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")) as f:
            data = f.read(MAX_DOC_BYTES + 1)
    except (OSError, EOFError):
        return None
    return _decode(data)


def _archive_texts(path: str):
    """Text members of a wheel / zip / tar archive, in member-name order (nothing if unreadable)."""
    name = path.lower()
    try:
        if os.path.getsize(path) > MAX_ARCHIVE_BYTES:
            return
        if name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(path) as z:
                infos = sorted((i for i in z.infolist() if not i.is_dir()), key=lambda i: i.filename)
                for i in infos:
                    if i.file_size <= MAX_DOC_BYTES and _wanted(i.filename) and not i.filename.endswith(".gz"):
                        text = _decode(z.read(i))
                        if text is not None:
                            yield text
        else:
            with tarfile.open(path) as t:
                members = sorted((m for m in t.getmembers() if m.isfile()), key=lambda m: m.name)
                for m in members:
                    if m.size <= MAX_DOC_BYTES and _wanted(m.name) and not m.name.endswith(".gz"):
                        f = t.extractfile(m)
                        text = _decode(f.read()) if f is not None else None
                        if text is not None:
                            yield text
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, RuntimeError, ValueError):
        return


def _texts(all_roots: list[str], archives: bool = False):
    """Every candidate text under the roots, in a fixed order; a root (or a folder inside a root)
    that is another root already walked is skipped."""
    walked: set[str] = set()
    for root in all_roots:
        if root in walked:
            continue
        for d, dirs, files in os.walk(root):
            walked.add(os.path.realpath(d))
            dirs[:] = sorted(x for x in dirs if os.path.realpath(os.path.join(d, x)) not in walked
                             and not os.path.islink(os.path.join(d, x)))
            for fn in sorted(files):
                path = os.path.join(d, fn)
                if os.path.islink(path):
                    continue
                if archives and fn.lower().endswith(_ARCHIVES):
                    yield from _archive_texts(path)
                    continue
                text = _read(path)
                if text is not None:
                    yield text


def build(output: str, target_bytes: int, extra_roots: list[str] | None = None, repeat: bool = False,
          archives: bool = False) -> dict:
    """Write up to target_bytes of JSONL ({"text": ...} per line); returns counts."""
    all_roots = roots() + [r for r in dict.fromkeys(os.path.realpath(os.path.expanduser(p)) for p in extra_roots or [])
                           if os.path.isdir(r)]
    seen, n, size = set(), 0, 0
    with open(output, "w") as out:
        for text in _texts(all_roots, archives):
            # stored normalised, so every contender of the benchmark (Megatron's
            # preprocess_data does no normalisation) writes the same tokens
            text = normalise(text)
            if not text:
                continue
            h = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if h in seen:
                continue
            seen.add(h)
            line = json.dumps({"text": text}) + "\n"
            out.write(line)
            n, size = n + 1, size + len(line)
            if size >= target_bytes:
                return {"docs": n, "unique_docs": n, "bytes": size, "unique_bytes": size, "repeated_docs": 0}
    unique = {"docs": n, "unique_docs": n, "bytes": size, "unique_bytes": size, "repeated_docs": 0}
    if not repeat or n == 0 or size >= target_bytes:
        return unique
    # unique text ran out: the same lines again, in the same order (said in the output and the counts)
    with open(output, "rb") as src, open(output, "ab") as out:
        while size < target_bytes:
            src.seek(0)
            for _ in range(unique["docs"]):
                line = src.readline()
                out.write(line)
                n, size = n + 1, size + len(line)
                if size >= target_bytes:
                    break
    return {**unique, "docs": n, "bytes": size, "repeated_docs": n - unique["docs"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.corpus", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--target-mb", type=float, default=460)
    p.add_argument("--roots", nargs="*", default=[], help="more folders to walk after the default ones")
    p.add_argument("--archives", action="store_true",
                   help="also read the text members of wheel / zip / tar(.gz) archives found under the roots")
    p.add_argument("--repeat", action="store_true",
                   help="if the unique text runs out, write the same documents again (throughput corpora only)")
    a = p.parse_args(argv)
    r = build(a.output, int(a.target_mb * 1e6), a.roots, a.repeat, a.archives)
    print(f"[corpus] {a.output}: {r['docs']} documents, {r['bytes'] / 1e6:.1f} MB "
          f"({r['unique_docs']} unique documents, {r['unique_bytes'] / 1e6:.1f} MB; "
          f"{r['repeated_docs']} repeated)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
