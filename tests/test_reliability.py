"""Fault tests of issue 18: nothing a user had is lost, nothing goes wrong silently.

Process faults run the real CLI (torchrun launch/train.py / launch/merge.py, configs/tiny_cpu.yaml,
one CPU rank); file and config faults are checked in-process on copies of one trained checkpoint
(module fixture), so the file stays quick. docs/reliability.md maps each guarantee to these tests.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_utils import write_dataset

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _overrides(data, out, ckpt=None):
    return [f"data.train=[{{path: {data}, weight: 1.0}}]", "data.eval_domain=null", "parallel.tp=1",
            f"run.out_dir={out}", f"checkpoint.dir={ckpt or f'{out}/ckpt'}", "train.eval_every=0",
            "restarts.every=0", "checkpoint.every=2"]


def _train_cmd(data, out, *extra, ckpt=None):
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(ROOT / "launch" / "train.py"),
            "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), *_overrides(data, out, ckpt), *extra]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _cfg(data, out, *extra):
    from mora_dist.training.config import load_config

    return load_config(str(ROOT / "configs" / "tiny_cpu.yaml"), _overrides(data, out) + list(extra))


def _error_line(stderr: str, prefix: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, 4 steps, a checkpoint every 2 steps, checkpoint.keep=-1 (the usual "keep all")."""
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(str(root / "data"), seed=1)
    out = root / "run"
    r = _run(_train_cmd(data, out, "train.steps=4", "checkpoint.keep=-1"))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = {json.loads(x)["step"]: json.loads(x)["loss"] for x in open(out / "metrics.jsonl")}
    return dict(root=root, data=data, out=out, ckpt=out / "ckpt", losses=losses)


def _copy_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    return out, out / "ckpt"


# ------------------------------------------------------------------ 1. checkpoint.keep
@pytest.mark.integration
def test_keep_minus_one_keeps_every_checkpoint(trained):
    """Before: rotation `old[:-keep]` with keep=-1 deleted each checkpoint right after writing it."""
    names = sorted(os.listdir(trained["ckpt"]))
    assert [n for n in names if n.startswith("step_")] == ["step_0000002", "step_0000004"]
    assert (trained["ckpt"] / "latest").read_text().strip() == "step_0000004"


def test_rotation_keeps_newest_and_never_later_steps(tmp_path):
    from mora_dist.checkpoint.state import rotate

    for s in (1, 2, 3, 9):
        (tmp_path / f"step_{s:07d}").mkdir()
    (tmp_path / "step_0000002.tmp.abc").mkdir()
    assert rotate(str(tmp_path), 3, 0) == [] and rotate(str(tmp_path), 3, -1) == []
    rotate(str(tmp_path), 3, 2)  # step 9 (left by a run that resumed from an older one) is not rotation's
    assert sorted(os.listdir(tmp_path)) == ["step_0000002", "step_0000002.tmp.abc", "step_0000003", "step_0000009"]
    rotate(str(tmp_path), 3, 1)
    assert sorted(os.listdir(tmp_path)) == ["step_0000002.tmp.abc", "step_0000003", "step_0000009"]


# ------------------------------------------------------------------ 2. damaged checkpoints
def _damage(ckpt: Path, how: str):
    s4 = ckpt / "step_0000004"
    if how == "latest names a missing folder":
        shutil.rmtree(s4)
    elif how == "truncated shard":
        shard = sorted(s4.glob("*.distcp"))[0]
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == "missing common.pt":
        (s4 / "common.pt").unlink()
    elif how == "missing metadata.json":
        (s4 / "metadata.json").unlink()
    elif how == "torn common.pt":
        (s4 / "common.pt").write_bytes((s4 / "common.pt").read_bytes()[:100])
    elif how == "missing .metadata":
        (s4 / ".metadata").unlink()
    elif how == "latest is garbage":
        (ckpt / "latest").write_bytes(b"\x00\xff garbage")
    elif how == "latest is missing":
        (ckpt / "latest").unlink()
        shutil.rmtree(s4)


