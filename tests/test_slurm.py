"""The Slurm launchers on a real single-node Slurm (slurmctld + slurmd + munge on localhost,
started by slurm/localhost/start.sh, which installs Debian's packages when missing).

- sbatch slurm/cpt_biomed.sh (tiny config, 2 tasks) runs to completion and the dependent merge job
  writes an HF export that transformers loads;
- pre-emption: USR1 to the batch shell -> checkpoint, requeue, resumed run's losses == uninterrupted;
- impossible requests fail fast with a message naming the problem.
"""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from train_utils import write_dataset

pytestmark = pytest.mark.integration  # multi-process / subprocess: outside the fast unit subset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm():
    r = subprocess.run(["bash", str(ROOT / "slurm/localhost/start.sh")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"could not start the local Slurm cluster:\n{r.stdout}\n{r.stderr}"
    return True


def _sh(*cmd, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, **kw)


def _state(job):
    out = _sh("scontrol", "show", "job", str(job)).stdout
    fields = dict(x.split("=", 1) for x in out.split() if "=" in x)
    return fields.get("JobState"), fields.get("ExitCode"), int(fields.get("Restarts", 0))


def _wait(job, timeout=600, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = _state(job)
        if st[0] in until:
            return st
        time.sleep(0.3)
    raise AssertionError(f"job {job} still {_state(job)} after {timeout}s")


def _env(tmp, run, overrides, config="configs/tiny_cpu.yaml"):
    dom, gen = write_dataset(str(tmp / "dom"), seed=1), write_dataset(str(tmp / "gen"), seed=2)
    data = f'data.train=[{{"path":"{dom}","weight":0.7}},{{"path":"{gen}","weight":0.3}}]'
    ovr = " ".join([data, "data.eval_domain=null", "train.eval_every=0", "parallel.tp=2", *overrides])
    return dict(os.environ, CONFIG=config, OVERRIDES=ovr, RUN_DIR=str(run), PYTHON=str(ROOT / ".venv/bin/python"))


FLAGS = ["--nodes=1", "--ntasks-per-node=2", "--gres=gpu:0", "--time=00:15:00"]


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl"))}


def test_train_then_dependent_merge_export(slurm, tmp_path):
    run = tmp_path / "run"
    env = _env(tmp_path, run, ["train.steps=8", "restarts.every=4", "restarts.warmup=1", "checkpoint.every=4"])
    env.update(MERGE_NTASKS="1", MERGE_TP="1")
    r = _sh("bash", "slurm/submit.sh", *FLAGS, f"--output={tmp_path}/train-%j.out", cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    train, merge = map(int, r.stdout.split())
    st = _wait(train)
    log = next(tmp_path.glob("train-*.out")).read_text()
    assert st[:2] == ("COMPLETED", "0:0"), log[-3000:]
    st = _wait(merge)
    assert st[:2] == ("COMPLETED", "0:0"), (ROOT / f"merge-{merge}.out").read_text()[-3000:]
    (ROOT / f"merge-{merge}.out").unlink()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "merged" / "hf")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    assert sorted(_losses(run)) == list(range(1, 9))


def test_preemption_requeue_resume_equals_uninterrupted(slurm, tmp_path):
    over = ["train.steps=40", "checkpoint.every=0", "restarts.every=0"]
    ref_run, run = tmp_path / "ref", tmp_path / "pre"
    ref = _sh("sbatch", "--parsable", *FLAGS, f"--output={tmp_path}/ref-%j.out", "slurm/cpt_biomed.sh",
              cwd=ROOT, env=_env(tmp_path, ref_run, over))
    job = _sh("sbatch", "--parsable", *FLAGS, f"--output={tmp_path}/pre-%j.out", "slurm/cpt_biomed.sh",
              cwd=ROOT, env=_env(tmp_path, run, over))
    ref, job = int(ref.stdout.split(";")[0]), int(job.stdout.split(";")[0])
    t0 = time.time()
    while not ((run / "metrics.jsonl").exists() and len(_losses(run)) >= 5):
        assert time.time() - t0 < 300 and _state(job)[0] in ("PENDING", "RUNNING"), _state(job)
        time.sleep(0.2)
    assert _sh("scancel", "--signal=USR1", "--batch", str(job)).returncode == 0
    t0 = time.time()
    while _state(job)[2] == 0:  # requeued: Restarts=1, then pending with a start delay
        assert time.time() - t0 < 120, _state(job)
        time.sleep(0.2)
    # Slurm delays a requeued job's start until the old instance's credential expires. Skipping
    # that delay within the second of the requeue makes slurmd refuse the launch ("Job credential
    # revoked", seen in slurmctld.log when the new launch fell in the same second), so wait 2 s.
    time.sleep(2)
    _sh("scontrol", "update", f"JobId={job}", "StartTime=now")
    st = _wait(job)
    log = next(tmp_path.glob("pre-*.out")).read_text()
    assert st[:2] == ("COMPLETED", "0:0"), log[-6000:]
    st = _wait(ref)
    assert st[:2] == ("COMPLETED", "0:0"), next(tmp_path.glob("ref-*.out")).read_text()[-6000:]
    assert "USR1 received" in log and "requeueing" in log and "resumed from" in log, log[-3000:]
    got, want = _losses(run), _losses(ref_run)
    assert sorted(got) == sorted(want) == list(range(1, 41))
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-4 * abs(want[s]), (s, got[s], want[s])


@pytest.mark.parametrize("env_change,needle", [
    ({"OVERRIDES_EXTRA": "parallel.tp=4"}, "parallel.tp * parallel.pp = 4 does not divide the world size 2"),
    ({"CONFIG": "configs/no_such.yaml"}, "config file not found: configs/no_such.yaml"),
])
def test_impossible_requests_fail_fast(slurm, tmp_path, env_change, needle):
    env = _env(tmp_path, tmp_path / "bad", [])
    if "OVERRIDES_EXTRA" in env_change:
        env["OVERRIDES"] += " " + env_change["OVERRIDES_EXTRA"]
    else:
        env.update(env_change)
    t0 = time.time()
    job = int(_sh("sbatch", "--parsable", *FLAGS, f"--output={tmp_path}/bad-%j.out", "slurm/cpt_biomed.sh",
                  cwd=ROOT, env=env).stdout.split(";")[0])
    st = _wait(job, timeout=120)
    assert st[0] == "FAILED" and st[1] == "2:0", st
    assert needle in next(tmp_path.glob("bad-*.out")).read_text()
    assert time.time() - t0 < 90
