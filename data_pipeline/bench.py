"""Benchmark: our pipeline against raw SentencePiece and its peers, same corpus, same tokenizer.

    python -m data_pipeline.bench [--input corpus.jsonl --tokenizer tok.model] [--corpus-mb 460]
        [--workers 1 2] [--megatron-lm PATH/TO/Megatron-LM] [--repeat 1] [--only raw ours hf megatron]
        [--paired 1] [--pair-cores 1] [--ours-variant NAME 'TOKENIZE ARGS'] [--compare-tree PATH/TO/older/checkout]

Without --input it builds a corpus of real text from this machine (data_pipeline.corpus) and
trains a SentencePiece BPE 32k on it. Every contender runs as its own process tree:

  raw       one process: read the JSONL, json.loads, SentencePiece encode (no output): the per-core ceiling
  ours      `python -m data_pipeline.tokenize --workers N` (local Ray started by the run)
  hf        HF `datasets`: load_dataset("json") + .map(num_proc=N) + megatron's IndexedDatasetBuilder
  megatron  Megatron-LM's tools/preprocess_data.py --workers N from a source tree (--megatron-lm)

Whole-tree CPU seconds and memory are sampled from /proc every 0.2 s (every descendant, also
after it is re-parented), and CPU seconds per process kind (driver, each Ray daemon by name, the
tokenize workers; `process_label`). Outputs are compared byte for byte. Ratios printed: CPU per
MB vs raw, wall vs each peer at the same process count, 2 vs 1 worker throughput. With
`--repeat N` the contenders run in N rounds (each once per round, in order), so every run has a raw
run next to it in time (the "same round" ratio). Every run's figures, its load average (min /
median / max) and its per-process breakdown go to `<workdir>/bench.json` (or `--json`).

Paired rounds (`--paired N`, default 1): raw and every 1-worker SentencePiece `ours` run
(`--ours-variant`s, `--compare-tree`) started at the same moment, pinned to `--pair-cores` (default
the last core: they time-share it, so all see the same cache, clock and outside load; with two cores,
raw and each other run one per core, swapped every round), each measured as above. Their CPU over
raw's in the same run, and the median over runs, is the CPU-per-MB target's figure: on a shared VM
identical runs one after the other differ by up to 30%, runs started together on one core by ~1%
(docs/data_pipeline.md, "Paired rounds"). Walls of paired runs feed no wall target.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

_TICK = os.sysconf("SC_CLK_TCK")
# the peers keep documents of any length: so must we, for the same work and byte-identical outputs
_SAME_WORK = ["--max-doc-chars", str(10**9)]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_label(cmdline: list[str]) -> str:
    """What a process of a run is, from its command line: Ray's process titles (`ray::IDLE`,
    `ray::TokenizeWorker` without the method, `ray::DashboardAgent`, ...), a binary's name
    (`gcs_server`, `raylet`), a Python script as its last two path parts (`dashboard/dashboard.py`,
    `_private/log_monitor.py`), `-m module`, or `python -c`."""
    if not cmdline or not cmdline[0]:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0].split(".")[0]
    exe = os.path.basename(cmdline[0])
    if not exe.startswith("python"):
        return exe
    args = [x for x in cmdline[1:] if x not in ("-u", "-S", "-B", "-E", "-s", "-I")]
    if args and args[0] == "-m" and len(args) > 1:
        return "-m " + args[1]
    if args and args[0] == "-c":
        return "python -c"
    if args:
        return "/".join(args[0].split("/")[-2:])
    return exe


class TreeMonitor:
    """Samples CPU time and RSS of a process and all its descendants from /proc; `labels` names each
    process (process_label of its command line; a Ray worker keeps the first title other than
    ray::IDLE it had, so a tokenize worker counts as one even after its actor is killed)."""

    def __init__(self, pid: int, period: float = 0.2, timeline: bool = False):
        self.root, self.period = pid, period
        self.cpu: dict[int, float] = {}
        self.labels: dict[int, str] = {}
        self.peak_tree = self.peak_one = 0
        self.load: list[float] = []  # 1-minute load average at every sample
        # (seconds since start, tree RSS, largest process RSS, tree CPU seconds, processes) per sample
        self.timeline: list[tuple[float, int, int, float, int]] | None = [] if timeline else None
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _stat(self, pid: int):
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # fields after "comm)": state ppid ... utime(12) stime(13) ... rss(22)
        return int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK, int(rest[21]) * _PAGE, rest[0]

    def _loop(self):
        while not self._stop.is_set():
            stats = {}
            for p in os.listdir("/proc"):
                if p.isdigit():
                    s = self._stat(int(p))
                    if s is not None:
                        stats[int(p)] = s
            tree, frontier = {self.root}, [self.root]
            children: dict[int, list[int]] = {}
            for pid, (ppid, *_rest) in stats.items():
                children.setdefault(ppid, []).append(pid)
            while frontier:
                for c in children.get(frontier.pop(), []):
                    if c not in tree:
                        tree.add(c)
                        frontier.append(c)
            tree |= set(self.cpu) & set(stats)  # re-parented descendants stay ours
            rss = one = alive = 0
            for pid in tree:
                if pid in stats and stats[pid][3] != "Z":
                    self.cpu[pid] = max(self.cpu.get(pid, 0.0), stats[pid][1])
                    if not self._final(self.labels.get(pid, "?")):
                        self._label(pid)
                    rss += stats[pid][2]
                    one = max(one, stats[pid][2])
                    alive += 1
            self.peak_one = max(self.peak_one, one)
            self.load.append(os.getloadavg()[0])
            self.peak_tree = max(self.peak_tree, rss)
            if self.timeline is not None:
                self.timeline.append((round(time.perf_counter() - self._t0, 2), rss, one,
                                      round(sum(self.cpu.values()), 2), alive))
            self._stop.wait(self.period)

    @staticmethod
    def _final(label: str) -> bool:  # a worker's title changes (script -> ray::IDLE -> ray::Actor); then stays
        return label == "driver" or (label.startswith("ray::") and label != "ray::IDLE")

    def _label(self, pid: int) -> None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            return
        label = "driver" if pid == self.root else process_label(raw.decode(errors="replace").split("\0"))
        if label != "?" or pid not in self.labels:
            self.labels[pid] = label

    def breakdown(self) -> dict[str, dict]:
        """CPU seconds and process count per label, largest first."""
        out: dict[str, dict] = {}
        for pid, c in self.cpu.items():
            b = out.setdefault(self.labels.get(pid, "?"), {"cpu_s": 0.0, "processes": 0})
            b["cpu_s"] += c
            b["processes"] += 1
        return {k: {"cpu_s": round(v["cpu_s"], 2), "processes": v["processes"]}
                for k, v in sorted(out.items(), key=lambda kv: -kv[1]["cpu_s"])}

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.cpu.values())


def measure(cmd: list[str], env=None, log: str | None = None, cwd: str | None = None,
            cpus: set[int] | None = None) -> dict:
    """Run cmd; wall, whole-tree CPU (max of /proc sampling and wait4 rusage), peak memory. With `cpus`
    the process is pinned to those cores right after its exec (it has one thread then; every thread and
    process it starts inherits the mask); the sampling thread stays wherever this process runs."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if cpus:  # not preexec_fn: it is unsafe with threads (measure_together runs measure in threads)
        os.sched_setaffinity(proc.pid, cpus)
    mon = TreeMonitor(proc.pid)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    time.sleep(0.5)  # let orphaned descendants be sampled once more before they exit
    sampled = mon.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    return {"wall": wall, "cpu": max(sampled, ru.ru_utime + ru.ru_stime), "cpu_sampled": sampled,
            "peak_tree": mon.peak_tree, "peak_one": mon.peak_one, "rc": proc.returncode,
            "by_process": mon.breakdown(), "rusage": {k: round(getattr(ru, "ru_" + k), 3) for k in
                                                      ("utime", "stime", "minflt", "majflt", "nvcsw", "nivcsw")},
            "load_1min": [round(x, 2) for x in (min(mon.load), statistics.median(mon.load), max(mon.load))]}


