"""CLI: tokenize jsonl[.gz] / parquet / txt / Arrow shards into a megatron-core indexed dataset on Ray.

    python -m data_pipeline.tokenize --input data/*.jsonl.gz --tokenizer tok.model \
        --output-prefix out/biomed_text_document [--field text] [--dedup] [--workers 8] [--address auto]

Restarting with the same arguments resumes: finished units (see store.py) are skipped and the
final merge runs in unit order, so the output bytes equal those of one uninterrupted run.
Workers are plain Ray actors fed one part at a time by the driver (see `_schedule`), so every
worker stays busy to the end without any knob; `--workers 1` on the local machine runs its one
worker in the driver's process instead (`_run_local`: no Ray start-up). Neither the driver nor the workers import torch
or megatron-core (the indexed dataset is written by data_pipeline.indexed).
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from data_pipeline import indexed, store
from data_pipeline.guard import PipelineError, output_lock, verify_outputs
from data_pipeline.report import Progress, human, summary_table
from data_pipeline.normalize import extract
from data_pipeline.sources import auto_part_bytes, filesystem, list_inputs, plan_file, read_part

MANIFEST_VERSION = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_pipeline.tokenize", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, directories, local globs or pyarrow URIs")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx/.manifest.json/.rejects.jsonl")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or HF tokenizer.json (or its dir)")
    p.add_argument("--eod-token", default=None, help="token appended to every document (default: eos)")
    p.add_argument("--field", default="text", help="JSON key / parquet column holding the text")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "parquet", "arrow", "txt"))
    p.add_argument("--split", default=None,
                   help="directory inputs: only files of this split (HF layouts: train/..., train-00000-of-...)")
    p.add_argument("--txt-mode", default="line", choices=("line", "file"), help="txt: document per line or per file")
    p.add_argument("--unit-lines", type=int, default=2000, help="records per work unit / shard")
    p.add_argument("--part-bytes", type=int, default=None,
                   help="work part / unit size in input bytes (default: corpus/512, 1-32 MiB); bounds worker memory")
    p.add_argument("--max-doc-chars", type=int, default=1_000_000, help="longer documents are rejected")
    p.add_argument("--encode-batch-chars", type=int, default=None,
                   help="characters of text per tokenizer call (default 1 MiB, worker.ENCODE_BATCH_CHARS); "
                        "output bytes do not depend on it; a call never spans a unit (<= --part-bytes of input)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (first one wins)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer actors (default: the Ray cluster's CPUs minus one for the driver; "
                        "1 without --address: in this process, no Ray)")
    p.add_argument("--address", default=None, help="existing Ray cluster (e.g. auto); default: local Ray")
    p.add_argument("--keep-work", action="store_true", help="keep <prefix>.work/ unit shards after merging")
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    a = p.parse_args(argv)
    for name in ("unit_lines", "part_bytes", "max_doc_chars", "encode_batch_chars", "workers"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def _settings(a, tok) -> dict:
    """Everything that changes output bytes; a restart must match these exactly."""
    return {"field": a.field, "format": a.format, "txt_mode": a.txt_mode, "unit_lines": a.unit_lines,
            "part_bytes": a.part_bytes, "max_doc_chars": a.max_doc_chars, "dedup": a.dedup,
            "tokenizer_sha256": tok.sha256, "eod_id": tok.eod_id, "normalisation": "CRLF->LF, NFC, strip"}


def _plan(a) -> list[dict]:
    """List the inputs, fix the part size (auto: from the corpus size), read each file once."""
    uris = list_inputs(a.input, a.format, a.split)
    sizes = {}
    for u in uris:
        fs, path = filesystem(u)
        sizes[u] = fs.get_file_info(path).size or 0
    if not sum(sizes.values()):
        raise PipelineError(f"{', '.join(uris[:3])}{' ...' if len(uris) > 3 else ''}: input is empty (0 bytes); "
                            "nothing to tokenize: check --input")
    if a.part_bytes is None:
        a.part_bytes = auto_part_bytes(sum(sizes.values()))
    for u in uris:
        if not sizes[u]:
            print(f"[tokenize] WARNING {u}: empty file (0 bytes), skipped", flush=True)
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


def _pending_tasks(prefix: str, files: list[dict]) -> tuple[list[dict], int]:
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
            tasks.append({"file_i": fi, "part_i": pi, "info": slim, "part": part, "done": done})
    # largest parts first (gzip files are one part each), equal ones in input order: the small last
    # parts of each file come at the end, where they fill the gaps between finishing workers
    tasks.sort(key=lambda t: -t["part"]["bytes"])
    return tasks, done_units


def _record(progress: Progress, rec: dict) -> None:
    """A worker's unit record into the progress (or its one-line error raised)."""
    if "error" in rec:
        raise PipelineError(rec["error"])
    progress.add(rec.get("docs", 0), rec.get("tokens", 0), rec.get("rejected", 0), rec["busy_s"],
                 rec.get("ready_t"), rec.get("done_t"), rec["cpu_s"], rec["pos"], unit="unit" in rec, worker=rec.get("worker"))


