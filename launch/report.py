"""Turn one or more runs' metrics.jsonl into a Markdown report with plots.

    python launch/report.py RUN_DIR [RUN_DIR ...] --out REPORT_DIR [--warmup N]

Writes REPORT_DIR/report.md and PNGs: loss (and eval perplexities) vs step, tokens/s and TFLOP/s
per GPU vs step, peak memory vs step, and, when the runs differ in `num_gpus` (from run.json), a
scaling plot and table. Means exclude warm-up steps (records flagged `"warmup": true` by
StepMeter; for records without the flag, a run's first --warmup records) and are time-weighted
(total tokens / total time). Malformed lines are skipped with a warning and counted in the report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mora_dist.metrics.jsonl import read_metrics  # noqa: E402
from mora_dist.metrics.logger import METRICS_FILE, RUN_FILE  # noqa: E402

DEFAULT_WARMUP = 2
NA = "n/a"


class ReportError(Exception):
    """A run directory cannot be reported on; the message names the directory or file."""


@dataclass
class Run:
    name: str
    dir: Path
    num_gpus: int | None
    records: list
    skipped: list = field(default_factory=list)
    superseded: int = 0


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_run(run_dir) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{run_dir}: no {METRICS_FILE} (expected {path})")
    data = read_metrics(path)
    for no, why in data.skipped:
        print(f"warning: {path}:{no}: skipped malformed line: {why}", file=sys.stderr)
    if not data.records:
        raise ReportError(f"{path}: no valid metric records ({len(data.skipped)} malformed line(s))")
    meta = {}
    if (run_dir / RUN_FILE).is_file():
        try:
            meta = json.loads((run_dir / RUN_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{run_dir / RUN_FILE}: invalid JSON ({e})") from None
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    gpus = meta.get("num_gpus") or cfg.get("num_gpus") or data.records[-1].get("num_gpus")
    return Run(name=str(meta.get("run_name") or run_dir.resolve().name), dir=run_dir,
               num_gpus=int(gpus) if gpus else None, records=data.records,
               skipped=data.skipped, superseded=data.superseded)


def _weighted_mean(recs: list, key: str):
    """Time-weighted mean of a rate (sum(rate*dt)/sum(dt)) when every record has a step time,
    otherwise the plain mean; None without data."""
    pts = [(r[key], r.get("step_time")) for r in recs if _num(r.get(key))]
    if not pts:
        return None
    if all(_num(dt) and dt > 0 for _, dt in pts):
        return sum(v * dt for v, dt in pts) / sum(dt for _, dt in pts)
    return sum(v for v, _ in pts) / len(pts)


def summarize(run: Run, warmup: int = DEFAULT_WARMUP) -> dict:
    recs = run.records
    steady = [r for i, r in enumerate(recs) if not (r["warmup"] if "warmup" in r else i < warmup)]
    losses = [r["loss"] for r in recs if _num(r.get("loss"))]
    mems = [r["peak_mem_gib"] for r in recs if _num(r.get("peak_mem_gib"))]
    basis = steady or recs  # a run shorter than its warm-up: average what there is, and say so
    tps = _weighted_mean(basis, "tokens_per_s")
    tps_gpu = _weighted_mean(basis, "tokens_per_s_per_gpu")
    if tps_gpu is None and tps is not None and run.num_gpus:
        tps_gpu = tps / run.num_gpus
    evals = {}
    for r in recs:
        evals.update({k: v for k, v in r.items() if k.startswith("eval/") and _num(v)})
    return dict(steps=len(recs), last_step=recs[-1]["step"], steady_steps=len(steady),
                includes_warmup=not steady, final_loss=losses[-1] if losses else None,
                tokens_per_s=tps, tokens_per_s_per_gpu=tps_gpu,
                tflops_per_gpu=_weighted_mean(basis, "tflops_per_gpu"), mfu=_weighted_mean(basis, "mfu"),
                peak_mem_gib=max(mems) if mems else None, evals=evals)


def _f(v, fmt: str) -> str:
    return NA if v is None else format(v, fmt)


def _pct(v) -> str:
    return NA if v is None else f"{100 * v:.1f}%"


# -- plots ---------------------------------------------------------------------------------
def _series(run: Run, key: str):
    pts = [(r["step"], r[key]) for r in run.records if _num(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_plots(runs: list, out: Path, scaling: list | None) -> dict:
    """PNG files by section name; empty when matplotlib is missing (a notice is printed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed: report without plots (pip install matplotlib)",
              file=sys.stderr)
        return {}
    files = {}

    def panel(name: str, keys: list, ylabels: list, title: str, marker=None):
        if not any(_series(r, k)[0] for r in runs for k in keys):
            return
        fig, axes = plt.subplots(len(keys), 1, figsize=(8, 3.2 * len(keys)), squeeze=False)
        for ax, key, ylabel in zip(axes[:, 0], keys, ylabels):
            for r in runs:
                xs, ys = _series(r, key)
                if xs:
                    ax.plot(xs, ys, marker=marker, label=r.name)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files[name.rsplit(".", 1)[0]] = name

    panel("loss.png", ["loss"], ["training loss"], "Loss")
    eval_keys = sorted({k for r in runs for rec in r.records for k in rec if k.startswith("eval/")})
    if eval_keys:
        panel("eval.png", eval_keys, eval_keys, "Evaluation", marker="o")
    panel("throughput.png", ["tokens_per_s", "tflops_per_gpu"], ["tokens/s (global)", "TFLOP/s per GPU"],
          "Throughput")
    panel("memory.png", ["peak_mem_gib"], ["peak memory (GiB)"], "Peak memory")
    if scaling:
        fig, ax = plt.subplots(figsize=(6, 4))
        g = [row["num_gpus"] for row in scaling]
        ax.plot(g, [row["tokens_per_s"] for row in scaling], "o-", label="measured")
        base = scaling[0]
        ax.plot(g, [base["tokens_per_s"] * n / base["num_gpus"] for n in g], "--", label="linear")
        ax.set_xticks(g)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("tokens/s")
        ax.set_title("Scaling")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=100)
        plt.close(fig)
        files["scaling"] = "scaling.png"
    return files


