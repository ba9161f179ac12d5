"""Run many small research runs (uuid_memorize.py, pretrain_relora.py) as parallel processes on the
GPUs of one machine (or the CPU) under one wall-clock budget, then collect their results into one
table and pack everything into one tarball.

    python launch/research/gpu_study.py --plan smoke --root /tmp/study --budget 150 --tar $OUT/smoke.tgz
    python launch/research/gpu_study.py --plan sweep --root /tmp/study --budget 540 --tar $OUT/sweep.tgz
    python launch/research/gpu_study.py --collect DIR          # table of runs already on disk

Tiny models are launch-bound (Python and kernel launches, not GPU arithmetic), so one process per
configuration, single-threaded, many at once, is the way to use the GPU. With several GPUs
(--gpus, default: every visible one) each job is started with CUDA_VISIBLE_DEVICES set to the GPU
that runs the fewest of the driver's jobs at that moment (the lowest index on a tie), so a job always
sees one GPU as cuda:0; --parallel caps the jobs running at once over all GPUs together (not per
GPU). With one GPU every job is pinned to it (the device it would see anyway); with none (the CPU)
CUDA_VISIBLE_DEVICES is left alone. Every job gets
`--deadline` = start + budget - --stop-margin and stops itself cleanly (its last record says
"truncated" when its planned epochs/steps were not reached); a job still alive at start + budget
is terminated. Plans (the exact configurations of the study) are defined in PLANS below; the
commands as run are written to ROOT/commands.txt. The tarball holds, for every run, metrics.jsonl,
run.json and its log, plus commands.txt and summary.json (the collected table).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UUID = "launch/research/uuid_memorize.py"
PRETRAIN = "launch/research/pretrain_relora.py"

# --- plans ---------------------------------------------------------------------------------------
# UUID setting: random-init Llama, hidden 256, 4 layers, 4 heads, FFN 688, 1024 pairs, batch 64.
UUID_MODEL = "--hidden 256 --layers 4 --heads 4 --ffn 688 --batch 64"
LORA8_BUDGET = 156_160  # LoRA r=8 trainable count on that model (VeRA's equal-budget target)
UUID_METHODS = {  # label -> uuid_memorize.py method arguments
    "lora": "--method lora --r 8",
    "mora_sharing": "--method mora --mora-type sharing --r 8",
    "mora_rotation": "--method mora --mora-type rotation --r 8",
    "vera_eq": f"--method vera --vera-budget {LORA8_BUDGET}",
    "vera256": "--method vera --r 256",
    "fft": "--method fft",
}
# Pretraining setting: byte-level Llama, hidden 384, 6 layers, FFN 1024, seq 256, stdlib source corpus.
PT_MODEL = ("--hidden 384 --layers 6 --heads 6 --ffn 1024 --seq 256 --batch 16 --corpus source "
            "--max-bytes 100000000 --eval-batches 16 --log-every 10")


def job(group, name, script, args, env=None):
    return dict(group=group, name=name, script=script, args=args, env=env or {})


def uuid_job(group, label, lr, extra="", suffix=""):
    return job(group, f"{label}_lr{lr}{suffix}", UUID, f"{UUID_METHODS[label]} --lr {lr} {UUID_MODEL} {extra}")


def pt_job(group, method, lr, extra="", suffix=""):
    return job(group, f"{method}_lr{lr}{suffix}", PRETRAIN, f"--method {method} --lr {lr} {PT_MODEL} {extra}")


def plan_smoke():
    """~2 minutes: do the scripts run on CUDA, how fast are epochs/steps with 16 processes at once,
    where do the learning rates lie. Epoch/step counts are long on purpose: the deadline cuts them."""
    e = "--n-pairs 1024 --epochs 300"
    jobs = [uuid_job("uuid", m, lr, e) for m, lrs in [
        ("lora", ["3e-3", "1e-2"]), ("mora_sharing", ["1e-3", "3e-3"]), ("mora_rotation", ["1e-3", "3e-3"]),
        ("vera_eq", ["1e-2"]), ("vera256", ["1e-2"]), ("fft", ["3e-4", "1e-3"])] for lr in lrs]
    jobs += [uuid_job("uuid", "lora", "3e-3", "--n-pairs 2048 --epochs 300", "_n2048"),
             uuid_job("uuid", "mora_sharing", "1e-3", "--n-pairs 2048 --epochs 300", "_n2048")]
    nc = uuid_job("uuid", "lora", "3e-3", e, "_nocompile")
    nc["env"] = {"MORA_DIST_COMPILE": "0"}
    jobs.append(nc)
    pt = "--steps 3000 --warmup 100 --restart-every 500 --restart-warmup 50 --eval-every 250"
    jobs += [pt_job("pretrain", "full", "1e-3", pt), pt_job("pretrain", "lora", "2e-3", pt),
             pt_job("pretrain", "mora", "2e-3", pt)]
    return jobs


# The sweep (second device call): learning rates chosen around the smoke test's results (LoRA
# diverged at 1e-2 and drifted up from the format floor at 3e-3; MoRA-sharing learned at 1e-3 and
# sat at the floor at 3e-3; MoRA-rotation 1e-3 > 3e-3; VeRA r=256 still rising at 1e-2; FFT 3e-4 >
# 1e-3). Equal-budget VeRA (r=5198) ran 54 s/epoch among 16 processes (40x LoRA): left out.
SWEEP_UUID_LRS = {
    "lora": ["1e-4", "3e-4", "1e-3", "3e-3"],
    "mora_sharing": ["1e-4", "3e-4", "1e-3", "2e-3"],
    "mora_rotation": ["3e-4", "1e-3", "3e-3"],
    "vera256": ["3e-3", "1e-2", "3e-2", "1e-1"],
    "fft": ["1e-4", "3e-4", "1e-3"],
}
SWEEP_PT_LRS = {"full": ["1e-3", "2e-3", "4e-3"], "lora": ["1e-3", "2e-3", "4e-3"], "mora": ["1e-3", "2e-3", "4e-3"]}
SWEEP_PT = "--steps 1200 --warmup 60 --restart-every 300 --restart-warmup 30 --eval-every 100"


def plan_sweep():
    """UUID: every method over its LR grid, 1024 pairs, 100 epochs (cosine over the 100 epochs).
    Pretraining: full-rank, ReLoRA, ReMoRA (r=32), 1200 steps, three LRs each."""
    jobs = [uuid_job("uuid", m, lr, "--n-pairs 1024 --epochs 100") for m, lrs in SWEEP_UUID_LRS.items() for lr in lrs]
    jobs += [pt_job("pretrain", m, lr, f"--r 32 {SWEEP_PT}") for m, lrs in SWEEP_PT_LRS.items() for lr in lrs]
    return jobs


def plan_extra():
    """Third device call, after the sweep: (a) finer/extended LR grids where the sweep's best was at an
    edge or next to a collapse (MoRA-rotation's best 3e-3 was the top of its grid; LoRA's and
    MoRA-sharing's best 1e-3 sat next to a collapse to the format floor at 3e-3 / 2e-3), (b) two more
    seeds (adapter init and data order; same base and pairs) at each low-rank method's best sweep LR,
    (c) 150-epoch runs at those LRs, (d) pretraining at 5e-4 (full-rank's and ReMoRA's best was the
    lowest sweep LR)."""
    e = "--n-pairs 1024 --epochs 100"
    jobs = [uuid_job("uuid", m, lr, e) for m, lrs in [
        ("lora", ["6e-4", "2e-3"]), ("mora_sharing", ["6e-4", "1.5e-3"]), ("mora_rotation", ["5e-3", "1e-2"])]
        for lr in lrs]
    best = {"lora": "1e-3", "mora_sharing": "1e-3", "mora_rotation": "3e-3"}
    jobs += [uuid_job("uuid", m, lr, f"{e} --seed {sd}", f"_seed{sd}") for m, lr in best.items() for sd in (1, 2)]
    jobs += [uuid_job("uuid", m, lr, "--n-pairs 1024 --epochs 150", "_ep150") for m, lr in best.items()]
    jobs += [pt_job("pretrain", m, "5e-4", f"--r 32 {SWEEP_PT}") for m in ("full", "lora", "mora")]
    return jobs


def plan_edge():
    """Fourth device call, after `extra`: (a) pretraining below 5e-4, where full-rank's and ReMoRA's best
    still sat at the grid's low edge, (b) seeds 1 and 2 at the final best LRs of LoRA (2e-3) and
    MoRA-sharing (6e-4), which `extra` found after its seed runs had started at 1e-3, (c) one point
    on each side of the cliff-side optima: LoRA 2.5e-3, MoRA-rotation 2e-3 and 4e-3."""
    e = "--n-pairs 1024 --epochs 100"
    jobs = [pt_job("pretrain", m, lr, f"--r 32 {SWEEP_PT}") for m in ("full", "mora") for lr in ("2.5e-4", "1.25e-4")]
    jobs += [uuid_job("uuid", m, lr, f"{e} --seed {sd}", f"_seed{sd}")
             for m, lr in (("lora", "2e-3"), ("mora_sharing", "6e-4")) for sd in (1, 2)]
    jobs += [uuid_job("uuid", m, lr, e) for m, lr in (("lora", "2.5e-3"), ("mora_rotation", "2e-3"),
                                                       ("mora_rotation", "4e-3"))]
    return jobs


def plan_ptseeds():
    """Fifth device call: pretraining seeds 1 and 2 (base init and batch order) for full-rank, ReLoRA and
    ReMoRA at their best LRs, to tell whether ReLoRA's and ReMoRA's 0.3% gap is more than seed noise."""
    best = {"full": "5e-4", "lora": "2e-3", "mora": "5e-4"}
    return [pt_job("pretrain", m, lr, f"--r 32 {SWEEP_PT} --seed {sd}", f"_seed{sd}")
            for m, lr in best.items() for sd in (1, 2)]


def plan_tiny():
    """Seconds on a CPU: the driver's own check (tests/test_research.py), real runs of both scripts."""
    u = "--hidden 32 --layers 1 --heads 2 --ffn 64 --batch 8 --n-pairs 16 --epochs 2"
    p = ("--hidden 32 --layers 1 --heads 2 --ffn 64 --seq 32 --batch 4 --steps 6 --warmup 1 --restart-every 3 "
         "--restart-warmup 1 --eval-every 3 --eval-batches 1 --log-every 2 --max-bytes 60000 --corpus docstrings")
    return [uuid_job("uuid", "lora", "1e-2", u), uuid_job("uuid", "mora_sharing", "1e-2", u),
            job("pretrain", "mora_lr2e-3", PRETRAIN, f"--method mora --r 4 --lr 2e-3 {p}")]


PLANS = {"smoke": plan_smoke, "sweep": plan_sweep, "extra": plan_extra, "edge": plan_edge,
         "ptseeds": plan_ptseeds, "tiny": plan_tiny}


# --- running ---------------------------------------------------------------------------------------
def command(j, root: Path, deadline: float):
    out = root / j["group"] / j["name"]
    return ([sys.executable, j["script"]] + shlex.split(j["args"]) +
            ["--out", str(out)] + (["--deadline", f"{deadline:.0f}"] if deadline else []))


def visible_gpus(environ=None) -> list:
    """The GPUs jobs may be placed on, as CUDA_VISIBLE_DEVICES entries: the entries of the driver's own
    CUDA_VISIBLE_DEVICES when it is set (up to the first invalid one, as CUDA reads it), else one index
    per GPU that `nvidia-smi -L` lists; [] on a machine without one."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        out = []
        for x in env["CUDA_VISIBLE_DEVICES"].split(","):
            if not x.strip() or x.strip().startswith("-"):
                break
            out.append(x.strip())
        return out
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    n = sum(line.startswith("GPU ") for line in r.stdout.splitlines()) if r.returncode == 0 else 0
    return [str(i) for i in range(n)]


def gpu_ids(gpus, visible: list) -> list:
    """The CUDA_VISIBLE_DEVICES entries of the `gpus` GPUs to use ([] = leave the jobs' environment alone):
    gpus None = every visible GPU; gpus beyond the visible ones is an error, except on a machine with none
    visible, where gpus > 1 gives indices 0..gpus-1 (a CPU check of the placement)."""
    if gpus is None:
        return list(visible)
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if not visible:
        return [str(i) for i in range(gpus)] if gpus > 1 else []
    if gpus > len(visible):
        raise ValueError(f"gpus={gpus} but only {len(visible)} visible: {visible}")
    return list(visible[:gpus])


def pick_gpu(load: list) -> int:
    """Index of the least-loaded GPU (load[i] = the driver's jobs running on GPU i); the lowest on a tie."""
    return min(range(len(load)), key=lambda i: (load[i], i))


def gpu_line() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return ""
        line = "gpu " + r.stdout.strip().replace("\n", "; ")
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        mem = [int(x) for x in r.stdout.split() if x.isdigit()]
        return line + (f"; {len(mem)} processes, largest {max(mem)} MiB" if mem else "")
    except (OSError, subprocess.SubprocessError, ValueError):
        return ""


def last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()
                     and "warn" not in x.lower()]  # skip library warnings
        return lines[-1].strip()[:150] if lines else ""
    except OSError:
        return ""


def run_jobs(jobs, root: Path, budget: float, parallel: int, stop_margin: float, progress_every: float,
             repo: Path, min_run: float = 30, followup=None, gpus=None) -> dict:
    """Run `jobs` (dicts from job()) under root, `parallel` at a time in all (over all GPUs together); a
    queued job starts only while at least `min_run` seconds are left before the jobs' deadline.
    `followup(key, done)`, called when a job ends, returns more jobs to queue (a study's second phase).
    `gpus` (default: every visible GPU, see gpu_ids): each job starts with CUDA_VISIBLE_DEVICES set to
    the GPU with the fewest running jobs (pick_gpu; a job whose own env sets it is not placed), and
    ROOT/placement.json records where each ran. Returns {group/name: how it ended}."""
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + budget - stop_margin
    env0 = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1",
                PYTHONUNBUFFERED="1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    ids = gpu_ids(gpus, visible_gpus())
    load, placement = [0] * len(ids), {}
    cmds, queue = {}, []
    cmd_file = open(root / "commands.txt", "w")

    def enqueue(new):
        for j in new:
            key = j["group"] + "/" + j["name"]
            (root / j["group"]).mkdir(parents=True, exist_ok=True)
            cmds[key] = command(j, root, deadline)
            envs = " ".join(f"{k}={v}" for k, v in j["env"].items())
            cmd_file.write((envs + " " if envs else "") + shlex.join(["python"] + cmds[key][1:]) + "\n")
            queue.append(j)
        cmd_file.flush()

    enqueue(jobs)
    running, done = {}, {}
    next_report = start
    print(f"[study] {len(jobs)} jobs, {parallel} at a time, budget {budget:.0f}s, job deadline "
          f"+{deadline - start:.0f}s; " + (f"GPUs {','.join(ids)} (CUDA_VISIBLE_DEVICES per job)" if ids
                                         else "jobs' CUDA_VISIBLE_DEVICES left as is"), flush=True)
    while queue or running:
        now = time.time()
        while queue and len(running) < parallel and now < deadline - min_run:
            j = queue.pop(0)
            key = j["group"] + "/" + j["name"]
            log = open(root / j["group"] / (j["name"] + ".log"), "w")
            env = dict(env0)
            if ids and "CUDA_VISIBLE_DEVICES" not in j["env"]:  # a job that sets its own is left alone
                g = pick_gpu(load)
                load[g] += 1
                placement[key] = ids[g]
                env["CUDA_VISIBLE_DEVICES"] = ids[g]
            running[key] = (subprocess.Popen(cmds[key], cwd=repo, env=dict(env, **j["env"]), stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True), log, now)
        for key, (proc, log, t0) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                done[key] = f"rc {proc.returncode} after {time.time() - t0:.0f}s"
                on = f" (gpu {placement[key]})" if key in placement else ""
                print(f"[study +{time.time() - start:.0f}s] {key}: {done[key]}{on}", flush=True)
                del running[key]
                if key in placement:
                    load[ids.index(placement[key])] -= 1
                if followup:
                    enqueue(followup(key, done))
        if queue and now >= deadline - min_run:
            for j in queue:
                done[j["group"] + "/" + j["name"]] = "not started"
            queue.clear()
        if now >= start + budget and running:
            for key, (proc, log, t0) in running.items():
                print(f"[study] {key}: still running at the budget, terminating", flush=True)
                os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(5)
            for key, (proc, log, t0) in running.items():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                log.close()
                done[key] = "killed at the budget"
                if key in placement:
                    load[ids.index(placement[key])] -= 1
            running = {}
        if now >= next_report:
            next_report = now + progress_every
            per = f" ({'/'.join(map(str, load))} per GPU)" if len(ids) > 1 else ""
            print(f"[study +{now - start:.0f}s] running {len(running)}{per}, queued {len(queue)}, done {len(done)}; "
                  f"{gpu_line()}", flush=True)
            for key in running:
                g, n = key.split("/")
                print(f"    {key}: {last_line(root / g / (n + '.log'))}", flush=True)
        time.sleep(1)
    cmd_file.close()
    print(f"[study] all jobs ended after {time.time() - start:.0f}s", flush=True)
    (root / "status.json").write_text(json.dumps(done, indent=1) + "\n")
    if placement:
        (root / "placement.json").write_text(json.dumps(placement, indent=1) + "\n")
    return done


# --- collecting --------------------------------------------------------------------------------------
def records(d: Path) -> list:
    """The records of run directory d's metrics.jsonl (a line cut by a kill is skipped)."""
    out = []
    for x in (d / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


def method_label(cfg: dict) -> str:
    m = cfg["method"]
    if "restart_every" in cfg:  # pretrain_relora.py
        names = {"full": "full-rank", "lora": "ReLoRA", "mora": "ReMoRA"} if cfg["restart_every"] else {
            "full": "full-rank", "lora": "LoRA", "mora": "MoRA"}
        return names.get(m, m)
    if m == "mora":
        return f"MoRA-{cfg.get('mora_type')}"
    if m == "vera":
        return f"VeRA r={cfg['r']}"
    return {"lora": "LoRA", "fft": "FFT", "full": "full-rank"}.get(m, m)


def collect(root) -> list[dict]:
    """One row per run directory under root (any depth) holding run.json and metrics.jsonl."""
    rows = []
    for rj in sorted(Path(root).rglob("run.json")):
        d = rj.parent
        if not (d / "metrics.jsonl").is_file():
            continue
        cfg = json.loads(rj.read_text())["config"]
        recs = records(d)
        row = dict(run=str(d.relative_to(root)), method=method_label(cfg), lr=cfg["lr"],
                   trainable=cfg.get("trainable"), truncated=any(r.get("truncated") for r in recs))
        ev = [r for r in recs if "eval/exact_match" in r and "epoch" in r]  # per-epoch evaluations
        if ev:  # UUID run
            tr = [r for r in recs if "epoch" in r and r["epoch"] > 0]
            best = max(ev, key=lambda r: (r["eval/exact_match"], -r["epoch"]))
            row.update(kind="uuid", n_pairs=cfg.get("n_pairs"), epochs=tr[-1]["epoch"] if tr else 0,
                       epochs_planned=cfg["epochs"], exact_match=ev[-1]["eval/exact_match"],
                       value_acc=ev[-1]["eval/value_token_acc"], best_exact_match=best["eval/exact_match"],
                       best_epoch=best["epoch"], loss=tr[-1]["loss"] if tr else None,
                       s_per_epoch=tr[-1]["elapsed_s"] / tr[-1]["epoch"] if tr else None)
            hit = [r["epoch"] for r in ev if r["eval/exact_match"] >= 0.9]
            row["epoch_em90"] = hit[0] if hit else None
        pv = [r for r in recs if "eval/ppl" in r]
        if pv and not ev:  # pretraining run
            tr = [r for r in recs if "loss" in r]
            row.update(kind="pretrain", steps=tr[-1]["step"] if tr else 0, steps_planned=cfg["steps"],
                       ppl=pv[-1]["eval/ppl"], best_ppl=min(r["eval/ppl"] for r in pv),
                       loss=tr[-1]["loss"] if tr else None, restarts=tr[-1].get("restarts", 0) if tr else 0,
                       steps_per_s=tr[-1]["step"] / tr[-1]["elapsed_s"] if tr and tr[-1].get("elapsed_s") else None)
        if "kind" in row:
            rows.append(row)
    return rows


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def table(rows) -> str:
    out = []
    u = [r for r in rows if r["kind"] == "uuid"]
    if u:
        out += ["| run | method | lr | trainable | pairs | epochs | EM | best EM (epoch) | first epoch EM>=0.9 "
                "| value acc | loss | s/epoch |", "|" + " --- |" * 12]
        for r in u:
            ep = f"{r['epochs']}/{r['epochs_planned']}" + (" (cut)" if r["truncated"] else "")
            out.append(f"| {r['run']} | {r['method']} | {r['lr']:g} | {_f(r['trainable'], ',')} | {r['n_pairs']} | {ep} "
                       f"| {r['exact_match']:.3f} | {r['best_exact_match']:.3f} ({r['best_epoch']}) "
                       f"| {_f(r['epoch_em90'], 'd')} | {r['value_acc']:.3f} | {_f(r['loss'], '.4f')} "
                       f"| {_f(r['s_per_epoch'], '.2f')} |")
    p = [r for r in rows if r["kind"] == "pretrain"]
    if p:
        out += ["", "| run | method | lr | trainable | steps | restarts | train loss | held-out ppl | best ppl "
                "| steps/s |", "|" + " --- |" * 10]
        for r in p:
            st = f"{r['steps']}/{r['steps_planned']}" + (" (cut)" if r["truncated"] else "")
            out.append(f"| {r['run']} | {r['method']} | {r['lr']:g} | {_f(r['trainable'], ',')} | {st} | {r['restarts']} "
                       f"| {_f(r['loss'], '.4f')} | {r['ppl']:.3f} | {r['best_ppl']:.3f} | {_f(r['steps_per_s'], '.2f')} |")
    return "\n".join(out)


def pack(root: Path, tar_path: Path) -> None:
    """Tarball of commands.txt, summary.json, status.json, placement.json and every run's metrics.jsonl,
    run.json and log."""
    keep = {"metrics.jsonl", "run.json", "commands.txt", "summary.json", "status.json", "placement.json"}
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w:gz") as tar:
        for f in sorted(root.rglob("*")):
            if f.is_file() and (f.name in keep or f.suffix == ".log"):
                tar.add(f, arcname=str(f.relative_to(root.parent)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS))
    p.add_argument("--root", help="where the runs go (ROOT/<group>/<run>)")
    p.add_argument("--budget", type=float, default=500, help="seconds of wall clock for all jobs")
    p.add_argument("--stop-margin", type=float, default=40, help="jobs' own deadline: this long before the budget")
    p.add_argument("--parallel", type=int, default=64, help="jobs at once, over all GPUs together")
    p.add_argument("--gpus", type=int, default=None,
                   help="spread the jobs over this many GPUs (default: every visible one; each job sees one)")
    p.add_argument("--progress-every", type=float, default=30)
    p.add_argument("--tar", help="write the tarball here")
    p.add_argument("--collect", metavar="DIR", help="only print the table of the runs under DIR")
    a = p.parse_args(argv)
    if a.collect:
        print(table(collect(a.collect)))
        return
    if not (a.plan and a.root):
        p.error("--plan and --root are required (or --collect DIR)")
    root = Path(a.root).resolve()
    done = run_jobs(PLANS[a.plan](), root, a.budget, a.parallel, a.stop_margin, a.progress_every, HERE.parent.parent,
                    gpus=a.gpus)
    failed = {k: v for k, v in done.items() if v != "rc 0" and not v.startswith("rc 0 ")}
    for k, v in failed.items():
        print(f"[study] FAILED {k}: {v}; log tail: {last_line(root / (k + '.log'))}", flush=True)
    rows = collect(root)
    (root / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows), flush=True)
    if a.tar:
        pack(root, Path(a.tar))
        print(f"[study] wrote {a.tar} ({Path(a.tar).stat().st_size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