def _schedule(ray, actors: list, tasks: list[dict], progress: Progress) -> None:
    """One part in flight per actor; a free actor takes the next part (largest first). Each part is
    a streaming generator of unit records, so progress moves while a big gzip file is processed."""
    pending, idle, running = list(reversed(tasks)), list(actors), {}
    while pending or running:
        while idle and pending:
            actor = idle.pop()
            running[actor.process.remote(pending.pop())] = actor
        ready, _ = ray.wait(list(running), num_returns=1, timeout=progress.interval)
        for gen in ready:
            try:
                rec = ray.get(next(gen))
            except StopIteration:
                idle.append(running.pop(gen))
                continue
            except ray.exceptions.RayError as e:  # a worker process died (OOM kill, node loss)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PipelineError(f"a tokenize worker failed ({type(e).__name__}: {first[:300]}); "
                                    "re-run the same command to resume") from None
            _record(progress, rec)
        progress.tick()


def _run_local(tasks: list[dict], cfg: dict, progress: Progress) -> None:
    """`--workers 1` without `--address`: the one worker runs in this process, in the same part order
    and with the same unit files as on Ray (so resuming either way gives the same bytes). Why: Ray's
    start-up and daemons cost 5-11 CPU-s a run (5-7% of the 460 MB corpus' tokenization, measured:
    docs/data_pipeline.md), which one worker on one machine does not need."""
    from data_pipeline.worker import TokenizeWorker

    worker = TokenizeWorker(cfg)
    for task in tasks:
        for rec in worker.process(task):
            _record(progress, rec)


def _run_ray(a, tasks: list[dict], cfg: dict, progress: Progress) -> None:
    import ray

    from data_pipeline.raylife import actor_options
    from data_pipeline.worker import TokenizeWorker

    # glibc gives each thread of a Ray worker (gRPC, the task thread) its own malloc arena and keeps
    # freed memory in them: measured, a worker grew 64 -> 416 MB anonymous memory over 25 parts of 1 MiB
    # with the default and stayed flat at ~110 MB with one arena. Two arenas bound it the same way
    # (raylife.WORKER_ENV: MALLOC_ARENA_MAX=2).
    remote = ray.remote(**actor_options())(TokenizeWorker)
    actors = [remote.remote(cfg) for _ in range(min(a.workers, len(tasks)))]
    try:
        _schedule(ray, actors, tasks, progress)
    finally:
        for actor in actors:
            ray.kill(actor)


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
    prefix = a.output_prefix
    out_dir = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise store.OutputError(out_dir, e) from None
    with output_lock(prefix):  # one run per output prefix
        return _run_locked(a, prefix)