def measure_together(jobs: list[dict]) -> list[dict]:
    """measure(**job) for every job, all started at the same moment (one thread each, released by a
    barrier): a paired run. Each job's figures are its own process tree's, as in a run alone."""
    got: list[dict | None] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        barrier.wait()
        got[i] = measure(**jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def paired_groups(n: int, cores: list[int], rnd: int) -> list[list[tuple[int, int]]]:
    """The runs of paired round `rnd` for n contenders (index 0: raw): groups started together, each a
    list of (contender, core). One core: one group of all n on it (they time-share the core: same cache,
    clock and outside load). Two or more cores: raw and each other contender as a pair, one process per
    core, the pairs one after the other; raw's core and its partner's swap every round, so over an even
    number of rounds each had each core equally often (each process has a core to itself, as a user's
    run has, which time-sharing can hide)."""
    if len(cores) == 1:
        return [[(i, cores[0]) for i in range(n)]]
    a, b = cores[rnd % len(cores)], cores[(rnd + 1) % len(cores)]
    return [[(0, a), (j, b)] for j in range(1, n)]


def paired_ratios(rounds: list[dict[str, float]], ref: str) -> dict[str, dict]:
    """CPU of every contender over `ref`'s CPU in the same paired run (`rounds`: one {name: CPU} per
    group started together, each with `ref`), per run and the median over runs:
    {name: {"per_round": [...], "median": m, "min": lo, "max": hi}} (ref left out)."""
    names = list(dict.fromkeys(n for r in rounds for n in r if n != ref))
    out = {}
    for n in names:
        per = [r[n] / r[ref] for r in rounds if n in r]
        out[n] = {"per_round": [round(x, 4) for x in per], "median": round(statistics.median(per), 4),
                  "min": round(min(per), 4), "max": round(max(per), 4)}
    return out


# ---- contenders that need a process of their own (run as `python -m data_pipeline.bench --_peer ...`)

def _peer_raw(inp: str, tok: str) -> None:
    """The loop a user would write: read, json.loads, encode in batches (SentencePiece or HF, one thread)."""
    if tok.endswith(".json"):
        os.environ["RAYON_NUM_THREADS"] = "1"
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(tok)
        encode = lambda batch: [e.ids for e in hf.encode_batch_fast(batch, add_special_tokens=False)]
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tok)
        encode = lambda batch: sp.encode(batch, out_type=int, num_threads=1)
    print(f"tokens {raw_loop(inp, encode)}")