# -- report --------------------------------------------------------------------------------
def scaling_rows(runs: list, summaries: list) -> list:
    """Rows sorted by GPUs, efficiency relative to the run with the fewest GPUs; [] unless the
    runs differ in num_gpus."""
    rows = [dict(name=r.name, num_gpus=r.num_gpus, tokens_per_s=s["tokens_per_s"])
            for r, s in zip(runs, summaries) if r.num_gpus and s["tokens_per_s"] is not None]
    if len({row["num_gpus"] for row in rows}) < 2:
        return []
    rows.sort(key=lambda row: row["num_gpus"])
    base = rows[0]["tokens_per_s"] / rows[0]["num_gpus"]
    for row in rows:
        row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / row["num_gpus"]
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["efficiency"] = row["tokens_per_s_per_gpu"] / base
    return rows


def render(runs: list, summaries: list, scaling: list, plots: dict, warmup: int) -> str:
    md = ["# Training report", "", "Runs: " + ", ".join(f"`{r.name}` ({r.dir})" for r in runs), ""]
    md += ["## Summary", "",
           "| run | GPUs | steps | final loss | tokens/s | tokens/s/GPU | TFLOP/s/GPU | MFU | peak mem (GiB) "
           "| skipped lines |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r, s in zip(runs, summaries):
        md.append(f"| {r.name} | {r.num_gpus or NA} | {s['last_step']} | {_f(s['final_loss'], '.4f')} "
                  f"| {_f(s['tokens_per_s'], ',.0f')} | {_f(s['tokens_per_s_per_gpu'], ',.0f')} "
                  f"| {_f(s['tflops_per_gpu'], '.1f')} | {_pct(s['mfu'])} "
                  f"| {_f(s['peak_mem_gib'], '.2f')} | {len(r.skipped)} |")
    md += ["", f"Means are time-weighted and exclude warm-up steps (flagged by the meter, else the first "
           f"{warmup} records). MFU is relative to the peak FLOP/s the run's meter was given."]
    short = [r.name for r, s in zip(runs, summaries) if s["includes_warmup"]]
    if short:
        md.append(f"Runs with no step after warm-up (means include warm-up): {', '.join(short)}.")
    if any(s["evals"] for s in summaries):
        keys = sorted({k for s in summaries for k in s["evals"]})
        md += ["", "## Evaluation (last value)", "", "| run | " + " | ".join(keys) + " |",
               "| --- |" + " ---: |" * len(keys)]
        for r, s in zip(runs, summaries):
            md.append(f"| {r.name} | " + " | ".join(_f(s["evals"].get(k), ".3f") for k in keys) + " |")
    for title, key in [("Loss", "loss"), ("Evaluation perplexity", "eval"), ("Throughput", "throughput"),
                       ("Memory", "memory")]:
        if key in plots:
            md += ["", f"## {title}", "", f"![{title}]({plots[key]})"]
    if scaling:
        md += ["", "## Scaling", "", f"Efficiency: tokens/s per GPU relative to `{scaling[0]['name']}` "
               f"({scaling[0]['num_gpus']} GPU(s)).", "",
               "| run | GPUs | tokens/s | tokens/s/GPU | speed-up | efficiency |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in scaling:
            md.append(f"| {row['name']} | {row['num_gpus']} | {row['tokens_per_s']:,.0f} "
                      f"| {row['tokens_per_s_per_gpu']:,.0f} | {row['speedup']:.2f} | {_pct(row['efficiency'])} |")
        if "scaling" in plots:
            md += ["", f"![Scaling]({plots['scaling']})"]
    if not plots:
        md += ["", "_No plots: matplotlib is not installed._"]
    bad = [(r, no, why) for r in runs for no, why in r.skipped]
    if bad or any(r.superseded for r in runs):
        md += ["", "## Data quality", ""]
        for r in runs:
            if r.skipped:
                md.append(f"- `{r.name}`: {len(r.skipped)} malformed line(s) skipped in {r.dir / METRICS_FILE}: "
                          + "; ".join(f"line {no} ({why})" for no, why in r.skipped[:20])
                          + (" ..." if len(r.skipped) > 20 else ""))
            if r.superseded:
                md.append(f"- `{r.name}`: {r.superseded} record(s) superseded by a resumed run's redo.")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", required=True, metavar="REPORT_DIR")
    ap.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                    help="records treated as warm-up when they carry no 'warmup' flag (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.runs]
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    seen = {}
    for r in runs:  # the same name twice would make the tables ambiguous
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}#{seen[r.name]}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(r, args.warmup) for r in runs]
    scaling = scaling_rows(runs, summaries)
    plots = write_plots(runs, out, scaling)
    (out / "report.md").write_text(render(runs, summaries, scaling, plots, args.warmup))
    print(f"wrote {out / 'report.md'} and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
