"""Fast checks of the issue-8 experiment code (launch/research/): UUID data, tokenisation, metric."""
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "research"))

import uuid_memorize as um  # noqa: E402

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_pairs_deterministic_distinct_uuid4():
    a, b = um.make_pairs(300, seed=42), um.make_pairs(300, seed=42)
    assert a == b and um.make_pairs(5, seed=1) != a[:5]
    assert len({k for k, _ in a}) == 300
    assert all(UUID4.match(k) and UUID4.match(v) for k, v in a)


def test_encode_and_mask():
    k, v = "0123456789ab-cdef-0000-0000-000000000000", "ffffffff-ffff-4fff-8fff-ffffffffffff"
    k = k[:36]
    ids = um.encode(k, v)
    assert len(ids) == um.SEQ == 75 and ids[0] == um.BOS and ids[37] == um.SEP and ids[-1] == um.EOD
    assert "".join(um.CHARS[i] for i in ids[38:74]) == v
    tokens, labels, mask = um.batch_tensors([(k, v)])
    assert tokens.shape == labels.shape == mask.shape == (1, 74)
    assert mask.sum() == 36
    assert "".join(um.CHARS[i] for i in labels[0][mask[0]].tolist()) == v  # loss exactly on the value


def test_exact_match_metric():
    labels = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    mask = torch.tensor([[False, True, True, False]] * 2)
    logits = torch.nn.functional.one_hot(labels, 20).float()
    logits[1, 2] = torch.nn.functional.one_hot(torch.tensor(7), 20).float()  # one value token wrong in row 1
    logits[0, 0] = torch.nn.functional.one_hot(torch.tensor(7), 20).float()  # unmasked error: ignored
    em, acc = um.exact_match(logits, labels, mask)
    assert em == 0.5 and acc == 0.75


def test_teacher_forced_exact_equals_greedy():
    """A toy 'model' whose argmax depends on the prefix: teacher-forced EM == greedy reproduction."""
    torch.manual_seed(0)
    table = torch.randn(20, 20)

    def logits_of(seq):  # next-token logits from the previous token only
        return table[seq]

    target = [3]
    for _ in range(6):
        target.append(int(table[target[-1]].argmax()))
    seq = torch.tensor([target])
    for corrupt in (False, True):
        lab = seq[:, 1:].clone()
        if corrupt:
            lab[0, 3] = (lab[0, 3] + 1) % 20
        mask = torch.ones_like(lab, dtype=torch.bool)
        em, _ = um.exact_match(logits_of(seq[:, :-1]), lab, mask)
        g = [target[0]]
        for _ in range(lab.shape[1]):
            g.append(int(table[g[-1]].argmax()))
        assert (em == 1.0) == (g[1:] == lab[0].tolist())


@pytest.mark.integration  # runs the study scripts as subprocesses
def test_gpu_study_driver_runs_collects_and_packs(tmp_path):
    """The study driver on the CPU with real (tiny) runs of both scripts: every job ends, the
    collected table holds their real numbers, a job past its deadline stops itself cleanly and is
    marked truncated, and the tarball holds every run's files."""
    import json
    import tarfile

    import gpu_study as gs

    jobs = gs.plan_tiny() + [gs.uuid_job("uuid", "lora", "1e-2", "--hidden 32 --layers 1 --heads 2 --ffn 64 "
                                         "--batch 8 --n-pairs 16 --epochs 100000", "_long")]
    root = tmp_path / "study"
    done = gs.run_jobs(jobs, root, budget=50, parallel=8, stop_margin=25, progress_every=1000,
                       repo=gs.HERE.parent.parent, min_run=5)
    failed = {k: (root / f"{k}.log").read_text()[-3000:] for k, v in done.items() if not v.startswith("rc 0")}
    assert not failed, (done, failed)
    rows = {r["run"]: r for r in gs.collect(root)}
    assert set(rows) == {"uuid/lora_lr1e-2", "uuid/mora_sharing_lr1e-2", "uuid/lora_lr1e-2_long",
                         "pretrain/mora_lr2e-3"}
    lora, mora = rows["uuid/lora_lr1e-2"], rows["uuid/mora_sharing_lr1e-2"]
    assert lora["method"] == "LoRA" and mora["method"] == "MoRA-sharing"
    assert lora["epochs"] == lora["epochs_planned"] == 2 and not lora["truncated"]
    assert 0.0 <= lora["exact_match"] <= 1.0 and 0.0 < lora["value_acc"] < 1.0
    assert lora["trainable"] > 0 and abs(mora["trainable"] - lora["trainable"]) < 0.05 * lora["trainable"]
    long = rows["uuid/lora_lr1e-2_long"]
    assert long["truncated"] and 0 < long["epochs"] < long["epochs_planned"]
    pt = rows["pretrain/mora_lr2e-3"]
    assert pt["method"] == "ReMoRA" and pt["steps"] == 6 and pt["restarts"] == 1 and 1.0 < pt["ppl"] < 300
    cmds = (root / "commands.txt").read_text().splitlines()
    assert len(cmds) == 4 and all(" --deadline " in c and " --out " in c for c in cmds)
    (root / "summary.json").write_text(json.dumps(list(rows.values())))
    gs.pack(root, tmp_path / "s.tgz")
    names = set(tarfile.open(tmp_path / "s.tgz").getnames())
    for run in rows:
        assert {f"study/{run}/metrics.jsonl", f"study/{run}/run.json", f"study/{run}.log"} <= names
    assert {"study/commands.txt", "study/summary.json", "study/status.json"} <= names
    assert "| uuid/lora_lr1e-2 | LoRA |" in gs.table(list(rows.values()))