def raw_loop(inp: str, encode) -> int:
    """Tokens (no EOD) of a JSONL file's "text" fields through `encode`, 256 documents a call: raw's loop."""
    n, batch = 0, []
    with open(inp, "rb") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 256:
                n += sum(map(len, encode(batch)))
                batch = []
    return n + (sum(map(len, encode(batch))) if batch else 0)


def train_hf_bpe(inp: str, out_json: str, vocab_size: int = 32000, sample_docs: int = 3000) -> str:
    """A byte-level BPE tokenizer.json (HF tokenizers) trained on the first documents of the corpus,
    so the HF path can be compared per core with SentencePiece's on the same text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = []
    with open(inp, "rb") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            if len(docs) >= sample_docs:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(out_json)
    return out_json


def _peer_hf(inp: str, tok: str, out: str, procs: int) -> None:
    import datasets
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=tok)
    eod = sp.eos_id()

    def enc(batch):
        return {"ids": [ids + [eod] for ids in sp.encode(batch["text"], out_type=int, num_threads=1)]}

    ds = datasets.load_dataset("json", data_files=inp, split="train", cache_dir=out + ".cache")
    ds = ds.map(enc, batched=True, batch_size=256, num_proc=procs, remove_columns=ds.column_names)
    builder = IndexedDatasetBuilder(out + ".bin", dtype=np.uint16 if sp.get_piece_size() < 65500 else np.int32)
    for batch in ds.iter(batch_size=1024):
        for ids in batch["ids"]:
            builder.add_document(np.asarray(ids), [len(ids)])
    builder.finalize(out + ".idx")


def _same_files(a: str, b: str) -> bool:
    for ext in (".bin", ".idx"):
        if not (os.path.exists(a + ext) and os.path.exists(b + ext)):
            return False
        if os.path.getsize(a + ext) != os.path.getsize(b + ext):
            return False
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            while True:
                x, y = fa.read(16 << 20), fb.read(16 << 20)
                if x != y:
                    return False
                if not x:
                    break
    return True


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_peer":
        kind, *rest = sys.argv[2:]
        if kind == "raw":
            _peer_raw(*rest)
        else:
            _peer_hf(rest[0], rest[1], rest[2], int(rest[3]))
        return 0
    p = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=__doc__.split("\n")[0])
    p.add_argument("--input", default=None, help="one JSONL file ({'text': ...} per line)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: BPE 32k trained on the corpus)")
    p.add_argument("--corpus-mb", type=float, default=460)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--only", nargs="+", default=["raw", "ours", "hf", "megatron"])
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                   help="Megatron-LM source tree (its tools/preprocess_data.py); default $MEGATRON_LM")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every contender one after the other (0: none)")
    p.add_argument("--paired", type=int, default=1, metavar="N",
                   help="paired rounds: raw and every 1-worker `ours` run started at the same moment, pinned to "
                        "--pair-cores; their CPU ratios (per round, median) are the CPU-per-MB target's figure "
                        "(0: none)")
    p.add_argument("--pair-cores", type=int, nargs="+", default=None,
                   help="cores of the paired rounds (default: the last core this process may use); one core: "
                        "all time-share it; two: one process each, swapped every round")
    p.add_argument("--ours-variant", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"),
                   help="one more 1-worker `ours` run with these extra tokenize arguments, e.g. "
                        "--ours-variant b4M '--encode-batch-chars 4194304' (repeatable)")
    p.add_argument("--compare-tree", default=None,
                   help="also run `ours` from this checkout (e.g. a `git worktree` of an older commit), in the same rounds")
    p.add_argument("--hf-tokenizer", default=None, help="also run raw and ours (1 worker) with this tokenizer.json; "
                   "'train' trains a byte-level BPE 32k on the corpus")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write every run's figures here (default <workdir>/bench.json)")
    a = p.parse_args(argv)
    if a.repeat < 0 or a.paired < 0 or a.repeat + a.paired == 0:
        p.error("--repeat and --paired must be >= 0, not both 0")
    cores = a.pair_cores or [max(os.sched_getaffinity(0))]
    work = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="dp_bench_"))  # absolute: --compare-tree runs elsewhere
    os.makedirs(work, exist_ok=True)
    py, here = sys.executable, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH")) if x))
    inp = a.input
    if inp is None:
        from data_pipeline import corpus

        inp = os.path.join(work, "corpus.jsonl")
        if not os.path.exists(inp):
            corpus.main(["--output", inp, "--target-mb", str(a.corpus_mb)])
    tok = a.tokenizer
    if tok is None:
        tok = os.path.join(work, "tok32k.model")
        if not os.path.exists(tok):
            from data_pipeline import train_tokenizer

            train_tokenizer.main(["--input", inp, "--model-prefix", tok[:-6], "--vocab-size", "32000",
                                  "--sample-docs", "3000"])
    inp, tok = os.path.abspath(inp), os.path.abspath(tok)
    mb = os.path.getsize(inp) / 1e6
    runs: list[tuple] = []  # name, procs, output prefix, cmd, env[, cwd]

    def ours_cmd(tokenizer: str, out: str, workers: int, *extra: str) -> list[str]:
        """Our tokenize command as every `ours` run takes it (same flags as the peers' work, _SAME_WORK)."""
        return [py, "-m", "data_pipeline.tokenize", "--input", inp, "--tokenizer", tokenizer, "--output-prefix", out,
                "--workers", str(workers), "--progress-interval", "10", *_SAME_WORK, *extra]

    if "raw" in a.only:
        runs.append(("raw SentencePiece, 1 process", 1, "", [py, "-m", "data_pipeline.bench", "--_peer", "raw", inp,
                                                             tok], env))
    for w in a.workers:
        if "ours" in a.only:
            out = os.path.join(work, f"ours_w{w}")
            runs.append((f"ours --workers {w}", w, out, ours_cmd(tok, out, w), env))
            if a.compare_tree:  # the same command in another checkout (run there: `-m` imports from the cwd)
                other = os.path.abspath(a.compare_tree)
                out = os.path.join(work, f"ours_w{w}_compare")
                runs.append((f"ours --workers {w} @{os.path.basename(other)}", w, out, ours_cmd(tok, out, w),
                             dict(env, PYTHONPATH=other), other))
            for vname, vargs in (a.ours_variant if w == 1 else []):
                out = os.path.join(work, f"ours_w1_{vname}")
                runs.append((f"ours --workers 1 [{vname}]", 1, out, ours_cmd(tok, out, 1, *shlex.split(vargs)), env))
        if "hf" in a.only:
            out = os.path.join(work, f"hf_w{w}")
            runs.append((f"HF datasets .map(num_proc={w}) + IndexedDatasetBuilder", w, out,
                         [py, "-m", "data_pipeline.bench", "--_peer", "hf", inp, tok, out, str(w)], env))
        if "megatron" in a.only and a.megatron_lm:
            out = os.path.join(work, f"mlm_w{w}")
            menv = dict(env, PYTHONPATH=os.pathsep.join((os.path.abspath(a.megatron_lm), env["PYTHONPATH"])))
            runs.append((f"Megatron-LM preprocess_data.py --workers {w}", w, out + "_text_document",
                         [py, os.path.join(a.megatron_lm, "tools", "preprocess_data.py"), "--input", inp,
                          "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                          tok, "--json-keys", "text", "--append-eod", "--workers", str(w)], menv))
    if a.hf_tokenizer:
        hf = a.hf_tokenizer if a.hf_tokenizer != "train" else os.path.join(work, "hf_bpe32k.json")
        if not os.path.exists(hf):
            train_hf_bpe(inp, hf)
        out = os.path.join(work, "ours_hf_w1")
        runs += [("raw HF tokenizers, 1 process 1 thread", 1, "", [py, "-m", "data_pipeline.bench", "--_peer", "raw",
                                                                    inp, hf], env),
                 ("ours --workers 1, HF tokenizer.json", 1, out, ours_cmd(hf, out, 1), env)]
    # round r runs every contender once, so with --repeat each contender's r-th run and raw's r-th run
    # are neighbours in time and see about the same outside load (the CPU-per-MB ratio of a pair)
    runs = [run if len(run) == 6 else (*run, None) for run in runs]
    results = {name: (procs, out, []) for name, procs, out, *_ in runs}
    raw_name = "raw SentencePiece, 1 process"
    # paired rounds: raw and every 1-worker SentencePiece `ours` run (variants, --compare-tree) at once
    group = [run for run in runs if run[0] == raw_name or (run[0].startswith("ours --workers 1")
                                                          and "HF tokenizer" not in run[0])]
    if len(group) < 2 or group[0][0] != raw_name:
        group = []
        if not a.repeat:
            raise SystemExit("--repeat 0: paired rounds need raw and a 1-worker `ours` run (--only raw ours "
                             "--workers 1)")
    paired: list[dict] = []

    def clean(out):
        for ext in (".bin", ".idx", ".manifest.json"):
            if out and os.path.exists(out + ext):
                os.remove(out + ext)

    for r in range(max(a.repeat, a.paired if group else 0)):
        for i, (name, procs, out, cmd, cenv, cwd) in enumerate(runs if r < a.repeat else []):
            clean(out)
            m = measure(cmd, cenv, os.path.join(work, f"log_{i}_{r}.txt"), cwd=cwd)
            print(f"[bench] {name}: wall {m['wall']:.1f}s cpu {m['cpu']:.1f}s peak {m['peak_tree'] / 1e9:.2f}/"
                  f"{m['peak_one'] / 1e9:.2f} GB rc {m['rc']} load {'/'.join(f'{x:.1f}' for x in m['load_1min'])}",
                  flush=True)
            print("[bench]   CPU s by process: " + ", ".join(f"{k} {v['cpu_s']:.2f}" + (f" (x{v['processes']})" if
                  v["processes"] > 1 else "") for k, v in m["by_process"].items()), flush=True)
            results[name][2].append(m)
        groups = paired_groups(len(group), cores, r) if group and r < a.paired else []
        for g, members in enumerate(groups):
            runs_g = [(group[i], c) for i, c in members]
            for run, _ in runs_g:
                clean(run[2])
            ms = measure_together([{"cmd": cmd, "env": cenv, "cwd": cwd, "cpus": {c},
                                    "log": os.path.join(work, f"log_paired_r{r}_g{g}_{i}.txt")}
                                   for ((_, _, _, cmd, cenv, cwd), c), (i, _) in zip(runs_g, members)])
            rnd = {run[0]: (m, c) for (run, c), m in zip(runs_g, ms)}
            ratio = {n: m["cpu"] / rnd[raw_name][0]["cpu"] for n, (m, _) in rnd.items()}
            paired.append({"round": r, "group": g, "load_1min_min_median_max": [
                               min(m["load_1min"][0] for m in ms), statistics.median(m["load_1min"][1] for m in ms),
                               max(m["load_1min"][2] for m in ms)],
                           "runs": {n: {"core": c, "cpu_s": round(m["cpu"], 2), "cpu_vs_raw": round(ratio[n], 4),
                                        "wall_s": round(m["wall"], 2), "peak_tree_bytes": m["peak_tree"],
                                        "peak_one_bytes": m["peak_one"], "rc": m["rc"], "rusage": m["rusage"],
                                        "cpu_s_by_process": m["by_process"]} for n, (m, c) in rnd.items()}})
            print(f"[bench] paired round {r + 1}{f'.{g + 1}' if len(groups) > 1 else ''} (started together; load "
                  f"{'/'.join(f'{x:.1f}' for x in paired[-1]['load_1min_min_median_max'])}): " +
                  "; ".join(f"{n} on core {c}: cpu {m['cpu']:.1f}s x{ratio[n]:.3f} wall {m['wall']:.0f}s peak "
                            f"{m['peak_tree'] / 1e9:.2f} GB rc {m['rc']}" for n, (m, c) in rnd.items()), flush=True)
    raw = results.get(raw_name) if results.get(raw_name, (0, 0, []))[2] else None
    raw_cpu = min(m["cpu"] for m in raw[2]) if raw else None
    raw_median = statistics.median(m["cpu"] for m in raw[2]) if raw else None
    pair_stats = paired_ratios([{n: v["cpu_s"] for n, v in p["runs"].items()} for p in paired], raw_name)
    report = {"corpus": os.path.abspath(inp), "corpus_mb": round(mb, 3), "tokenizer": os.path.abspath(tok),
              "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
              "raw_cpu_s": [round(m["cpu"], 2) for m in raw[2]] if raw else None,
              "runs": [{"contender": name, "processes": procs, "repeat": r, "wall_s": round(m["wall"], 2),
                        "cpu_s": round(m["cpu"], 2), "cpu_s_sampled": round(m["cpu_sampled"], 2),
                        "cpu_s_per_mb": round(m["cpu"] / mb, 4),
                        "cpu_vs_raw_min": round(m["cpu"] / raw_cpu, 4) if raw_cpu else None,
                        "cpu_vs_raw_median": round(m["cpu"] / raw_median, 4) if raw_median else None,
                        "cpu_vs_raw_same_round": round(m["cpu"] / raw[2][r]["cpu"], 4) if raw else None,
                        "peak_tree_bytes": m["peak_tree"], "peak_one_bytes": m["peak_one"], "rc": m["rc"],
                        "load_1min_min_median_max": m["load_1min"], "cpu_s_by_process": m["by_process"]}
                       for name, (procs, _, rs) in results.items() for r, m in enumerate(rs)],
              "paired": paired, "paired_cpu_vs_raw": pair_stats}
    jpath = a.json or os.path.join(work, "bench.json")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    ref = next((out for name, (_, out, _) in results.items() if name.startswith("ours")), None)
    print(f"\ncorpus {inp}: {mb:.1f} MB; tokenizer {tok}; machine {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(f"per-run figures and CPU by process: {jpath}\n")
    if a.repeat:
        print("| contender | wall s (best / median) | CPU s (min) | CPU per MB vs raw (min / min) | vs raw of the same "
              "round (each round) | peak memory GB (tree / largest) | output = ours |")
        print("|---|---:|---:|---:|---:|---:|---|")
    for name, (procs, out, rs) in results.items():
        if not rs:
            continue
        walls = [m["wall"] for m in rs]
        cpu = min(m["cpu"] for m in rs)
        same = "" if not out or "HF tokenizer" in name else ("yes" if ref and _same_files(out, ref) else "NO")
        rounds = " / ".join(f"{m['cpu'] / raw[2][r]['cpu']:.2f}" for r, m in enumerate(rs)) if raw else ""
        print(f"| {name} | {min(walls):.1f} / {statistics.median(walls):.1f} | {cpu:.1f} | "
              f"{cpu / raw_cpu if raw_cpu else float('nan'):.2f} | {rounds} | "
              f"{max(m['peak_tree'] for m in rs) / 1e9:.2f} / {max(m['peak_one'] for m in rs) / 1e9:.2f} | {same} |")
    if paired:
        where = (f"all on core {cores[0]}" if len(cores) == 1 else
                 f"raw and each other one per core of {'/'.join(map(str, cores))}, swapped every round")
        print(f"\npaired rounds (raw and ours started together, {where}), CPU vs raw of the same run:\n")
        print("| contender | each round | median (min-max) | CPU s (median) | peak memory GB (tree) | output = ours |")
        print("|---|---|---:|---:|---:|---|")
        for run in group:
            n, out = run[0], run[2]
            st = pair_stats.get(n, {"per_round": [1.0] * len(paired), "median": 1.0, "min": 1.0, "max": 1.0})
            same = "" if n == raw_name else ("yes" if ref and _same_files(out, ref) else "NO")
            cpu = statistics.median(p["runs"][n]["cpu_s"] for p in paired if n in p["runs"])
            print(f"| {n} | {' / '.join(f'{x:.3f}' for x in st['per_round'])} | {st['median']:.3f} "
                  f"({st['min']:.3f}-{st['max']:.3f}) | {cpu:.1f} | "
                  f"{max(p['runs'][n]['peak_tree_bytes'] for p in paired if n in p['runs']) / 1e9:.2f} | {same} |")
    print()
    if paired and "ours --workers 1" in pair_stats:
        st = pair_stats["ours --workers 1"]
        print(f"CPU per MB ours --workers 1 / raw SentencePiece: {st['median']:.3f} (median of "
              f"{len(st['per_round'])} paired run(s), {st['min']:.3f}-{st['max']:.3f}; target <= 1.05)")
    elif raw and "ours --workers 1" in results and results["ours --workers 1"][2]:
        rs = results["ours --workers 1"][2]
        print(f"CPU per MB ours --workers 1 / raw SentencePiece: "
              f"{statistics.median(m['cpu'] / raw[2][r]['cpu'] for r, m in enumerate(rs)):.3f} (median of the "
              "sequential rounds; on a shared machine these drift, --paired N is the robust figure; target <= 1.05)")
    best = {name: min(m["wall"] for m in rs) for name, (_, _, rs) in results.items() if rs}
    for w in a.workers:
        ours = best.get(f"ours --workers {w}")
        for name in best:
            if ours and not name.startswith(("ours", "raw")) and results[name][0] == w:
                print(f"wall ours/{name} at {w} process(es): {ours / best[name]:.2f} (target <= 0.90)")
    if "ours --workers 1" in best and "ours --workers 2" in best:
        print(f"throughput 2 workers / 1 worker: {best['ours --workers 1'] / best['ours --workers 2']:.2f} "
              "(target >= 1.7 on 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