def _run_locked(a, prefix: str) -> dict:
    from data_pipeline.tokenizer import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer(a.tokenizer, a.eod_token)
    dtype = indexed.token_dtype(tok.vocab_size)
    print(f"[tokenize] tokenizer {tok.kind} vocab_size={tok.vocab_size} eod_id={tok.eod_id} dtype={dtype.name}",
          flush=True)
    mpath = prefix + ".manifest.json"
    if a.part_bytes is None and os.path.exists(mpath):  # resume with the part size the run was planned with
        try:
            a.part_bytes = int(store.read_json(mpath)["settings"]["part_bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    files = _plan(a)
    for f in files:
        if f["format"] in ("parquet", "arrow") and a.field not in f["columns"]:
            raise SystemExit(f"{f['path']}: text field '{a.field}' is not a column (columns: {f['columns']}); "
                             "pass --field")
    _warn_missing_field(files, a.field, a.txt_mode)
    settings = _settings(a, tok)
    old = _check_resume(mpath, settings, files)
    if old is not None and old.get("complete"):
        problems = verify_outputs(prefix, old)
        if not problems:
            print(f"[tokenize] {mpath} is complete (outputs verified); nothing to do\n" + summary_table(old),
                  flush=True)
            return old
        for p in problems:
            print(f"[tokenize] WARNING {p}; rebuilding the output", flush=True)
    manifest = {"version": MANIFEST_VERSION, "complete": False, "settings": settings,
                "tokenizer": tok.describe(), "dtype": dtype.name, "files": files,
                "output": {"bin": prefix + ".bin", "idx": prefix + ".idx", "rejects": prefix + ".rejects.jsonl"}}
    store.write_json(mpath, manifest)
    try:
        os.makedirs(store.work_dir(prefix), exist_ok=True)
    except OSError as e:
        raise store.OutputError(store.work_dir(prefix), e) from None
    tasks, done_units = _pending_tasks(prefix, files)
    print(f"[tokenize] {len(files)} files, {human(sum(f['size'] for f in files) / 1)}B, "
          f"{sum(len(f['parts']) for f in files)} parts of <= {a.part_bytes / 2**20:.1f} MiB; "
          f"{len(tasks)} parts to process, {done_units} units already done", flush=True)
    progress = Progress(a.progress_interval, total_bytes=sum(t["part"]["bytes"] for t in tasks))
    ray_seconds = 0.0
    if tasks:
        cfg = {"tokenizer": os.path.abspath(tok.path), "eod_token": a.eod_token,
               "output_prefix": os.path.abspath(prefix), "field": a.field, "txt_mode": a.txt_mode,
               "unit_lines": a.unit_lines, "part_bytes": a.part_bytes, "max_doc_chars": a.max_doc_chars,
               "dedup": a.dedup, "encode_batch_chars": a.encode_batch_chars}
        if a.workers == 1 and not a.address:
            print("[tokenize] 1 worker, in this process (Ray runs --workers 2+ or --address)", flush=True)
            _run_local(tasks, cfg, progress)
        else:
            from data_pipeline.raylife import connect, default_workers

            with connect(a.address, a.workers, max_workers=len(tasks)) as ray:
                if a.workers is None:
                    a.workers = default_workers(ray)
                print(f"[tokenize] {a.workers} worker(s) on Ray {'at ' + a.address if a.address else '(local)'}",
                      flush=True)
                t_ray = time.perf_counter()
                _run_ray(a, tasks, cfg, progress)
                ray_seconds = time.perf_counter() - t_ray
        progress.print()
    units = _collect(prefix, files)
    _check_field(files, units, a.field)
    _check_not_empty(files, units)
    from data_pipeline.merge import merge

    merge(prefix, units, dtype, a.dedup)
    _aggregate(manifest, units)
    manifest["output"]["bytes"] = {k: os.path.getsize(manifest["output"][k]) for k in ("bin", "idx", "rejects")}
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
                        "worker_cpu_s": progress.cpu, "units_by_worker": sorted(progress.by_worker.values())}
    return manifest


def _check_not_empty(files: list[dict], units: list[dict]) -> None:
    """A run that yields no document is an error naming the inputs (training would fail later, unnamed)."""
    if sum(u["docs_written"] for u in units):
        return
    reasons = Counter()
    for u in units:
        reasons.update(u["rejected"])
    names = ", ".join(f["path"] for f in files[:3]) + (" ..." if len(files) > 3 else "")
    why = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "no records"
    raise PipelineError(f"{names}: no documents to write ({sum(u['lines'] for u in units)} records read; "
                        f"rejected: {why}); check --input / --field / --format")


def main(argv=None) -> int:
    """CLI entry: every expected failure is one line on stderr naming the file, exit status 1 or 2."""
    from data_pipeline.raylife import exit_on_signals

    exit_on_signals()
    try:
        run(argv)
    except (PipelineError, store.OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