def test_gpu_placement_choice():
    """pick_gpu: the GPU with the fewest running jobs, the lowest index on a tie; gpu_ids: which
    CUDA_VISIBLE_DEVICES entries the jobs get (none on a machine without GPUs unless forced)."""
    import gpu_study as gs

    assert [gs.pick_gpu(x) for x in ([0, 0], [1, 0], [1, 1], [2, 1], [0, 3, 0], [4, 2, 2])] == [0, 1, 0, 1, 0, 1]
    assert gs.visible_gpus({"CUDA_VISIBLE_DEVICES": "5, 7"}) == ["5", "7"]
    assert gs.visible_gpus({"CUDA_VISIBLE_DEVICES": "3,-1,4"}) == ["3"] and gs.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gs.gpu_ids(None, ["5", "7"]) == ["5", "7"] and gs.gpu_ids(1, ["5", "7"]) == ["5"]
    assert gs.gpu_ids(None, []) == [] and gs.gpu_ids(1, []) == []  # CPU: the jobs' environment is left alone
    assert gs.gpu_ids(2, []) == ["0", "1"]  # forced: a CPU check of the placement
    with pytest.raises(ValueError):
        gs.gpu_ids(3, ["5", "7"])


@pytest.mark.integration  # runs tiny subprocesses (no torch), ~6 s
def test_run_jobs_places_each_job_on_the_least_loaded_gpu(tmp_path, monkeypatch):
    """run_jobs with 2 GPUs (CUDA_VISIBLE_DEVICES=5,7) and 2 jobs at a time: a long job holds GPU 5, so
    every later job goes to GPU 7 (least-loaded, not round-robin); a job that sets its own
    CUDA_VISIBLE_DEVICES keeps it and is not placed. Each job reports what it saw."""
    import json

    import gpu_study as gs

    script = tmp_path / "show.py"
    script.write_text("import os, sys, time\na = sys.argv[1:]\nout = a[a.index('--out') + 1]\n"
                      "os.makedirs(out, exist_ok=True)\n"
                      "open(os.path.join(out, 'cvd'), 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))\n"
                      "time.sleep(float(a[0]))\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    jobs = [gs.job("g", n, str(script), t) for n, t in (("long", "5"), ("b", "0"), ("c", "0"), ("d", "0"))]
    jobs.append(dict(gs.job("g", "own", str(script), "0"), env={"CUDA_VISIBLE_DEVICES": "9"}))
    root = tmp_path / "study"
    done = gs.run_jobs(jobs, root, budget=60, parallel=2, stop_margin=10, progress_every=1000,
                       repo=tmp_path, min_run=1)
    assert all(v.startswith("rc 0") for v in done.values()), done
    seen = {n: (root / "g" / n / "cvd").read_text() for n in ("long", "b", "c", "d", "own")}
    assert seen == {"long": "5", "b": "7", "c": "7", "d": "7", "own": "9"}
    assert json.loads((root / "placement.json").read_text()) == {f"g/{n}": seen[n] for n in ("long", "b", "c", "d")}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(gs, "visible_gpus", lambda environ=None: [])  # a machine without GPUs, gpus=1
    done = gs.run_jobs([gs.job("g", "cpu", str(script), "0")], tmp_path / "cpu", budget=60, parallel=2,
                       stop_margin=10, progress_every=1000, repo=tmp_path, min_run=1, gpus=1)
    assert (tmp_path / "cpu" / "g" / "cpu" / "cvd").read_text() == "unset"
    assert not (tmp_path / "cpu" / "placement.json").exists()


def test_vera_equal_budget_rank():
    import common

    dims = [(256, 256)] * 4 + [(256, 688)] * 2 + [(688, 256)]
    r = common.vera_equal_budget_r(dims, 39_040)  # one layer's LoRA r=8 count (hidden 256, FFN 688)
    assert r == 5198 and abs(r * len(dims) + sum(o for _, o in dims) - 39_040) <= len(dims) / 2


@pytest.mark.integration  # runs the study scripts as subprocesses
def test_round2_driver_grid_then_seeds_at_the_best_lr(tmp_path):
    """round2.py --smoke on two groups: the seed-0 grid runs, the driver picks each group's best LR from
    the real numbers (lowest held-out ppl; highest value accuracy at the last paper step) and runs seeds
    1 and 2 there. The pretraining runs train the full-rank parts as their own group on a plain cosine
    from --full-rank-lr, the adapters on the jagged schedule at scale alpha / r = 0.5; the UUID runs
    evaluate every --eval-steps steps."""
    import json
    import math

    import round2
    import summarize
    from mora_dist.training.schedule import cosine_lr, jagged_cosine_lr

    out = tmp_path / "r2"
    rc = round2.main([str(out), "--smoke", "--parallel", "4", "--groups", "relora_s0.5", "lora_r8",
                      "--progress-every", "1000"])
    status = json.loads((out / "status.json").read_text())
    assert rc == 0 and len(status) == 8 and all(v.startswith("rc 0") for v in status.values()), status
    sel = {s["group"]: s for s in json.loads((out / "selection.json").read_text())}
    pt = [r for r in summarize.round2_runs(out, "pretrain")]
    uu = [r for r in summarize.round2_runs(out, "uuid")]
    grid_pt = {r["lr"]: summarize._ppl(r) for r in pt if r["seed"] == 0}
    last = max(x["eval_at_step"] for x in uu[0]["recs"] if "eval_at_step" in x)  # < 900 in the smoke runs
    grid_uu = {r["lr"]: summarize._at(r, last, "eval/value_token_acc") for r in uu if r["seed"] == 0}
    assert len(grid_pt) == len(grid_uu) == 2 and all(math.isfinite(v) for v in grid_pt.values())
    assert float(sel["relora_s0.5"]["best_lr"]) == min(grid_pt, key=grid_pt.get)
    assert float(sel["lora_r8"]["best_lr"]) == max(grid_uu, key=grid_uu.get)
    for runs, best in ((pt, sel["relora_s0.5"]["best_lr"]), (uu, sel["lora_r8"]["best_lr"])):
        assert sorted(r["seed"] for r in runs if r["lr"] == float(best)) == [0, 1, 2]
    r = pt[0]
    c = r["cfg"]
    assert c["adapter_scale"] == 0.5 and c["full_rank_lr"] == 5e-4 and c["reset_optimizer"] == "delete"
    steps, every = c["steps"], c["restart_every"]
    recs = [x for x in r["recs"] if "lr_full_rank" in x]
    assert recs[-1]["restarts"] == (steps - 1) // every
    for x in recs:  # a record at step s logs the LR of step s - 1
        s = x["step"] - 1
        assert x["lr_full_rank"] == pytest.approx(cosine_lr(s, 5e-4, c["warmup"], steps, 0.1))
        rw = c["restart_warmup"]
        assert x["lr"] == pytest.approx(jagged_cosine_lr(s, c["lr"], c["warmup"], steps, 0.1, every, rw))
    assert any(x["lr"] != pytest.approx(x["lr_full_rank"] * c["lr"] / 5e-4) for x in recs)  # re-warm-ups differ
    u = uu[0]
    assert u["cfg"]["adapter_scale"] == 2.0  # LoRA's default alpha = 2r
    assert [x["eval_at_step"] for x in u["recs"] if "eval_at_step" in x] == list(range(4, u["cfg"]["steps"] + 1, 4))
    text = summarize.round2_tables(out)
    assert "ReLoRA, scale 0.5" in text and "LoRA r=8" in text and "±" in text
    # --grid-only: the same pick from the same grid, but no seeds queued
    study = round2.Study(out, 20, 3, True, ["relora_s0.5"], seeds=False)
    best = sel["relora_s0.5"]["best_lr"]
    assert study.followup(f"pretrain/relora_s0.5_lr{best}_seed0", status) == []
    assert study.picked[("pretrain", "relora_s0.5")]["best_lr"] == best
    # a later call with only the seeds: --seeds-from the selection, --pt-only drops the UUID group in it
    out2 = tmp_path / "r2_seeds"
    rc = round2.main([str(out2), "--smoke", "--pt-only", "--seeds-from", str(out / "selection.json"),
                      "--progress-every", "1000"])
    status2 = json.loads((out2 / "status.json").read_text())
    assert rc == 0 and sorted(status2) == [f"pretrain/relora_s0.5_lr{best}_seed{sd}" for sd in (1, 2)], status2
    assert all(v.startswith("rc 0") for v in status2.values()) and not (out2 / "selection.json").exists()
    seeds = summarize.round2_runs(out2, "pretrain")
    assert sorted(r["seed"] for r in seeds) == [1, 2] and all(r["lr"] == float(best) for r in seeds)
    assert seeds[0]["cfg"]["restart_every"] == every and seeds[0]["cfg"]["adapter_scale"] == 0.5


def test_round2_runs_merge_directories_and_skip_failed(tmp_path):
    """summarize --round2 DIR DIR: one set of runs over both directories; a run status.json lists as
    failed or not started is skipped (even with records on disk); the same run in two directories is an error."""
    import json

    import summarize

    def run(root, name, lr, seed, ppl, status):
        d = root / "pretrain" / name
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"config": {"lr": lr, "seed": seed, "steps": 10}}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/ppl": ppl}) + "\n")
        st = root / "status.json"
        old = json.loads(st.read_text()) if st.is_file() else {}
        st.write_text(json.dumps(dict(old, **{f"pretrain/{name}": status})))

    a, b = tmp_path / "call1", tmp_path / "call2"
    run(a, "full_lr5e-4_seed0", 5e-4, 0, 3.7, "rc 0 after 9s")
    run(a, "remora_2type_lr1e-3_seed0", 1e-3, 0, 99.0, "rc 1 after 3s")  # failed: must not count
    run(b, "remora_2type_lr1e-3_seed0", 1e-3, 0, 3.8, "rc 0 after 9s")
    st = json.loads((b / "status.json").read_text())
    (b / "status.json").write_text(json.dumps(dict(st, **{"pretrain/remora_2type_lr1e-3_seed1": "not started"})))
    runs = summarize.round2_runs([a, b], "pretrain")
    assert sorted((r["group"], summarize._ppl(r)) for r in runs) == [("full", 3.7), ("remora_2type", 3.8)]
    assert summarize.round2_runs(a, "pretrain")[0]["group"] == "full"  # one directory as before
    skipped = summarize.round2_skipped([a, b])
    assert skipped == ["call1, rc 1 (1 run): pretrain/remora_2type_lr1e-3_seed0",
                       "call2, not started (1 run): pretrain/remora_2type_lr1e-3_seed1"]
    text = summarize.round2_tables([a, b])
    assert "ReMoRA, types 1-2" in text and "99.000" not in text and "Skipped" in text
    run(tmp_path / "call3", "full_lr5e-4_seed0", 5e-4, 0, 3.6, "rc 0 after 9s")
    with pytest.raises(ValueError, match="both"):
        summarize.round2_runs([a, tmp_path / "call3"], "pretrain")
