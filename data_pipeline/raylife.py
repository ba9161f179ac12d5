"""Ray for one tokenize run: connect (or start a local Ray that dies with this process).

Why a watchdog: `ray.init()` starts gcs_server and raylet fate-shared with the driver, but the
raylet's own children (DashboardAgent, RuntimeEnvAgent) survive a SIGKILL of the driver and stay
forever. A tiny child process (stdlib only) waits for the driver to die (its stdin pipe closes),
then kills every process of our Ray node: they carry RAY_NODE_ID=<our node> in their environment.
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
_STATE = {"workers_have_env": False}


def actor_options() -> dict:
    """Ray options for a tokenize actor: WORKER_ENV unless every worker of our local Ray already has it
    (asking again would make Ray start fresh worker processes instead of its prestarted ones)."""
    return {"num_cpus": 1, **({} if _STATE["workers_have_env"] else {"runtime_env": {"env_vars": WORKER_ENV}})}

_WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
tag = ("RAY_NODE_ID=" + sys.argv[1]).encode()
sys.stdin.buffer.read()  # EOF: the driver exited or was killed

def ours():
    me, found = os.getpid(), []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if tag in f.read().split(b"\0"):
                    with open(f"/proc/{p}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(p))
        except OSError:
            pass
    return found

for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0)):
    pids = ours()
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.time() + wait
    while pids and time.time() < deadline:
        time.sleep(0.1)
        pids = ours()
"""


def _start_watchdog(node_id: str):
    if not os.path.isdir("/proc"):
        return None
    return subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG, node_id], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)


@contextlib.contextmanager
def connect(address: str | None, workers: int | None):
    """Yield the `ray` module connected to `address`, or to a local Ray started here (and stopped,
    with all its processes, when this block ends or this process dies). An already initialised
    Ray (tests, the benchmark) is used as it is and left running."""
    import ray

    if ray.is_initialized():
        _STATE["workers_have_env"] = False
        yield ray
        return
    # workers import data_pipeline from this checkout (shared filesystem, like the outputs)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    local = {} if address else {"num_cpus": max(workers or 1, os.cpu_count() or 1)}
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    if not address:  # raylet and the workers it starts inherit this process's environment
        os.environ.update(WORKER_ENV)
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}}, **local)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    _STATE["workers_have_env"] = not address
    dog = None if address else _start_watchdog(ray.get_runtime_context().get_node_id())
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
