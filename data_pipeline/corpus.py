"""A benchmark corpus of real text no one here wrote: this machine's Python sources, docs, man pages.

    python -m data_pipeline.corpus --output corpus.jsonl --target-mb 460

One document per file (Python stdlib and site-packages sources and docs, /usr/share/doc,
/usr/share/man pages, gunzipped), exact duplicates and binary files skipped, files in sorted
order so the corpus is the same on the same machine. Used by `python -m data_pipeline.bench`.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import sysconfig

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


def _read(path: str) -> str | None:
    name = path.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    ext = os.path.splitext(base)[1]
    in_docs = "/share/doc/" in path or "/share/man/" in path or "common-licenses" in path
    if ext not in _TEXT_EXT and not in_docs:
        return None
    try:
        if os.path.getsize(path) > MAX_DOC_BYTES:
            return None
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            data = f.read(MAX_DOC_BYTES + 1)
    except (OSError, EOFError):
        return None
    if len(data) > MAX_DOC_BYTES or len(data) < 200 or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def build(output: str, target_bytes: int) -> dict:
    """Write up to target_bytes of JSONL ({"text": ...} per line); returns counts."""
    seen, n, size = set(), 0, 0
    with open(output, "w") as out:
        for root in roots():
            for d, dirs, files in os.walk(root):
                dirs.sort()
                for fn in sorted(files):
                    path = os.path.join(d, fn)
                    if os.path.islink(path):
                        continue
                    text = _read(path)
                    if text is None:
                        continue
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
                        return {"docs": n, "bytes": size}
    return {"docs": n, "bytes": size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.corpus", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--target-mb", type=float, default=460)
    a = p.parse_args(argv)
    r = build(a.output, int(a.target_mb * 1e6))
    print(f"[corpus] {a.output}: {r['docs']} documents, {r['bytes'] / 1e6:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
