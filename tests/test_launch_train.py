"""launch/train.py under torchrun: kill -9 a rank mid-run and restart -> the per-step losses equal
an uninterrupted run's; SIGUSR1 saves and stops; bad configs fail fast naming the key."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_utils import write_dataset

pytestmark = pytest.mark.integration  # multi-process / subprocess: outside the fast unit subset

ROOT = Path(__file__).resolve().parents[1]


def _cmd(tmp, out, nproc=2, extra=()):
    dom, gen = write_dataset(str(tmp / "dom"), seed=1), write_dataset(str(tmp / "gen"), seed=2)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
            f"data.train=[{{path: {dom}, weight: 0.7}}, {{path: {gen}, weight: 0.3}}]", "data.eval_domain=null",
            f"run.out_dir={out}", f"checkpoint.dir={out}/ckpt", "train.steps=10", "checkpoint.every=2",
            "restarts.every=4", "restarts.warmup=1", "train.eval_every=0", *extra]


def _losses(out):
    """Per-step losses as the reader sees them (metrics.jsonl is append-only: a resumed run's redone
    steps supersede the killed run's records) and the steps in reading order."""
    from mora_dist.metrics.jsonl import read_metrics

    rows = read_metrics(Path(out) / "metrics.jsonl").records
    return {r["step"]: r["loss"] for r in rows}, [r["step"] for r in rows]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _wait_step(out, step, proc, timeout=240):
    path, t0 = Path(out) / "metrics.jsonl", time.time()
    while time.time() - t0 < timeout:
        if path.exists() and any(json.loads(x)["step"] >= step for x in open(path) if x.strip()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("run did not reach step %d" % step)


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def test_kill9_resume_and_sigusr1(tmp_path):
    ref_out = tmp_path / "ref"
    r = subprocess.run(_cmd(tmp_path, ref_out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, _ = _losses(ref_out)
    assert sorted(ref) == list(range(1, 11)) and ref[10] < ref[1]

    out = tmp_path / "killed"
    p = subprocess.Popen(_cmd(tmp_path, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_step(out, 5, p)
    workers = _children(p.pid)
    killed_log = (out / "metrics.jsonl").read_bytes()
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one rank dies hard; torchrun tears the job down
    p.communicate(timeout=120)
    assert p.returncode != 0
    r = subprocess.run(_cmd(tmp_path, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert (out / "ckpt" / ".mora_dist.lock").exists()  # left by the killed run; it did not block the restart
    assert (out / "metrics.jsonl").read_bytes().startswith(killed_log)  # append-only: nothing rewritten
    got, steps = _losses(out)
    assert steps == list(range(1, 11))  # one record per step once superseded attempts are dropped
    for s in range(1, 11):
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])

    # SIGUSR1 (Slurm's pre-emption warning) -> checkpoint after the current step, clean exit
    out = tmp_path / "usr1"
    p = subprocess.Popen(_cmd(tmp_path, out, extra=["train.steps=200", "checkpoint.every=0"]), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_step(out, 3, p)
    for w in _children(p.pid):
        os.kill(w, signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-3000:]
    assert "(on SIGUSR1)" in stdout
    latest = (out / "ckpt" / "latest").read_text().strip()
    assert int(latest.split("_")[1]) == max(_losses(out)[1]) < 200


@pytest.mark.parametrize("override,needle", [
    ("parallel.tp=3", "parallel.tp * parallel.pp = 3 does not divide the world size 2"),
    ("adapter.method=dora", "unknown method 'dora'"),
    ("train.stepz=3", "unknown key train.stepz"),
    ("data.train=[{path: /nonexistent/corpus}]", "data.train[0].path: /nonexistent/corpus.bin not found"),
    ("train.cuda_graph=true", "train.cuda_graph: true needs a GPU (none is visible)"),
])
def test_bad_config_fails_fast_naming_the_key(tmp_path, override, needle):
    t0 = time.time()
    r = subprocess.run(_cmd(tmp_path, tmp_path / "bad", extra=list(override) if isinstance(override, tuple) else [override]), env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 60
