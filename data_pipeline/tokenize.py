"""CLI: tokenize jsonl[.gz] / parquet / txt shards into a megatron-core indexed dataset on Ray Data.

    python -m data_pipeline.tokenize --input data/*.jsonl.gz --tokenizer tok.model \
        --output-prefix out/biomed_text_document [--field text] [--dedup] [--workers 8] [--address auto]

Restarting with the same arguments resumes: finished units (see store.py) are skipped and the
final merge runs in unit order, so the output bytes equal those of one uninterrupted run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from data_pipeline import store
from data_pipeline.report import Progress, human, summary_table
from data_pipeline.normalize import extract
from data_pipeline.sources import list_inputs, plan_file, read_part

MANIFEST_VERSION = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_pipeline.tokenize", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, directories, local globs or pyarrow URIs")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx/.manifest.json/.rejects.jsonl")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or HF tokenizer.json (or its dir)")
    p.add_argument("--eod-token", default=None, help="token appended to every document (default: eos)")
    p.add_argument("--field", default="text", help="JSON key / parquet column holding the text")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "parquet", "txt"))
    p.add_argument("--txt-mode", default="line", choices=("line", "file"), help="txt: document per line or per file")
    p.add_argument("--unit-lines", type=int, default=2000, help="records per work unit / shard")
    p.add_argument("--part-bytes", type=int, default=256 << 20, help="split uncompressed line files this often")
    p.add_argument("--max-doc-chars", type=int, default=1_000_000, help="longer documents are rejected")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (first one wins)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer actors (default: the Ray cluster's CPUs minus one for the driver)")
    p.add_argument("--address", default=None, help="existing Ray cluster (e.g. auto); default: local Ray")
    p.add_argument("--keep-work", action="store_true", help="keep <prefix>.work/ unit shards after merging")
    p.add_argument("--progress-interval", type=float, default=5.0)
    a = p.parse_args(argv)
    for name in ("unit_lines", "part_bytes", "max_doc_chars", "workers"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def _settings(a, tok) -> dict:
    """Everything that changes output bytes; a restart must match these exactly."""
    return {"field": a.field, "format": a.format, "txt_mode": a.txt_mode, "unit_lines": a.unit_lines,
            "part_bytes": a.part_bytes, "max_doc_chars": a.max_doc_chars, "dedup": a.dedup,
            "tokenizer_sha256": tok.sha256, "eod_id": tok.eod_id, "normalisation": "CRLF->LF, NFC, strip"}


def _plan(a) -> list[dict]:
    uris = list_inputs(a.input, a.format)
    with ThreadPoolExecutor(min(8, len(uris))) as ex:
        return list(ex.map(lambda u: plan_file(u, a.format, a.part_bytes, a.txt_mode), uris))


def _check_resume(path: str, settings: dict, files: list[dict]):
    """Load an existing manifest and refuse to mix runs with different settings or inputs."""
    if not os.path.exists(path):
        return None
    old = store.read_json(path)
    diff = [k for k in settings if old["settings"].get(k) != settings[k]]
    if diff:
        raise SystemExit(f"{path}: existing run used different settings {diff} "
                         f"(old {[old['settings'].get(k) for k in diff]}, new {[settings[k] for k in diff]}); "
                         "use another --output-prefix or delete the old outputs")
    old_files = [(f["path"], f["size"], f["sha256"]) for f in old["files"]]
    new_files = [(f["path"], f["size"], f["sha256"]) for f in files]
    if old_files != new_files:
        changed = [n for n, o in zip(new_files, old_files) if n != o] or new_files[len(old_files):] or old_files
        raise SystemExit(f"{path}: inputs changed since the run started (first difference: {changed[0][0]}); "
                         "use another --output-prefix or delete the old outputs")
    return old


def _warn_missing_field(files: list[dict], field: str, txt_mode: str, n: int = 200, max_files: int = 4) -> None:
    """Early hint (the exact check runs at the end): the first records of a jsonl file lack the field.
    Only the first few files are peeked, so start-up stays cheap on corpora of thousands of shards."""
    for info in [f for f in files if f["format"] == "jsonl" and f["parts"]][:max_files]:
        gen = read_part(info, info["parts"][0], field, txt_mode)
        try:
            recs = list(itertools.islice(gen, n))
        except Exception:  # unreadable input is reported, with its name, by the worker that reads it
            continue
        finally:
            gen.close()
        outs = [extract(raw, "jsonl", field, 1 << 62) for _, raw in recs]
        objects = [o for o in outs if o.has_field or o.reason == "missing_field"]
        if objects and not any(o.has_field for o in objects):
            keys = next((o.keys for o in objects if o.keys), None)
            print(f"[tokenize] WARNING {info['path']}: none of the first {len(outs)} lines has '{field}' "
                  f"(keys: {keys}); wrong --field?", flush=True)


def _pending_tasks(prefix: str, files: list[dict]) -> tuple[list[str], int]:
    work = store.work_dir(prefix)
    tasks, done_units = [], 0
    existing = set(os.listdir(work))
    for fi, info in enumerate(files):
        slim = {k: v for k, v in info.items() if k != "parts"}
        for pi, part in enumerate(info["parts"]):
            pname = store.part_name(fi, pi)
            done = sorted(n[:-5] for n in existing if n.startswith(pname + "-c") and n.endswith(".json"))
            done_units += len(done)
            if pname + ".done.json" in existing:
                continue
            tasks.append(json.dumps({"file_i": fi, "part_i": pi, "info": slim, "part": part, "done": done}))
    return tasks, done_units


def _run_ray(a, tasks: list[str], cfg: dict, progress: Progress) -> None:
    import ray

    from data_pipeline.worker import UnitProcessor

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    ctx.target_max_block_size = 1024  # rows are tiny unit records: emit each as produced (live progress)
    ds = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=len(tasks))
    pool = ray.data.ActorPoolStrategy(size=min(a.workers, len(tasks)))
    ds = ds.map_batches(UnitProcessor, fn_constructor_kwargs={"cfg": cfg}, batch_size=1, batch_format="numpy",
                        compute=pool, num_cpus=1)
    for row in ds.iter_rows():
        progress.add(int(row["docs"]), int(row["tokens"]), int(row["rejected"]), float(row["busy_s"]),
                     float(row["ready_t"]), float(row["done_t"]), float(row["cpu_s"]))


def _collect(prefix: str, files: list[dict]) -> list[dict]:
    work = store.work_dir(prefix)
    units = []
    for fi, info in enumerate(files):
        for pi in range(len(info["parts"])):
            n = store.read_json(os.path.join(work, store.part_name(fi, pi) + ".done.json"))["chunks"]
            units += [store.read_json(os.path.join(work, store.unit_name(fi, pi, c) + ".json")) for c in range(n)]
    return units


def _check_field(files: list[dict], units: list[dict], field: str) -> None:
    """A text field missing from every record of a file is a configuration error, not bad data."""
    for fi, info in enumerate(files):
        us = [u for u in units if u["file"] == fi]
        missing = sum(u["rejected"].get("missing_field", 0) for u in us)
        if missing and not sum(u["has_field"] for u in us):
            keys = next((u["keys_seen"] for u in us if u["keys_seen"]), None)
            raise SystemExit(f"{info['path']}: text field '{field}' is missing in every line ({missing} lines); "
                             f"keys present: {keys}; pass --field")


def _aggregate(manifest: dict, units: list[dict]) -> None:
    def counts(us):
        reasons = Counter()
        for u in us:
            reasons.update(u["rejected"])
        return {"docs_read": sum(u["lines"] for u in us), "docs_rejected": sum(reasons.values()),
                "rejected_by_reason": dict(sorted(reasons.items())), "duplicates": sum(u["duplicates"] for u in us),
                "docs_written": sum(u["docs_final"] for u in us), "tokens": sum(u["tokens_final"] for u in us)}

    for fi, f in enumerate(manifest["files"]):
        f.update(counts([u for u in units if u["file"] == fi]))
    manifest["totals"] = counts(units)
    manifest["units"] = [{"unit": u["unit"], "first_line": u["first_line"], "docs_read": u["lines"],
                          "docs_rejected": sum(u["rejected"].values()), "rejected_by_reason": u["rejected"],
                          "docs_written": u["docs_final"], "duplicates": u["duplicates"],
                          "tokens": u["tokens_final"]} for u in units]


def run(argv=None) -> dict:
    """Run (or resume) the pipeline; returns the final manifest."""
    a = parse_args(argv)
    from data_pipeline.tokenizer import Tokenizer

    t0 = time.perf_counter()
    prefix = a.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tok = Tokenizer(a.tokenizer, a.eod_token)
    dtype = store.token_dtype(tok.vocab_size)
    print(f"[tokenize] tokenizer {tok.kind} vocab_size={tok.vocab_size} eod_id={tok.eod_id} dtype={dtype.__name__}",
          flush=True)
    files = _plan(a)
    for f in files:
        if f["format"] == "parquet" and a.field not in f["columns"]:
            raise SystemExit(f"{f['path']}: text field '{a.field}' is not a column (columns: {f['columns']}); "
                             "pass --field")
    _warn_missing_field(files, a.field, a.txt_mode)
    settings = _settings(a, tok)
    mpath = prefix + ".manifest.json"
    old = _check_resume(mpath, settings, files)
    if old is not None and old.get("complete"):
        print(f"[tokenize] {mpath} is complete; nothing to do\n" + summary_table(old), flush=True)
        return old
    manifest = {"version": MANIFEST_VERSION, "complete": False, "settings": settings,
                "tokenizer": tok.describe(), "dtype": dtype.__name__, "files": files,
                "output": {"bin": prefix + ".bin", "idx": prefix + ".idx", "rejects": prefix + ".rejects.jsonl"}}
    store.write_json(mpath, manifest)
    os.makedirs(store.work_dir(prefix), exist_ok=True)
    tasks, done_units = _pending_tasks(prefix, files)
    print(f"[tokenize] {len(files)} files, {sum(len(f['parts']) for f in files)} parts; "
          f"{len(tasks)} parts to process, {done_units} units already done", flush=True)
    progress, ray_seconds = Progress(a.progress_interval), 0.0
    if tasks:
        import ray

        own_ray = not ray.is_initialized()
        if own_ray:
            # workers import data_pipeline from this checkout (shared filesystem, like the outputs)
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(address=a.address or "local", include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}},
                     **({} if a.address else {"num_cpus": max(a.workers or 1, os.cpu_count() or 1)}))
        if a.workers is None:
            a.workers = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
        print(f"[tokenize] {a.workers} worker(s) on Ray {'at ' + a.address if a.address else '(local)'}", flush=True)
        cfg = {"tokenizer": os.path.abspath(tok.path), "eod_token": a.eod_token,
               "output_prefix": os.path.abspath(prefix), "field": a.field, "txt_mode": a.txt_mode,
               "unit_lines": a.unit_lines, "max_doc_chars": a.max_doc_chars, "dedup": a.dedup}
        t_ray = time.perf_counter()
        try:
            _run_ray(a, tasks, cfg, progress)
            ray_seconds = time.perf_counter() - t_ray
        finally:
            if own_ray:
                ray.shutdown()
        progress.print()
    units = _collect(prefix, files)
    _check_field(files, units, a.field)
    from data_pipeline.merge import merge

    merge(prefix, units, dtype, a.dedup)
    _aggregate(manifest, units)
    manifest["complete"] = True
    store.write_json(mpath, manifest)
    if not a.keep_work:
        shutil.rmtree(store.work_dir(prefix), ignore_errors=True)
    el = time.perf_counter() - t0
    t = manifest["totals"]
    print(summary_table(manifest), flush=True)
    print(f"[tokenize] done in {el:.1f}s: {human(progress.tokens)} tokens tokenized this run "
          f"({human(progress.tokens / max(el, 1e-9))} tok/s); {t['docs_rejected']} rejected -> "
          f"{manifest['output']['rejects']}; data.eod_id={tok.eod_id}", flush=True)
    # not written to disk: timings would make the manifest differ between identical runs
    steady = progress.last_done - progress.first_ready if progress.first_ready is not None else 0.0
    manifest["_run"] = {"seconds": el, "ray_seconds": ray_seconds, "steady_seconds": steady,
                        "tokens_this_run": progress.tokens, "worker_busy_s": progress.busy,
                        "worker_cpu_s": progress.cpu}
    return manifest


def main(argv=None) -> int:
    try:
        run(argv)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
