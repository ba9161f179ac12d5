"""slurm/tokenize.sh on the repo's one-node local Slurm (slurm/localhost/start.sh): Ray head via srun,
the pipeline with --address, Ray stopped afterwards; output equal to an in-process local-Ray run."""
import json
import os
import subprocess
import time
from pathlib import Path

import ray

from data_pipeline import tokenize as dp_tokenize
from data_pipeline import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _ray_processes():
    out = subprocess.run(["pgrep", "-f", "ray/core/src/ray/(gcs|raylet)"], capture_output=True, text=True).stdout
    return set(out.split())


def test_tokenize_sh_runs_pipeline_on_allocation(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "slurm/localhost/start.sh")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"could not start the local Slurm cluster:\n{r.stdout}\n{r.stderr}"
    words = "the protein binds a kinase domain in cells under stress and signals growth".split()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(words[(i * j) % len(words)] for j in range(3, 20))}) + "\n"
                              for i in range(400)) + "{broken\n")
    assert train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(tmp_path / "tok"),
                                 "--vocab-size", "400"]) == 0
    common = ["--input", str(corpus), "--tokenizer", str(tmp_path / "tok.model"), "--unit-lines", "100"]
    # a bystander Ray on the same node (another user's or job's): the job must stop its own Ray only
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never join a cluster another job started
    try:
        bystander = _ray_processes()
        assert bystander, "the bystander Ray started no gcs/raylet process"
        job = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--time=00:10:00",
                              f"--output={tmp_path}/job.out", str(ROOT / "slurm/tokenize.sh"), *common,
                              "--output-prefix", str(tmp_path / "slurm")], capture_output=True, text=True, cwd=ROOT,
                             timeout=60, env=dict(os.environ, PYTHON=str(ROOT / ".venv/bin/python")))
        assert job.returncode == 0, job.stderr
        jid = job.stdout.strip().split(";")[0]
        t0 = time.time()
        while time.time() - t0 < 300:
            q = subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True).stdout.strip()
            if not q:
                break
            time.sleep(1)
        log = (tmp_path / "job.out").read_text()
        assert "tokenize.sh: exit 0" in log, log[-3000:]
        assert "1 of 1 Ray node(s) up" in log and "data.eod_id=2" in log
        after = _ray_processes()
        assert after <= bystander, "Ray processes left behind by the job"
        assert bystander <= after, "the job stopped a Ray it did not start"
        dp_tokenize.run([*common, "--output-prefix", str(tmp_path / "local"), "--workers", "1"])
    finally:
        ray.shutdown()
    for ext in (".bin", ".idx", ".rejects.jsonl"):
        assert (tmp_path / f"slurm{ext}").read_bytes() == (tmp_path / f"local{ext}").read_bytes(), ext
    man = json.loads((tmp_path / "slurm.manifest.json").read_text())
    assert man["complete"] and man["totals"]["docs_written"] == 400 and man["totals"]["docs_rejected"] == 1
