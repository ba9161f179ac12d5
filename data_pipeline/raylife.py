"""Ray for one tokenize run: connect (or start a local Ray that dies with this process).

Why a watchdog: `ray.init()` starts gcs_server and raylet fate-shared with the driver, but the
raylet's own children (DashboardAgent, RuntimeEnvAgent) survive a SIGKILL of the driver and stay
forever. A tiny child process (stdlib only) records the tree of the processes `ray.init` started
(gcs, raylet, ...) once a second, every 5 s once nothing new appeared for 30 s (via
/proc/<pid>/task/<tid>/children: the environment of Ray's processes is no reliable tag, Ray's
setproctitle overwrites it) and, when the driver dies (its stdin pipe closes), kills every recorded
process that still runs with the same start time.
SIGTERM/SIGINT are turned into a normal exit, so `ray.shutdown()` runs first.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

# Environment of every tokenize worker: see tokenize._run_ray for why one malloc arena pair.
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}
# The raylet of a Ray we start ourselves: workers at the driver's priority. Ray's default (nice 15)
# starved the tokenize workers on a shared 2-core machine to ~20% of a core each (docs/data_pipeline.md,
# billion-token run), while every peer (raw SentencePiece, Megatron, HF) runs at normal priority.
RAYLET_ENV = {"RAY_worker_niceness": "0"}
_STATE = {"workers_have_env": False, "local_cpus": None}


def actor_options() -> dict:
    """Ray options for a tokenize actor: WORKER_ENV unless every worker of our local Ray already has it
    (asking again would make Ray start fresh worker processes instead of its prestarted ones)."""
    return {"num_cpus": 1, **({} if _STATE["workers_have_env"] else {"runtime_env": {"env_vars": WORKER_ENV}})}

_WATCHDOG = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
roots, seen = [int(p) for p in sys.argv[1:]], {}

def start(pid):  # (state, start time): a pid reused by another process has another start time
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], rest[19]
    except OSError:
        return None

def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out

def record():  # Ray's processes started by the driver (gcs, raylet, ...) and their descendants
    todo = [p for p in roots if p not in seen]
    while todo:
        p = todo.pop()
        if p not in seen and p != os.getpid():
            st = start(p)
            if st:
                seen[p] = st[1]
                todo += children(p)
    for p in list(seen):  # grandchildren of a process seen last time that was re-parented
        todo = children(p)
        while todo:
            c = todo.pop()
            if c not in seen and c != os.getpid() and start(c):
                seen[c] = start(c)[1]
                todo += children(c)

# every second while processes still appear (Ray's start-up, actors), then every 5 s: a run's tree is
# stable for minutes and each look reads a file per thread of every Ray process (~0.17 CPU-s a minute
# at 1 s); the driver's death is still seen at once (select on the pipe)
period, quiet_since = 1.0, time.monotonic()
while True:  # the pipe to the driver closes when it exits or is killed
    n = len(seen)
    record()
    if len(seen) != n:
        quiet_since = time.monotonic()
    period = 1.0 if time.monotonic() - quiet_since < 30 else 5.0
    if select.select([sys.stdin], [], [], period)[0] and not os.read(sys.stdin.fileno(), 4096):
        break

def alive():
    out = []
    for p, t in seen.items():
        st = start(p)
        if st and st[1] == t and st[0] != "Z":
            out.append(p)
    return out

for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0)):
    pids = alive()
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.time() + wait
    while pids and time.time() < deadline:
        time.sleep(0.1)
        pids = alive()
"""


def _children() -> set[int]:
    out = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                out |= {int(c) for c in f.read().split()}
    except OSError:
        pass
    return out


def _start_watchdog(roots: set[int]):
    """Watch the processes ray.init started (`roots`, children of this process) and their descendants;
    never other children of a program that calls run() as a library."""
    if not roots:
        return None
    return subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG, *map(str, sorted(roots))], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)


def default_workers(ray) -> int:
    """--workers when not given: every CPU of a local Ray we started (it has exactly the CPUs of
    its workers, see connect), else the cluster's CPUs minus one for the driver."""
    return _STATE["local_cpus"] or max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)


@contextlib.contextmanager
def connect(address: str | None, workers: int | None, max_workers: int | None = None):
    """Yield the `ray` module connected to `address`, or to a local Ray started here (and stopped,
    with all its processes, when this block ends or this process dies). An already initialised
    Ray (tests, the benchmark) is used as it is and left running.

    A local Ray gets one CPU per tokenize worker (`workers`, default: this machine's CPUs minus one
    for the driver; at most `max_workers`, the number of parts to do), and its raylet gets the
    workers' environment (WORKER_ENV, PYTHONPATH) from ours instead of a job runtime_env: the raylet
    prestarts one worker process per CPU with that environment, and the actors take those (a job
    runtime_env made every actor start a new process while the prestarted ones idled: two wasted
    Python start-ups per run, see docs/data_pipeline.md)."""
    import ray

    _STATE["local_cpus"] = None
    if ray.is_initialized():
        _STATE["workers_have_env"] = False
        yield ray
        return
    # workers import data_pipeline from this checkout (shared filesystem, like the outputs)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    if address:
        env, opts = {}, {"runtime_env": {"env_vars": {"PYTHONPATH": path}}}
    else:  # raylet and the workers it starts inherit this process's environment
        cpus = min(workers or max(1, (os.cpu_count() or 2) - 1), max_workers or 1 << 30)
        env, opts = {**WORKER_ENV, **RAYLET_ENV, "PYTHONPATH": path}, {"num_cpus": cpus}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    before = _children()
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, **opts)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    _STATE["workers_have_env"] = not address
    _STATE["local_cpus"] = None if address else opts["num_cpus"]
    dog = None if address else _start_watchdog(_children() - before)
    try:
        yield ray
    finally:
        ray.shutdown()
        if dog is not None:
            dog.stdin.close()  # the watchdog sweeps up anything shutdown left, then exits (not waited for)


def exit_on_signals() -> None:
    """SIGTERM / SIGINT -> SystemExit in the main thread, so `finally` blocks stop Ray cleanly."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
