"""launch/ray_job.py on a real local Ray cluster (`ray start --head` on loopback), 2 CPU workers
with gloo: runs to completion with the losses of the torchrun run of the same config."""
import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

from train_utils import write_dataset

pytestmark = pytest.mark.integration  # multi-process / subprocess: outside the fast unit subset

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _args(tmp, out):
    dom, gen = write_dataset(str(tmp / "dom"), seed=1), write_dataset(str(tmp / "gen"), seed=2)
    return ["--config", str(ROOT / "configs/tiny_cpu.yaml"),
            f"data.train=[{{path: {dom}, weight: 0.7}}, {{path: {gen}, weight: 0.3}}]", "data.eval_domain=null",
            f"run.out_dir={out}", f"checkpoint.dir={out}/ckpt", "train.steps=6", "train.eval_every=0",
            "restarts.every=3", "restarts.warmup=1"]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))}


def test_ray_train_job_matches_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0")
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "launch/train.py"), *_args(tmp_path, tmp_path / "torchrun")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    port = "26479"
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        r = subprocess.run([sys.executable, str(ROOT / "launch/ray_job.py"), "--address", f"127.0.0.1:{port}",
                            "--workers", "2", *_args(tmp_path, tmp_path / "ray")],
                           env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    got, want = _losses(tmp_path / "ray"), _losses(tmp_path / "torchrun")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-4 * abs(want[s]), (s, got, want)
