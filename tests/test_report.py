"""launch/report.py on synthetic runs written by the real MetricsLogger + StepMeter."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mora_dist.metrics import DecoderShape, MetricsLogger, StepMeter, full_ft_flops_per_token

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "launch" / "report.py"
FPT = full_ft_flops_per_token(DecoderShape(hidden=2048, layers=22, heads=32, kv_groups=4, ffn=5632,
                                           vocab=32000, seq=2048))
PEAK = 989e12
TOK = 4 * 2048  # tokens per step per GPU


def _report_module():
    spec = importlib.util.spec_from_file_location("mora_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _write_run(path, name, gpus, times, mem_gib, evals=True):
    meter = StepMeter(TOK * gpus, gpus, FPT, peak_flops=PEAK, warmup_steps=2)
    with open(path.parent / f"{name}.console", "w") as con, \
            MetricsLogger(path, name, dict(num_gpus=gpus, seq=2048), rank=0, num_gpus=gpus, stream=con) as log:
        for step, t in enumerate(times, 1):
            m = dict(loss=4.0 - 0.25 * step + 0.01 * gpus, lr=1e-4, grad_norm=1.0,
                     **meter.record(t, peak_mem_bytes=int(mem_gib[step - 1] * 2**30)))
            if evals and step % 3 == 0:
                m.update({"eval/domain_ppl": 20.0 - step, "eval/general_ppl": 30.0 - step})
            log.log(step, m)
    return meter.summary()


def _table(md: str, heading: str) -> list:
    """Rows of the first Markdown table after `heading`, as dicts keyed by the header."""
    lines = md.split(heading, 1)[1].splitlines()
    rows = [ln for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("|"))):]]
    rows = rows[:next((i for i, ln in enumerate(rows) if not ln.startswith("|")), len(rows))]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    return [dict(zip(cells[0], r)) for r in cells[2:]]


def _n(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


@pytest.mark.integration
def test_report_two_runs_scaling(tmp_path):
    times1 = [4.0, 2.0, 0.50, 0.52, 0.48, 0.50]
    times2 = [5.0, 2.5, 0.55, 0.56, 0.54, 0.60]
    s1 = _write_run(tmp_path / "one", "one", 1, times1, [10, 11, 12, 12, 12, 12])
    s2 = _write_run(tmp_path / "two", "two", 2, times2, [9, 13, 13.5, 13, 13, 13])
    mfile = tmp_path / "one" / "metrics.jsonl"  # a corrupt line 4 must be skipped, not fatal
    lines = mfile.read_text().splitlines(keepends=True)
    mfile.write_text("".join(lines[:3] + ["{oops\n"] + lines[3:]))

    out = tmp_path / "report"
    res = subprocess.run([sys.executable, str(REPORT), str(tmp_path / "one"), str(tmp_path / "two"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"{mfile}:4: skipped malformed line" in res.stderr
    for png in ["loss.png", "eval.png", "throughput.png", "memory.png", "scaling.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    md = (out / "report.md").read_text()

    summary = {row["run"]: row for row in _table(md, "## Summary")}
    for name, gpus, s, times, mem in [("one", 1, s1, times1, 12.0), ("two", 2, s2, times2, 13.5)]:
        row = summary[name]
        tps = TOK * gpus * 4 / sum(times[2:])  # warm-up (2 steps) excluded, time-weighted
        assert tps == pytest.approx(s["tokens_per_s"])  # report agrees with the meter's own summary
        assert int(row["GPUs"]) == gpus and int(row["steps"]) == 6
        assert _n(row["final loss"]) == pytest.approx(4.0 - 1.5 + 0.01 * gpus, abs=5e-5)
        assert _n(row["tokens/s"]) == pytest.approx(tps, abs=0.5)
        assert _n(row["tokens/s/GPU"]) == pytest.approx(tps / gpus, abs=0.5)
        assert _n(row["TFLOP/s/GPU"]) == pytest.approx(tps * FPT / gpus / 1e12, abs=0.05)
        assert _n(row["MFU"]) == pytest.approx(100 * tps * FPT / gpus / PEAK, abs=0.05)
        assert _n(row["peak mem (GiB)"]) == pytest.approx(mem, abs=0.005)
    assert summary["one"]["skipped lines"] == "1" and summary["two"]["skipped lines"] == "0"
    assert "line 4 (invalid JSON" in md

    evals = {row["run"]: row for row in _table(md, "## Evaluation")}
    assert _n(evals["two"]["eval/domain_ppl"]) == 14.0 and _n(evals["one"]["eval/general_ppl"]) == 24.0

    scaling = {row["run"]: row for row in _table(md, "## Scaling")}
    t1, t2 = s1["tokens_per_s"], s2["tokens_per_s"]
    assert _n(scaling["one"]["efficiency"]) == 100.0
    assert _n(scaling["two"]["speed-up"]) == pytest.approx(t2 / t1, abs=0.005)
    assert _n(scaling["two"]["efficiency"]) == pytest.approx(100 * (t2 / 2) / t1, abs=0.05)
    assert "![Scaling](scaling.png)" in md


@pytest.mark.integration
def test_report_other_writers_and_same_gpus(tmp_path):
    """Records without a warm-up flag (e.g. training/run.py's log): the first --warmup are left
    out; runs with equal num_gpus get no scaling section; a resumed redo supersedes old steps."""
    run = tmp_path / "plain"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(dict(config=dict(lr=1), num_gpus=1)))
    recs = [dict(step=s, loss=5.0 - s, step_time=t, tokens_per_s=1000 / t)
            for s, t in [(1, 10.0), (2, 1.0), (3, 2.0), (2, 1.0), (3, 1.0), (4, 2.0)]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    _write_run(tmp_path / "b", "b", 1, [1.0] * 3, [1, 1, 1], evals=False)
    rep = _report_module()
    assert rep.main([str(run), str(tmp_path / "b"), "--out", str(tmp_path / "r"), "--warmup", "1"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    row = {r["run"]: r for r in _table(md, "## Summary")}["plain"]
    # steps 1, 2, 3(redo), 4; step 1 is warm-up: (1000 + 1000 + 1000) tokens / (1 + 1 + 2) s
    assert int(row["steps"]) == 4 and _n(row["tokens/s"]) == 750 and _n(row["final loss"]) == 1.0
    assert row["TFLOP/s/GPU"] == "n/a" and row["MFU"] == "n/a"
    assert "## Scaling" not in md and "## Evaluation" not in md
    assert "2 record(s) superseded" in md


def test_report_errors_name_the_path(tmp_path, capsys):
    rep = _report_module()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rep.main([str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no metrics.jsonl" in err
    assert rep.main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "missing: not a directory" in capsys.readouterr().err
    (empty / "metrics.jsonl").write_text("garbage\n")
    assert rep.main([str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{empty / 'metrics.jsonl'}:1: skipped" in err and "no valid metric records" in err
    assert not (tmp_path / "r" / "report.md").exists()
