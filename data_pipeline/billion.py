"""The billion-token benchmark: one `data_pipeline.tokenize` run, measured over time, optionally killed
from outside part-way and resumed, then read back and checked.

    python -m data_pipeline.billion --input big.jsonl --tokenizer tok32k.model --workdir bb --name full
    python -m data_pipeline.billion --input big.jsonl --tokenizer tok32k.model --workdir bb --name resumed \\
        --kill-at 0.5 --reference bb/full

Runs `python -m data_pipeline.tokenize --input ... --tokenizer ... --output-prefix <workdir>/<name>
--workers N` (default settings otherwise) as its own process tree and samples the tree from /proc
(data_pipeline.bench.TreeMonitor) every `--sample-period` s: RSS of the whole tree and of its
largest process, CPU seconds, process count, and the load average of the machine. With `--kill-at F`
the driver is SIGKILLed once its progress line says F of the input MB are read, the leftover
processes are counted 10 s later, and the same command is run again (it resumes). Then the output is
checked: manifest complete, megatron's `IndexedDataset` reads it (document count and token sum
equal the manifest), every document ends with the EOD id, and `--check-docs` documents spread over
the dataset are exactly SentencePiece's encode of their corpus line (+ EOD) and decode back to it; with `--reference` the `.bin`, `.idx`, manifest and rejects
are compared byte for byte with another run's. Everything goes to `<workdir>/<name>.bench.json`
(timeline thinned to one row per `--keep-every` samples) and one summary line per phase.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

from data_pipeline.bench import TreeMonitor

_PROGRESS = re.compile(r"\s([\d.]+)/([\d.]+) MB \(")


def _phase(cmd: list[str], env: dict, log: str, period: float, kill_at: float | None, work: str) -> dict:
    t0 = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    mon = TreeMonitor(proc.pid, period=period, timeline=True)
    loads, killed_at, pos = [], None, 0
    with open(log) as f:
        f.seek(0, os.SEEK_END)
        while proc.poll() is None:
            time.sleep(period)
            loads.append((round(time.perf_counter() - t0, 1), os.getloadavg()[0]))
            for line in f.readlines():
                m = _PROGRESS.search(line)
                if m and float(m.group(2)) > 0:
                    pos = float(m.group(1)) / float(m.group(2))
                    if kill_at is not None and killed_at is None and pos >= kill_at:
                        os.kill(proc.pid, signal.SIGKILL)  # from outside, no chance to clean up
                        killed_at = {"t": round(time.perf_counter() - t0, 1), "fraction_read": pos, "line": line.strip()}
    wall = time.perf_counter() - t0
    rc = proc.wait()
    left = None
    if killed_at is not None:
        time.sleep(1)
        killed_at["work_listing"] = sorted(os.listdir(work)) if os.path.isdir(work) else []
        time.sleep(9)  # the watchdog kills what is left of the Ray tree once the driver's pipe closes
        left = [pid for pid in mon.cpu if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]
    time.sleep(0.5)
    cpu = mon.stop()
    tl = mon.timeline or []
    return {"cmd": cmd, "rc": rc, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_tree_gb": round(mon.peak_tree / 1e9, 3), "peak_one_gb": round(mon.peak_one / 1e9, 3),
            "killed": killed_at, "processes_left_10s_after_kill": left, "timeline": tl, "load": loads}


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _thin(tl: list, every: int) -> list:
    return [r for i, r in enumerate(tl) if i % every == 0 or i == len(tl) - 1]


def check(prefix: str, corpus: str, tokenizer: str, n_docs: int) -> dict:
    """Read the dataset back (megatron's reader), EOD after every document, sampled documents decode."""
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_pipeline.normalize import normalise

    with open(prefix + ".manifest.json") as f:
        man = json.load(f)
    t = man["totals"]
    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths.astype(np.int64)
    out = {"complete": man.get("complete"), "docs_read": t["docs_read"], "docs_rejected": t["docs_rejected"],
           "docs_written": t["docs_written"], "tokens": t["tokens"], "megatron_len": len(ds),
           "megatron_token_sum": int(lengths.sum()), "eod_id": man["tokenizer"]["eod_id"], "dtype": man["dtype"],
           "bin_bytes": os.path.getsize(prefix + ".bin"), "idx_bytes": os.path.getsize(prefix + ".idx")}
    tokens = np.memmap(prefix + ".bin", dtype=np.dtype(man["dtype"]), mode="r")
    ends = ds.index.sequence_pointers // tokens.itemsize + lengths - 1
    out["docs_ending_with_eod"] = int((tokens[ends] == out["eod_id"]).sum())
    rejected = set()
    with open(prefix + ".rejects.jsonl") as f:
        for line in f:
            rejected.add(json.loads(line)["line"])
    want = sorted(set(np.linspace(0, len(ds) - 1, n_docs).astype(int).tolist()))
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    ok, doc, wi = 0, 0, 0
    with open(corpus, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if wi == len(want):
                break
            if lineno in rejected:
                continue
            if doc == want[wi]:
                ids = ds[doc].tolist()
                text = normalise(json.loads(line)["text"])
                ok += ids == sp.encode(text) + [out["eod_id"]] and sp.decode(ids[:-1]) == text
                wi += 1
            doc += 1
    out["sampled_docs"], out["sampled_docs_equal_raw_encode_and_decode"] = len(want), ok
    return out


def check_parts(prefix: str, corpus: str, tokenizer: str, listing: list[str], n_random: int, seed: int = 0) -> dict:
    """Every document of the parts a kill cut in two (units on disk, no `.done.json`, per the work-dir
    listing taken after the kill), of the parts finished before the kill, and of parts done after it
    (`n_random` of each, chosen with `seed`): tokens equal SentencePiece's encode of the corpus line + EOD."""
    import random

    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_pipeline.normalize import normalise

    with open(prefix + ".manifest.json") as f:
        man = json.load(f)
    eod = man["tokenizer"]["eod_id"]
    units = man["units"]  # in dataset order
    part_of = lambda name: name[:14]  # fFFFFFF-pPPPPP
    done = {n[:14] for n in listing if n.endswith(".done.json")}
    had_units = {n[:14] for n in listing if n.endswith(".json") and not n.endswith(".done.json") and "-c" in n}
    cut = sorted(had_units - done)
    all_parts = sorted({part_of(u["unit"]) for u in units})
    rng = random.Random(seed)
    before = rng.sample(sorted(done), min(n_random, len(done)))
    after_pool = [x for x in all_parts if x not in done and x not in had_units]
    after = rng.sample(after_pool, min(n_random, len(after_pool)))
    chosen = set(cut) | set(before) | set(after)
    # line ranges and first document index of the chosen parts
    ranges, doc = [], 0
    for u in units:
        if part_of(u["unit"]) in chosen:
            ranges.append((u["first_line"], u["first_line"] + u["docs_read"], doc))
        doc += u["docs_written"]
    rejected = set()
    with open(prefix + ".rejects.jsonl") as f:
        for line in f:
            rejected.add(json.loads(line)["line"])
    ds = IndexedDataset(prefix)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    ranges.sort()
    checked = equal = tokens = 0
    ri = 0
    with open(corpus, "rb") as f:
        for lineno, line in enumerate(f, 1):
            while ri < len(ranges) and lineno >= ranges[ri][1]:
                ri += 1
            if ri == len(ranges):
                break
            lo, hi, first_doc = ranges[ri]
            if lineno < lo:
                continue
            if lineno == lo:
                d = first_doc
            if lineno in rejected:
                continue
            ids = np.asarray(ds[d])
            want = sp.encode(normalise(json.loads(line)["text"])) + [eod]
            checked, tokens = checked + 1, tokens + len(ids)
            equal += len(ids) == len(want) and bool((ids == np.asarray(want)).all())
            d += 1
    return {"parts_cut_by_kill": cut, "parts_done_before_kill_checked": sorted(before),
            "parts_done_after_kill_checked": sorted(after), "docs_checked": checked, "tokens_checked": tokens,
            "docs_equal_raw_encode": equal}


def _same(a: str, b: str) -> bool:
    if not (os.path.exists(a) and os.path.exists(b)) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.billion", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--name", default="full")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kill-at", type=float, default=None, help="SIGKILL the driver at this fraction of the input read")
    p.add_argument("--reference", default=None, help="output prefix of another run to compare byte for byte")
    p.add_argument("--sample-period", type=float, default=1.0)
    p.add_argument("--keep-every", type=int, default=5)
    p.add_argument("--check-docs", type=int, default=2000)
    p.add_argument("--progress-interval", default="10", help="passed to tokenize")
    p.add_argument("--check-parts", type=int, default=5,
                   help="with --kill-at: re-encode every document of the parts the kill cut and of this many parts "
                        "finished before / after it")
    p.add_argument("--check-only", default=None,
                   help="only run the checks on an existing output, the work-dir listing after the kill in this file")
    p.add_argument("--ray-worker-niceness", default="0",
                   help="RAY_worker_niceness for the run's local Ray (Ray's own default is 15, which on a machine "
                        "loaded by others starves the workers; the peers' workers run at 0)")
    a = p.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    prefix = os.path.join(a.workdir, a.name)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH")) if x),
               RAY_worker_niceness=a.ray_worker_niceness)
    cmd = [sys.executable, "-m", "data_pipeline.tokenize", "--input", a.input, "--tokenizer", a.tokenizer,
           "--output-prefix", prefix, "--workers", str(a.workers), "--progress-interval", a.progress_interval]
    log = prefix + ".log"
    if a.check_only:
        with open(a.check_only) as f:
            listing = f.read().split()
        res = {"check": check(prefix, a.input, a.tokenizer, a.check_docs),
               "check_parts": check_parts(prefix, a.input, a.tokenizer, listing, a.check_parts)}
        print(json.dumps(res), flush=True)
        with open(prefix + ".check.json", "w") as f:
            json.dump(res, f, indent=1)
        return 0
    res = {"input": a.input, "input_bytes": os.path.getsize(a.input), "cpus": os.cpu_count(), "phases": []}
    kill = a.kill_at
    while True:
        ph = _phase(cmd, env, log, a.sample_period, kill, prefix + ".work")
        print(f"[billion] phase {len(res['phases']) + 1}: rc {ph['rc']} wall {ph['wall_s']}s cpu {ph['cpu_s']}s "
              f"peak {ph['peak_tree_gb']}/{ph['peak_one_gb']} GB "
              f"killed {ph['killed'] and {k: v for k, v in ph['killed'].items() if k != 'work_listing'}} "
              f"left {ph['processes_left_10s_after_kill']}", flush=True)
        ph["timeline"], ph["load"] = _thin(ph["timeline"], a.keep_every), _thin(ph["load"], a.keep_every)
        res["phases"].append(ph)
        if ph["killed"] is None:
            break
        kill = None  # the resume runs to the end
    res["wall_s"] = round(sum(ph["wall_s"] for ph in res["phases"]), 1)
    res["cpu_s"] = round(sum(ph["cpu_s"] for ph in res["phases"]), 1)
    if res["phases"][-1]["rc"] == 0:
        res["check"] = check(prefix, a.input, a.tokenizer, a.check_docs)
        print(f"[billion] check: {json.dumps(res['check'])}", flush=True)
        killed = next((ph["killed"] for ph in res["phases"] if ph["killed"]), None)
        if killed:
            res["check_parts"] = check_parts(prefix, a.input, a.tokenizer, killed["work_listing"], a.check_parts)
            print(f"[billion] check_parts: {json.dumps(res['check_parts'])}", flush=True)
        if a.reference:
            res["identical_to_reference"] = {ext: _same(prefix + ext, a.reference + ext)
                                             for ext in (".bin", ".idx", ".manifest.json", ".rejects.jsonl")}
            print(f"[billion] identical to {a.reference}: {res['identical_to_reference']}", flush=True)
    with open(prefix + ".bench.json", "w") as f:
        json.dump(res, f, indent=1)
    return 0 if res["phases"][-1]["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
