"""The in-process `--workers 1` run against raw SentencePiece: where the CPU goes, under equal conditions.

    python bench/dp_inproc_vs_raw.py split --kind raw|ours --input corpus.jsonl --tokenizer tok.model --workdir DIR
    python bench/dp_inproc_vs_raw.py same-core --input corpus.jsonl --tokenizer tok.model --workdir DIR [--reps 2]
        [--arena2] [--core 1]
    python bench/dp_inproc_vs_raw.py threads --input corpus.jsonl --tokenizer tok.model --workdir DIR
        [--after 60] [--window 60]
    python bench/dp_inproc_vs_raw.py lists --input corpus.jsonl --tokenizer tok.model [--docs 2000]

split: one whole run in this process, raw's loop (data_pipeline.bench's `--_peer raw`: json.loads,
batches of 256, int lists) or `python -m data_pipeline.tokenize --workers 1` (in-process), with
process CPU (`time.process_time`, every thread: SentencePiece encodes in a thread it starts per call)
around every SentencePiece call. Prints one JSON line: total CPU (getrusage), the encode calls' CPU,
the rest, the threads alive at the end with their CPU.

same-core: raw (the bench's own `--_peer raw` process) and the tokenize command started at the same
moment, all pinned to one core, so they time-share it and see the same host conditions (on a shared
VM identical runs one after the other differ by up to 15%); CPU of each from wait4. `--arena2` adds a
third process, the tokenize command with MALLOC_ARENA_MAX=2 (what Ray's workers get). Superseded by
`python -m data_pipeline.bench --paired N` (the same pairing inside the bench, whole-tree CPU from /proc,
per-round ratios and their median, `--ours-variant` for A/Bs); kept to reproduce the figures recorded
with it (results/data_pipeline/inproc_vs_raw/) and for the environment-only `--arena2` variant.

threads: starts the tokenize command and reads /proc/<pid>/task of it at `after` and `after + window`
seconds: CPU per thread over the window (threads that ended in between count in the process total only).

lists: the same batches encoded as int lists (raw's call) and as numpy arrays (ours), alternating in
one process: the CPU raw's encode calls spend on Python ints that ours does not.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_TICK = os.sysconf("SC_CLK_TCK")


def _tokenize_cmd(a, prefix: str) -> list[str]:
    return [sys.executable, "-m", "data_pipeline.tokenize", "--input", a.input, "--tokenizer", a.tokenizer,
            "--output-prefix", prefix, "--workers", "1", "--progress-interval", "10", "--max-doc-chars", str(10**9)]


def _clean(prefix: str) -> None:
    for ext in (".bin", ".idx", ".manifest.json"):
        if os.path.exists(prefix + ext):
            os.remove(prefix + ext)
    shutil.rmtree(prefix + ".work", ignore_errors=True)


def _threads(pid) -> dict:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s.rsplit(")", 1)[1].split()
        out[t] = (s[s.index("(") + 1:s.rindex(")")], (int(rest[11]) + int(rest[12])) / _TICK)
    return out


def split(a) -> None:
    acc = {"enc": 0.0, "calls": 0, "chars": 0}

    def timed(f):
        def w(batch):
            c = time.process_time()
            r = f(batch)
            acc["enc"] += time.process_time() - c
            acc["calls"] += 1
            acc["chars"] += sum(map(len, batch))
            return r
        return w

    if a.kind == "raw":  # data_pipeline.bench._peer_raw, encode timed
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
        from data_pipeline.bench import raw_loop

        n = raw_loop(a.input, timed(lambda batch: sp.encode(batch, out_type=int, num_threads=1)))
    else:
        import contextlib
        import io

        from data_pipeline import tokenize, tokenizer

        init = tokenizer.Tokenizer._init_sp

        def init_timed(self, eod):
            init(self, eod)
            if self.encode_batch_arrays is not None:
                self.encode_batch_arrays = timed(self.encode_batch_arrays)

        tokenizer.Tokenizer._init_sp = init_timed
        prefix = os.path.join(a.workdir, "split")
        _clean(prefix)
        with contextlib.redirect_stdout(io.StringIO()):
            assert tokenize.main(_tokenize_cmd(a, prefix)[3:]) == 0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    total = ru.ru_utime + ru.ru_stime
    print(json.dumps({"kind": a.kind, "cpu_s": round(total, 2), "user_s": round(ru.ru_utime, 2),
                      "sys_s": round(ru.ru_stime, 2), "encode_calls_cpu_s": round(acc["enc"], 2),
                      "rest_cpu_s": round(total - acc["enc"], 2), "encode_calls": acc["calls"], "chars": acc["chars"],
                      "threads_at_end_cpu_s": {f"{n} ({t})": round(c, 2) for t, (n, c) in _threads("self").items()}}))


def same_core(a) -> None:
    raw = [sys.executable, "-m", "data_pipeline.bench", "--_peer", "raw", a.input, a.tokenizer]
    runs = [("raw", raw, {}), ("ours", _tokenize_cmd(a, os.path.join(a.workdir, "same_ours")), {})]
    if a.arena2:
        runs.append(("ours MALLOC_ARENA_MAX=2", _tokenize_cmd(a, os.path.join(a.workdir, "same_arena2")),
                     {"MALLOC_ARENA_MAX": "2"}))
    env = dict(os.environ, PYTHONPATH=ROOT)
    for r in range(a.reps):
        order = runs[r % len(runs):] + runs[:r % len(runs)]  # who starts first rotates
        for _, cmd, _ in runs[1:]:  # a finished output would make the next run a no-op
            _clean(cmd[cmd.index("--output-prefix") + 1])
        procs, t0 = {}, time.perf_counter()
        for name, cmd, extra in order:
            p = subprocess.Popen(cmd, env=dict(env, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 preexec_fn=lambda: os.sched_setaffinity(0, {a.core}))
            procs[p.pid] = name
        got = {}
        while procs:
            pid, status, ru = os.wait4(-1, 0)
            if pid in procs:
                got[procs.pop(pid)] = {"cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "rc": os.waitstatus_to_exitcode(status),
                                       "wall_s": round(time.perf_counter() - t0, 1)}
        for v in got.values():
            v["vs_raw"] = round(v["cpu_s"] / got["raw"]["cpu_s"], 4)
        got["load_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps({"rep": r, **got}), flush=True)


def threads(a) -> None:
    _clean(os.path.join(a.workdir, "threads"))
    p = subprocess.Popen(_tokenize_cmd(a, os.path.join(a.workdir, "threads")), stdout=subprocess.DEVNULL,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    time.sleep(a.after)
    before = _threads(p.pid)
    with open(f"/proc/{p.pid}/stat") as f:
        r0 = f.read().rsplit(")", 1)[1].split()
    time.sleep(a.window)
    after = _threads(p.pid)
    with open(f"/proc/{p.pid}/stat") as f:
        r1 = f.read().rsplit(")", 1)[1].split()
    process = (int(r1[11]) + int(r1[12]) - int(r0[11]) - int(r0[12])) / _TICK
    per = {f"{n} ({t}{'' if t in before else ', started in window'})": round(c - before.get(t, (n, 0.0))[1], 2)
           for t, (n, c) in after.items()}
    print(json.dumps({"window_s": a.window, "process_cpu_s": round(process, 2),
                      "threads_alive_at_end": dict(sorted(per.items(), key=lambda kv: -kv[1])),
                      "ended_threads_cpu_s": round(process - sum(per.values()), 2)}), flush=True)
    p.wait()


def lists(a) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    with open(a.input, "rb") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(a.docs), f)]
    batches = [texts[i:i + 100] for i in range(0, len(texts), 100)]
    acc = {"int": 0.0, "numpy": 0.0}
    for rep in range(2):
        for b in batches:
            for kind in (("int", "numpy") if rep == 0 else ("numpy", "int")):
                c = time.process_time()
                if kind == "int":
                    r = sp.encode(b, out_type=int, num_threads=1)
                else:
                    r = sp.encode(b, return_type="numpy", num_threads=1)
                del r
                acc[kind] += time.process_time() - c
    chars = 2 * sum(map(len, texts))
    print(json.dumps({"int_lists_cpu_s": round(acc["int"], 3), "numpy_cpu_s": round(acc["numpy"], 3), "chars": chars,
                      "lists_extra_cpu_s_per_100M_chars": round((acc["int"] - acc["numpy"]) / chars * 1e8, 3)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("split", "same-core", "threads", "lists"))
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--workdir", default=".")
    p.add_argument("--kind", choices=("raw", "ours"), default="ours")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--arena2", action="store_true")
    p.add_argument("--after", type=float, default=60)
    p.add_argument("--window", type=float, default=60)
    p.add_argument("--docs", type=int, default=2000)
    a = p.parse_args()
    a.input, a.tokenizer = os.path.abspath(a.input), os.path.abspath(a.tokenizer)
    os.makedirs(a.workdir, exist_ok=True)
    {"split": split, "same-core": same_core, "threads": threads, "lists": lists}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