DAMAGE = ["latest names a missing folder", "truncated shard", "missing common.pt", "missing metadata.json",
          "torn common.pt", "missing .metadata", "latest is garbage", "latest is missing"]


@pytest.mark.integration
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_latest_falls_back_to_newest_intact(trained, tmp_path, how):
    from mora_dist.checkpoint.integrity import select_resume

    _, ckpt = _copy_run(trained, tmp_path)
    assert select_resume(str(ckpt)) == (str(ckpt / "step_0000004"), [])
    _damage(ckpt, how)
    path, warnings = select_resume(str(ckpt))
    # a garbage latest file: every step folder is intact, the newest one wins
    assert path == str(ckpt / ("step_0000004" if how == "latest is garbage" else "step_0000002"))
    assert warnings and "resuming from the newest intact checkpoint" in warnings[-1]


@pytest.mark.integration
def test_no_intact_checkpoint_is_one_line_naming_the_folder(trained, tmp_path):
    from mora_dist.checkpoint.integrity import CheckpointError, select_resume

    _, ckpt = _copy_run(trained, tmp_path)
    _damage(ckpt, "truncated shard")
    (ckpt / "step_0000002" / "common.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        select_resume(str(ckpt))
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg
    assert "step_0000004: shard __0_0.distcp is truncated" in msg and "step_0000002: common.pt is missing" in msg


@pytest.mark.integration
def test_damaged_latest_real_run_resumes_from_intact_not_step0(trained, tmp_path):
    """Before: `latest` naming a missing folder restarted at step 0 silently, rewrote step_0000002 and
    rotation then deleted it; a truncated shard gave a raw traceback."""
    out, ckpt = _copy_run(trained, tmp_path)
    _damage(ckpt, "latest names a missing folder")
    s2 = {p.name: p.read_bytes() for p in (ckpt / "step_0000002").iterdir()}
    before = (out / "metrics.jsonl").read_bytes()
    r = _run(_train_cmd(trained["data"], out, "train.steps=4", "checkpoint.keep=-1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_0000004 (named by" in r.stderr and "is unusable: folder is missing" in r.stderr
    assert f"resumed from {ckpt / 'step_0000002'} at step 2" in r.stdout
    assert {p.name: p.read_bytes() for p in (ckpt / "step_0000002").iterdir()} == s2  # untouched
    new = [json.loads(x) for x in (out / "metrics.jsonl").read_bytes()[len(before):].decode().splitlines()]
    assert [x["step"] for x in new] == [3, 4]  # continued, not restarted
    for x in new:  # and exactly as the uninterrupted run
        assert abs(x["loss"] - trained["losses"][x["step"]]) <= 1e-5 * abs(x["loss"])
    assert (ckpt / "latest").read_text().strip() == "step_0000004"


# ------------------------------------------------------------------ 3. resume config checks
@pytest.mark.integration
@pytest.mark.parametrize("extra,diff", [
    (["adapter.targets=[q, v]"], "adapter.targets: ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] -> ['q', 'v']"),
    (["adapter.mora_type=rotation"], "adapter.mora_type: 'sharing' -> 'rotation'"),
    (["adapter.r=4"], "adapter.r: 8 -> 4"),
    (["model.seed=7"], "model.seed: 1234 -> 7"),
    (["model.hidden_size=128"], "model.hidden_size: 64 -> 128"),
    (["data.eod_id=1"], "data.eod_id: 0 -> 1"),
])
def test_resume_refuses_changed_config_unless_allowed(trained, tmp_path, extra, diff):
    from mora_dist.training.preflight import RunError, inspect

    out, _ = _copy_run(trained, tmp_path)
    with pytest.raises(RunError) as e:
        inspect(_cfg(trained["data"], out, *extra))
    assert diff in str(e.value) and "checkpoint.allow_config_change=true" in str(e.value)
    assert "\n" not in str(e.value)
    plan = inspect(_cfg(trained["data"], out, *extra, "checkpoint.allow_config_change=true"))
    assert plan.resume.endswith("step_0000004") and any(diff in n for n in plan.notes)
    # what may change on resume: layout, schedule length, logging
    assert inspect(_cfg(trained["data"], out, "train.steps=9", "train.log_every=3")).resume.endswith("step_0000004")


@pytest.mark.integration
def test_resume_false_over_existing_checkpoints_is_refused(trained, tmp_path):
    from mora_dist.training.preflight import RunError, inspect

    out, ckpt = _copy_run(trained, tmp_path)
    with pytest.raises(RunError, match=r"checkpoint.resume=false but checkpoint.dir .* already holds checkpoints"):
        inspect(_cfg(trained["data"], out, "checkpoint.resume=false"))


@pytest.mark.integration
def test_changed_targets_real_run_exits_2_and_touches_nothing(trained, tmp_path):
    out, ckpt = _copy_run(trained, tmp_path)
    listing = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.name != ".mora_dist.lock")
    r = _run(_train_cmd(trained["data"], out, "train.steps=6", "adapter.targets=[q, v]"))
    assert r.returncode != 0
    line = _error_line(r.stderr, "error: ")
    assert "another configuration (adapter.targets:" in line and str(ckpt / "step_0000004") in line
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")
                  if p.name != ".mora_dist.lock") == listing


# ------------------------------------------------------------------ 4. locks, temporaries
@pytest.mark.integration
def test_second_run_on_a_folder_is_refused_and_first_is_unharmed(trained, tmp_path):
    out = tmp_path / "run"
    a = subprocess.Popen(_train_cmd(trained["data"], out, "train.steps=100000", "checkpoint.every=0"), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert a.poll() is None and time.time() - t0 < 120, a.communicate()
            time.sleep(0.2)
        workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(a.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        for w in workers:  # pause A (it keeps its lock) so that B's start-up gets the CPU
            os.kill(w, signal.SIGSTOP)
        b = _run(_train_cmd(trained["data"], out, "train.steps=3", ckpt=tmp_path / "other_ckpt"))
        for w in workers:
            os.kill(w, signal.SIGCONT)
        assert b.returncode != 0
        line = _error_line(b.stderr, "error: ")
        assert f"run.out_dir {out} is in use by another run (pid {workers[0]} on" in line
        assert not (tmp_path / "other_ckpt" / "latest").exists()
        for w in workers:
            os.kill(w, signal.SIGUSR1)  # stop A cleanly: checkpoint after the current step
        stdout, stderr = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, stderr[-3000:]
    from mora_dist.metrics.jsonl import read_metrics

    data = read_metrics(out / "metrics.jsonl")
    last = int((out / "ckpt" / "latest").read_text().strip().split("_")[1])
    assert [r["step"] for r in data.records] == list(range(1, last + 1)) and not data.skipped


@pytest.mark.integration
def test_lock_is_exclusive_and_freed_by_a_killed_holder(tmp_path):
    from mora_dist.training.run_lock import LockError, RunLock

    holder = subprocess.Popen([PY, "-c", "import sys, time; from mora_dist.training.run_lock import RunLock; "
                               f"l = RunLock([('checkpoint.dir', {str(tmp_path)!r})]); print('held', flush=True); "
                               "time.sleep(600)"], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"checkpoint.dir {tmp_path} is in use by another run \(pid {holder.pid}"):
            RunLock([("checkpoint.dir", str(tmp_path))])
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs; the kernel drops the flock
        holder.wait()
    lock = RunLock([("checkpoint.dir", str(tmp_path))])  # the stale lock file does not block
    with pytest.raises(LockError):
        RunLock([("run.out_dir", str(tmp_path))])
    lock.release()
    RunLock([("run.out_dir", str(tmp_path))]).release()


def test_stale_temporaries_removed_only_under_the_lock(tmp_path):
    from mora_dist.training.preflight import remove_stale_temporaries

    for name in ("step_0000004.tmp", "step_0000004.tmp.1a2b", "step_0000002.old.99", "step_0000002", "keepme.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest.tmp.1234").write_text("step_0000004\n")
    (tmp_path / "latest").write_text("step_0000002\n")
    assert remove_stale_temporaries(str(tmp_path)) == ["latest.tmp.1234", "step_0000002.old.99",
                                                       "step_0000004.tmp", "step_0000004.tmp.1a2b"]
    assert sorted(os.listdir(tmp_path)) == ["keepme.tmp", "latest", "step_0000002"]


# ------------------------------------------------------------------ 5. token ids vs vocabulary
@pytest.mark.integration
def test_token_ids_checked_against_the_model_vocabulary(trained, tmp_path):
    """Before: vocab smaller than the data's ids crashed at TP=1 and trained silently at TP=2."""
    from mora_dist.training.token_check import TokenError, check_token_ids

    data, out = trained["data"], tmp_path / "run"
    assert check_token_ids(_cfg(data, out)) == []
    with pytest.raises(TokenError) as e:
        check_token_ids(_cfg(data, out, "model.vocab_size=128"))
    msg = str(e.value)
    assert msg.startswith(f"data.train[0].path: {data}.bin holds token id ") and "128 tokens" in msg
    small = write_dataset(str(tmp_path / "small"), vocab=100, seed=3)
    check_token_ids(_cfg(small, out, "model.vocab_size=128", f"data.eval_domain={small}"))
    with pytest.raises(TokenError, match=rf"data.eval_domain: {data}.bin holds token id"):
        check_token_ids(_cfg(small, out, "model.vocab_size=128", f"data.eval_domain={data}"))
    cut = tmp_path / "cut"
    shutil.copy(data + ".idx", str(cut) + ".idx")
    Path(str(cut) + ".bin").write_bytes(Path(data + ".bin").read_bytes()[:1000])
    with pytest.raises(TokenError, match=rf"data.train\[0\].path: {cut}.bin has 1000 bytes but {cut}.idx indexes"):
        check_token_ids(_cfg(str(cut), out))


@pytest.mark.integration
def test_eod_outside_vocabulary_rejected_before_any_rank(tmp_path, trained):
    from mora_dist.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.eod_id=256 is outside the model vocabulary \(model.vocab_size=256\)"):
        _cfg(trained["data"], tmp_path, "data.eod_id=256")


# ------------------------------------------------------------------ 6. exports
def _merge(ckpt, out, *extra):
    return _run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                 str(ROOT / "launch" / "merge.py"), "--checkpoint", str(ckpt), "--out", str(out), *extra])


@pytest.mark.integration
def test_export_is_atomic_refuses_existing_and_leaves_no_stale_files(trained, tmp_path):
    """Before: a second export into the folder overwrote in place and kept an older export's shards and
    index, which the HF reader then followed."""
    from mora_dist.models.hf_io import INDEX_FILE, SafetensorsDir

    out = tmp_path / "merged"
    stale = out / "hf"
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (stale / INDEX_FILE).write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    r = _run([PY, str(ROOT / "launch" / "merge.py"), "--checkpoint", str(trained["ckpt"]), "--out", str(out)])
    assert r.returncode == 2  # refused before any rank starts
    assert _error_line(r.stderr, "merge: --out") == (f"merge: --out {out} already exists and is not empty; pass "
                                                     "--overwrite (overwrite=True) to replace it, or choose another path")
    assert sorted(os.listdir(stale)) == sorted([INDEX_FILE, "model-00001-of-00002.safetensors"])  # untouched
    r = _merge(trained["ckpt"], out, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["hf", "megatron"]
    assert sorted(os.listdir(out / "hf")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging or old folders left beside it
    assert SafetensorsDir(out / "hf").weight_map["model.norm.weight"] == "model.safetensors"


@pytest.mark.integration
def test_merge_refuses_a_damaged_checkpoint_naming_it(trained, tmp_path):
    _, ckpt = _copy_run(trained, tmp_path)
    _damage(ckpt, "truncated shard")
    r = _run([PY, str(ROOT / "launch" / "merge.py"), "--checkpoint", str(ckpt / "step_0000004"), "--out",
              str(tmp_path / "m")])
    assert r.returncode == 2
    assert _error_line(r.stderr, "merge: ").startswith(f"merge: checkpoint {ckpt / 'step_0000004'} is unusable: "
                                                       "shard __0_0.distcp is truncated")
    assert not (tmp_path / "m").exists()
    r = _run([PY, str(ROOT / "launch" / "merge.py"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m")])
    assert r.returncode == 2  # the run's root: latest names the damaged folder -> no silent older merge
    line = _error_line(r.stderr, "merge: ")
    assert f"pass --checkpoint {ckpt / 'step_0000002'} to merge it" in line and "is unusable: shard" in line
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ 8. config values out of range
@pytest.mark.integration
@pytest.mark.parametrize("override,needle", [
    ("train.lr=0", "train.lr must be > 0, got 0.0"),
    ("train.lr=-0.001", "train.lr must be > 0, got -0.001"),
    ("train.lr=.nan", "train.lr must be > 0, got nan"),
    ("train.steps=0", "train.steps must be > 0, got 0"),
    ("train.micro_batch=0", "train.micro_batch must be > 0, got 0"),
    ("train.global_batch=0", "train.global_batch must be > 0, got 0"),
    ("train.warmup=-1", "train.warmup must be >= 0, got -1"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio must be in [0, 1], got 1.5"),
    ("train.clip_grad=-1", "train.clip_grad must be >= 0 (0 = no clipping), got -1.0"),
    ("train.eval_every=-1", "train.eval_every must be >= 0 (0 = no periodic eval), got -1"),
    ("train.log_every=0", "train.log_every must be > 0, got 0"),
    ("restarts.every=-5", "restarts.every must be >= 0 (0 = no restarts), got -5"),
    ("restarts.prune=0", "restarts.prune must be in (0, 1], got 0.0"),
    ("checkpoint.every=-1", "checkpoint.every must be >= 0 (0 = only at the end and on a signal), got -1"),
    ("checkpoint.keep=-2", "checkpoint.keep must be >= -1 (N >= 1: keep the newest N; 0 or -1: keep all), got -2"),
    ("data.seq_length=0", "data.seq_length must be > 0, got 0"),
    ("data.eval_batches=0", "data.eval_batches must be > 0, got 0"),
    ("model.vocab_size=0", "model.vocab_size must be > 0, got 0"),
    ("model.hidden_size=66", "model.hidden_size=66 is not divisible by model.num_attention_heads=4"),
    ("model.num_query_groups=3", "model.num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    ("checkpoint.dir=null", "checkpoint.every=2 but checkpoint.dir is not set"),
    ("data.train=[{path: P, weight: 0}]", "data.train[0].weight must be a number > 0, got 0"),
    ("data.train=[{path: P, weight: -1}]", "data.train[0].weight must be a number > 0, got -1"),
    ("data.train=[{path: P, wieght: 2}]", "data.train[0]: unknown key 'wieght' (known: path, weight)"),
    ("train.steps=[1, 2", "override train.steps: invalid YAML value '[1, 2': "),
    ("model.hf_dir=/nonexistent/llama", "model.hf_dir: /nonexistent/llama/config.json not found"),
])
def test_config_values_out_of_range_fail_naming_the_key(trained, tmp_path, override, needle):
    from mora_dist.training.config import ConfigError

    override = override.replace("path: P", f"path: {trained['data']}")
    with pytest.raises(ConfigError) as e:
        _cfg(trained["data"], tmp_path, override)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.integration
def test_bad_override_yaml_fails_fast_in_the_cli(tmp_path):
    t0 = time.time()
    r = _run([PY, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
              "train.micro_batch=0"], timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "config error: train.micro_batch must be > 0, got 0"], r.stderr[-2000:]
    r = _run([PY, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
              "adapter.targets=[q, v"], timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("config error: override adapter.targets: invalid YAML value '[q, v': ")
    assert time.time() - t0 < 60
