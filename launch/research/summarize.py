"""Tables (Markdown, printed) and plots (PNG) for docs/results/ from the runs' metrics.jsonl.

    python launch/research/summarize.py results/runs --out docs/results             # CPU runs
    python launch/research/summarize.py --study results/gpu/sweep [--study DIR ...] \
        --out docs/results/gpu                                                              # GPU study

GPU study (launch/research/gpu_study.py layout, DIR/uuid/<run>/, DIR/pretrain/<run>/): the LR-sweep
table of every method with the best LR marked (UUID: highest final exact match, then final
value-token accuracy, then lowest final loss; pretraining: lowest final held-out perplexity) and a
note where the best LR is at the edge of the method's grid; plots of exact match and value-token
accuracy per epoch at each method's best LR (uuid_curves.png), final exact match / value accuracy
against LR (uuid_lr_sweep.png), held-out perplexity against step at each best LR and final
perplexity against LR (pretrain_gpu.png).

Round 2 (launch/research/round2.py layout, DIR/{pretrain,uuid}/<group>_lr<lr>_seed<s>/):

    python launch/research/summarize.py --round2 DIR [DIR ...] --out docs/results/round2

reads the runs of every DIR as one set (a run that status.json lists as failed or not started is
skipped; the same run in two directories is an error), prints the tables (LR grids at seed 0; mean +- sd
over the seeds at each group's picked LR; per-character accuracy and exact match at steps 300/500/700/900;
method gaps against the seed spread, with a verdict) and, with matplotlib, writes round2_pretrain.png and
round2_uuid.png. `round2_tables` needs no matplotlib (the driver prints it on the device).
"""
import argparse
import json
import math
import statistics
from pathlib import Path

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402
except ImportError:  # tables only (round2_tables on a device without matplotlib)
    plt = None


# value-token accuracy reachable from the UUID4 format alone: 4 dashes + version '4' exact, variant
# char 1 of {8,9,a,b}, 30 uniform hex chars: (4 + 1 + 1/4 + 30/16) / 36
FORMAT_FLOOR = (4 + 1 + 0.25 + 30 / 16) / 36


def load(d):
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return json.loads((d / "run.json").read_text())["config"], recs


def label(cfg):
    m = cfg["method"]
    return {"mora": f"MoRA-{cfg.get('mora_type')}", "lora": "LoRA", "vera": "VeRA", "fft": "FFT"}.get(m, m)


def runs(root):
    return [d for d in sorted(Path(root).iterdir()) if (d / "metrics.jsonl").is_file()] if Path(root).is_dir() else []


def uuid_tables(root, out):
    lines = []
    for part in ("uuid_sweep", "uuid_final"):
        rs = runs(Path(root) / part)
        if not rs:
            continue
        lines += [f"\n### {part}\n", "| method | r | trainable | lr | epochs | final loss | value-token acc | exact match | best EM (epoch) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
        for cfg, recs in sorted((load(d) for d in rs), key=lambda cr: (label(cr[0]), cr[0]["lr"])):
            ev = [r for r in recs if "eval/exact_match" in r]
            if not ev:
                continue
            last = ev[-1]
            best = max(ev, key=lambda r: (r["eval/exact_match"], -r["epoch"]))
            lines.append(f"| {label(cfg)} | {cfg['r'] if cfg['method'] != 'fft' else '-'} | {cfg['trainable']:,} | {cfg['lr']:g} | "
                         f"{last['epoch']} | {last.get('loss', float('nan')):.4f} | {last['eval/value_token_acc']:.3f} | "
                         f"{last['eval/exact_match']:.3f} | {best['eval/exact_match']:.3f} ({best['epoch']}) |")
            lab = f"{label(cfg)} lr={cfg['lr']:g}"
            ax[0].plot([r["epoch"] for r in ev], [r["eval/exact_match"] for r in ev], label=lab)
            ax[1].plot([r["epoch"] for r in ev], [r["eval/value_token_acc"] for r in ev], label=lab)
        ax[0].set(xlabel="epoch", ylabel="exact match (256 pairs)", title=f"UUID memorisation: {part}")
        ax[1].axhline(FORMAT_FLOOR, color="k", ls=":", lw=1, label="UUID-format floor (no memorisation)")
        ax[1].set(xlabel="epoch", ylabel="value-token accuracy (teacher forcing)")
        ax[1].legend(fontsize=6 if part == "uuid_sweep" else 8)
        fig.tight_layout()
        fig.savefig(Path(out) / f"{part}.png", dpi=110)
        plt.close(fig)
    return lines


def pretrain_tables(root, out):
    rs = runs(Path(root) / "pretrain")
    if not rs:
        return []
    lines = ["\n### pretraining\n", "| run | trainable | lr | steps | restarts | final train loss (mean last 25) | held-out ppl (final) | best held-out ppl |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    for cfg, recs in sorted((load(d) for d in rs), key=lambda cr: (cr[0]["method"], cr[0]["lr"])):
        name = {"full": "full-rank", "lora": "ReLoRA", "mora": "ReMoRA"}[cfg["method"]]
        ev = [r for r in recs if "eval/ppl" in r]
        if len(ev) < 2:
            continue
        tr = [r for r in recs if "loss" in r]
        tail = sum(r["loss"] for r in tr[-25:]) / max(1, len(tr[-25:]))
        lines.append(f"| {name} | {cfg['trainable']:,} | {cfg['lr']:g} | {tr[-1]['step']} | {tr[-1].get('restarts', 0)} | "
                     f"{tail:.4f} | {ev[-1]['eval/ppl']:.3f} | {min(r['eval/ppl'] for r in ev):.3f} |")
        ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label=f"{name} lr={cfg['lr']:g}", lw=0.8)
        ax[1].plot([r["step"] for r in ev], [r["eval/ppl"] for r in ev], marker="o", ms=3, label=f"{name} lr={cfg['lr']:g}")
    ax[0].set(xlabel="step", ylabel="train loss (nats/byte)", title="byte-level pretraining from scratch", ylim=(1.0, 3.5))
    ax[1].set(xlabel="step", ylabel="held-out perplexity (per byte)", yscale="log")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "pretrain.png", dpi=110)
    plt.close(fig)
    return lines


# --- GPU study ------------------------------------------------------------------------------------
def _gpu_study():
    """The study driver module beside this script (its run-directory readers)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_study

    return gpu_study


def study_rows(studies):
    """gpu_study.collect rows of every study dir, each with its run dir (`path`) and records."""
    gpu_study = _gpu_study()
    rows = []
    for st in studies:
        for r in gpu_study.collect(st):
            r["path"] = Path(st) / r["run"]
            r["study"] = Path(st).name
            r["cfg"], r["recs"] = load(r["path"])
            rows.append(r)
    return rows


def group_by(rows, key) -> dict:
    """{key(row): [rows with that key]} in row order."""
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def run_seed(r) -> int:
    return r["cfg"].get("seed", 0)


def uuid_key(r):
    return (r["exact_match"], r["value_acc"], -(r["loss"] if r["loss"] is not None else 9e9))


def setting(r):
    """Runs comparable in an LR sweep: same method, pairs, planned epochs and seed."""
    c = r["cfg"]
    return (r["method"], c.get("n_pairs"), c.get("epochs"), run_seed(r)) if r["kind"] == "uuid" else \
        (r["method"], c.get("steps"), c.get("r"))


def best_by_setting(rows, kind):
    """{setting: (best row, 'low edge'|'high edge'|'interior'|'single LR')}"""
    groups = group_by([r for r in rows if r["kind"] == kind], setting)
    out = {}
    for k, rs in groups.items():
        best = max(rs, key=uuid_key) if kind == "uuid" else min(rs, key=lambda r: r["ppl"])
        lrs = sorted({r["lr"] for r in rs})
        edge = ("single LR" if len(lrs) == 1 else "low edge" if best["lr"] == lrs[0] else
                "high edge" if best["lr"] == lrs[-1] else "interior")
        out[k] = (best, edge)
    return out


def _fmt(x, f):
    return "-" if x is None else format(x, f)


def gpu_uuid(rows, out):
    rows = [r for r in rows if r["kind"] == "uuid"]
    if not rows:
        return []
    best = best_by_setting(rows, "uuid")
    # the main setting: the (pairs, epochs) with most runs; its seed-0 runs are the LR sweep
    main = max({(k[1], k[2]) for k in best}, key=lambda pe: sum(1 for r in rows if (r["n_pairs"], r["cfg"]["epochs"]) == pe))
    best = {k: v for k, v in best.items() if (k[1], k[2]) == main and k[3] == 0}
    bests = {id(b) for b, _ in best.values()}
    sweep = [r for r in rows if (r["n_pairs"], r["cfg"]["epochs"]) == main and run_seed(r) == 0]
    lines = ["\n### UUID memorisation: LR sweep (best LR per method in bold)\n",
             "| method | trainable | pairs | seed | lr | epochs | final EM | best EM (epoch) | first epoch EM>=0.9 "
             "| value-token acc | final loss |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(sweep, key=lambda r: (setting(r), r["lr"])):
        b = "**" if id(r) in bests else ""
        ep = f"{r['epochs']}/{r['epochs_planned']}" + (" cut" if r["truncated"] else "")
        lines.append(f"| {b}{r['method']}{b} | {r['trainable']:,} | {r['n_pairs']} | {run_seed(r)} | {b}{r['lr']:g}{b} "
                     f"| {ep} | {b}{r['exact_match']:.3f}{b} | {r['best_exact_match']:.3f} ({r['best_epoch']}) "
                     f"| {_fmt(r['epoch_em90'], 'd')} | {r['value_acc']:.3f} | {_fmt(r['loss'], '.4f')} |")
    lines += ["\nBest LR per setting (grid position):\n"]
    lines += [f"- {k[0]} ({k[1]} pairs, {k[2]} epochs, seed {k[3]}): lr {b['lr']:g} ({edge}), final EM {b['exact_match']:.3f}"
              for k, (b, edge) in sorted(best.items())]
    # curves: the main setting at each method's best LR
    colors = {}
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.6))
    for k, (b, _) in sorted(best.items()):
        if (k[1], k[2]) != main or k[3] != 0:
            continue
        ev = [x for x in b["recs"] if "eval/exact_match" in x]
        lab = f"{k[0]} lr={b['lr']:g} ({b['trainable']:,} trainable)"
        line, = ax[0].plot([x["epoch"] for x in ev], [x["eval/exact_match"] for x in ev], label=lab)
        colors[k[0]] = line.get_color()
        ax[1].plot([x["epoch"] for x in ev], [x["eval/value_token_acc"] for x in ev], label=lab, color=colors[k[0]])
    ax[0].set(xlabel="epoch", ylabel=f"exact match (fraction of {main[0]} pairs)",
              title=f"UUID memorisation, best LR per method ({main[1]} epochs, seed 0)")
    ax[1].axhline(FORMAT_FLOOR, color="k", ls=":", lw=1, label="UUID-format floor")
    ax[1].set(xlabel="epoch", ylabel="value-token accuracy (teacher forcing)")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out) / "uuid_curves.png", dpi=110)
    plt.close(fig)
    # seeds and longer runs: every run outside the main seed-0 sweep, with its seed-0 sweep twin
    extra = [r for r in rows if (r["n_pairs"], r["cfg"]["epochs"]) != main or run_seed(r) != 0]
    if extra:
        fig, ax = plt.subplots(figsize=(8, 4.6))
        for r in sorted(rows, key=lambda r: (r["method"], r["lr"], r["cfg"]["epochs"], run_seed(r))):
            twin = (r["n_pairs"], r["cfg"]["epochs"]) == main and run_seed(r) == 0
            if not (r in extra or (twin and any(x["method"] == r["method"] and x["lr"] == r["lr"] for x in extra))):
                continue
            ev = [x for x in r["recs"] if "eval/exact_match" in x]
            sd, ep = run_seed(r), r["cfg"]["epochs"]
            ls = "--" if ep != main[1] else ["-", ":", "-."][sd % 3]
            lab = f"{r['method']} lr={r['lr']:g}, {ep} ep, seed {sd}"
            ax.plot([x["epoch"] for x in ev], [x["eval/exact_match"] for x in ev], ls=ls, label=lab,
                    color=colors.get(r["method"]))
        ax.set(xlabel="epoch", ylabel="exact match", title="UUID: seeds (adapter init, data order) and 150-epoch runs")
        ax.legend(fontsize=6.5)
        fig.tight_layout()
        fig.savefig(Path(out) / "uuid_seeds.png", dpi=110)
        plt.close(fig)
    # seed table: runs sharing method, lr, pairs and epochs
    by = group_by(rows, lambda r: (r["method"], r["lr"], r["n_pairs"], r["cfg"]["epochs"]))
    multi = {k: v for k, v in by.items() if len(v) > 1 or k[3] != main[1]}
    if multi:
        lines += ["\n### UUID: seeds and longer runs\n",
                  "| method | lr | pairs | epochs | seeds | final EM per seed | mean EM | mean value-token acc |",
                  "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
        for k, v in sorted(multi.items()):
            v = sorted(v, key=run_seed)
            ems = [r["exact_match"] for r in v]
            lines.append(f"| {k[0]} | {k[1]:g} | {k[2]} | {k[3]} | {', '.join(str(run_seed(r)) for r in v)} "
                         f"| {', '.join(f'{e:.3f}' for e in ems)} | {sum(ems) / len(ems):.3f} "
                         f"| {sum(r['value_acc'] for r in v) / len(v):.3f} |")
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    groups = group_by(rows, setting)
    for k, rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["lr"])
        lab = f"{k[0]} ({k[1]} pairs, {k[2]} ep" + (f", seed {k[3]})" if k[3] else ")")
        ax[0].plot([r["lr"] for r in rs], [r["exact_match"] for r in rs], marker="o", label=lab)
        ax[1].plot([r["lr"] for r in rs], [r["value_acc"] for r in rs], marker="o", label=lab)
    for a in ax:
        _lr_axis(a, [r["lr"] for r in rows])
    ax[0].set(xlabel="peak learning rate", ylabel="final exact match", title="UUID LR sweep")
    ax[1].axhline(FORMAT_FLOOR, color="k", ls=":", lw=1)
    ax[1].set(xlabel="peak learning rate", ylabel="final value-token accuracy")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out) / "uuid_lr_sweep.png", dpi=110)
    plt.close(fig)
    return lines


def _lr_axis(ax, lrs) -> None:
    """Log-scale LR axis labelled at the grid's points (matplotlib's minor labels overlap)."""
    from matplotlib.ticker import NullFormatter

    ticks = []
    for t in sorted(set(lrs)):  # grid points at least 1.45x apart get a label
        if not ticks or t >= 1.45 * ticks[-1]:
            ticks.append(t)
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=45, fontsize=7)
    ax.xaxis.set_minor_formatter(NullFormatter())


def pretrain_seed_table(rows) -> list:
    """Held-out perplexity per seed for every (method, lr) that has runs at seeds other than 0."""
    groups = group_by(rows, lambda r: (r["method"], r["lr"], r["cfg"].get("steps"), r["cfg"].get("r")))
    groups = {k: sorted(v, key=run_seed) for k, v in groups.items() if any(run_seed(r) for r in v)}
    if not groups:
        return []
    lines = ["\n### Pretraining: seeds (base init and batch order) at each method's best LR\n",
             "| method | lr | steps | seeds | held-out ppl per seed | mean | spread (max - min) |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for (m, lr, steps, _), v in sorted(groups.items()):
        p = [r["ppl"] for r in v]
        lines.append(f"| {m} | {lr:g} | {steps} | {', '.join(str(run_seed(r)) for r in v)} "
                     f"| {', '.join(f'{x:.3f}' for x in p)} | {sum(p) / len(p):.3f} | {max(p) - min(p):.3f} |")
    return lines


def gpu_pretrain(rows, out):
    rows = [r for r in rows if r["kind"] == "pretrain"]
    if not rows:
        return []
    seed_lines = pretrain_seed_table(rows)
    rows = [r for r in rows if not run_seed(r)]  # the LR sweep is seed 0
    best = best_by_setting(rows, "pretrain")
    bests = {id(b) for b, _ in best.values()}
    lines = ["\n### Pretraining from scratch: LR sweep (best LR per method in bold)\n",
             "| method | r | trainable | lr | steps | restarts | final train loss | final held-out ppl | best held-out ppl |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (setting(r), r["lr"])):
        b = "**" if id(r) in bests else ""
        st = f"{r['steps']}/{r['steps_planned']}" + (" cut" if r["truncated"] else "")
        rr = "-" if r["method"] == "full-rank" else r["cfg"]["r"]
        lines.append(f"| {b}{r['method']}{b} | {rr} | {r['trainable']:,} | {b}{r['lr']:g}{b} | {st} | {r['restarts']} "
                     f"| {_fmt(r['loss'], '.4f')} | {b}{r['ppl']:.3f}{b} | {r['best_ppl']:.3f} |")
    lines += ["\nBest LR per method (grid position):\n"]
    lines += [f"- {k[0]} ({k[1]} steps): lr {b['lr']:g} ({edge}), held-out ppl {b['ppl']:.3f}"
              for k, (b, edge) in sorted(best.items())]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    for k, (b, _) in sorted(best.items()):
        tr = [x for x in b["recs"] if "loss" in x]
        ev = [x for x in b["recs"] if "eval/ppl" in x]
        ax[0].plot([x["step"] for x in tr], [x["loss"] for x in tr], lw=0.8, label=f"{k[0]} lr={b['lr']:g}")
        ax[1].plot([x["step"] for x in ev], [x["eval/ppl"] for x in ev], marker="o", ms=3, label=f"{k[0]} lr={b['lr']:g}")
    groups = group_by(rows, setting)
    for k, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["lr"])
        ax[2].plot([r["lr"] for r in rs], [r["ppl"] for r in rs], marker="o", label=f"{k[0]} ({k[1]} steps)")
    ax[0].set(xlabel="step", ylabel="train loss (nats/byte)", title="byte-level pretraining, best LR per method")
    lo = min(x["loss"] for r in rows for x in r["recs"] if "loss" in x)
    ax[0].set_ylim(lo * 0.95, lo * 2.2)
    ax[1].set(xlabel="step", ylabel="held-out perplexity (per byte)", yscale="log")
    _lr_axis(ax[2], [r["lr"] for r in rows])
    ax[2].set(xlabel="peak learning rate", ylabel="final held-out perplexity", title="LR sweep")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "pretrain_gpu.png", dpi=110)
    plt.close(fig)
    return lines + seed_lines


# --- round 2 (issue 20) -----------------------------------------------------------------------------
UUID_STEPS = (300, 500, 700, 900)  # the steps of the MoRA paper's Table 2
PT_NAMES = {"full": "full-rank", "relora_s0.5": "ReLoRA, scale 0.5", "relora_s2": "ReLoRA, scale 2",
            "remora_2type": "ReMoRA, types 1-2", "remora_4type": "ReMoRA, types 1-4",
            "lora_norestart": "LoRA (no restarts), scale 2", "mora_norestart": "MoRA (no restarts)"}
UUID_NAMES = {"lora_r8": "LoRA r=8", "mora_decouple_r8": "MoRA decouple r=8", "mora_rotation_r8": "MoRA rotation r=8",
              "mora_sharing_r8": "MoRA sharing r=8", "mora_sharing_r64": "MoRA sharing r=64"}
# (a, b): is a's seed-mean perplexity below b's by more than the seed spread?
PT_PAIRS = [("remora_2type", "relora_s0.5"), ("remora_2type", "relora_s2"), ("remora_4type", "relora_s0.5"),
            ("remora_4type", "relora_s2"), ("remora_2type", "remora_4type"), ("relora_s0.5", "relora_s2"),
            ("mora_norestart", "lora_norestart"), ("remora_2type", "mora_norestart"), ("relora_s0.5", "lora_norestart"),
            ("relora_s2", "lora_norestart"), ("full", "relora_s2"), ("full", "remora_2type")]
# (a, b): is a's seed-mean per-character accuracy (exact match) above b's by more than the seed spread?
UUID_PAIRS = [("mora_decouple_r8", "lora_r8"), ("mora_rotation_r8", "lora_r8"), ("mora_sharing_r8", "lora_r8"),
              ("mora_sharing_r64", "mora_sharing_r8"), ("mora_decouple_r8", "mora_sharing_r8"),
              ("mora_rotation_r8", "mora_sharing_r8")]


def _roots(root) -> list:
    return [Path(r) for r in ([root] if isinstance(root, (str, Path)) else root)]


def _not_clean(root: Path) -> set:
    """Runs ("kind/name") that DIR/status.json lists as failed (rc != 0) or not started; a run killed at the
    budget keeps its records (its rows say "(cut)")."""
    f = root / "status.json"
    if not f.is_file():
        return set()
    out = set()
    for key, v in json.loads(f.read_text()).items():
        parts = v.split()
        if v == "not started" or (parts[:1] == ["rc"] and len(parts) > 1 and parts[1] != "0"):
            out.add(key)
    return out


def round2_skipped(root) -> list:
    """["DIR, <status> (n runs): kind/name, ..."] of the runs round2_runs skips, one line per directory
    and status ("rc 1", "not started")."""
    out = []
    for r in _roots(root):
        f = r / "status.json"
        st = json.loads(f.read_text()) if f.is_file() else {}
        by = group_by(sorted(_not_clean(r)), lambda k: st[k].split(" after ")[0])
        out += [f"{r.name}, {why} ({len(ks)} run{'s' if len(ks) > 1 else ''}): {', '.join(ks)}"
                for why, ks in sorted(by.items())]
    return out


def round2_runs(root, kind) -> list:
    """[{group, lr, seed, cfg, recs, truncated, dir}] of DIR/kind/<group>_lr<lr>_seed<s>/ over one DIR or a
    list of them, skipping the runs status.json lists as not clean (failed, not started)."""
    out, seen = [], {}
    for rt in _roots(root):
        skip = _not_clean(rt)
        for d in sorted((rt / kind).glob("*_seed*")):
            if not (d / "run.json").is_file() or not (d / "metrics.jsonl").is_file() or f"{kind}/{d.name}" in skip:
                continue
            if d.name in seen:
                raise ValueError(f"{kind}/{d.name} is in both {seen[d.name]} and {rt}")
            seen[d.name] = rt
            out += _round2_run(d)
    return out


def _round2_run(d: Path) -> list:
    """[the run of directory d] (a list, so that round2_runs can extend by it)."""
    cfg = json.loads((d / "run.json").read_text())["config"]
    recs = _gpu_study().records(d)
    return [dict(group=d.name.rsplit("_lr", 1)[0], lr=cfg["lr"], seed=cfg.get("seed", 0), cfg=cfg, recs=recs,
                 truncated=any(r.get("truncated") for r in recs), dir=d)]


def _ppl(run):
    v = [r["eval/ppl"] for r in run["recs"] if "eval/ppl" in r and r.get("step", 0) > 0]
    return v[-1] if v else math.nan


def pt_rank(run):
    v = _ppl(run)
    return v if math.isfinite(v) else math.inf


def _at(run, step, key):
    """`key` of the evaluation at optimizer step `step` (uuid_memorize --eval-steps), nan if none."""
    v = [r[key] for r in run["recs"] if r.get("eval_at_step") == step]
    return v[-1] if v else math.nan


def uuid_rank(run):
    """The UUID ranking (lower is better): value accuracy at the last evaluation up to the paper's last step
    (900; the smoke runs are shorter), exact match breaking ties; inf without one."""
    ev = [r for r in run["recs"] if "eval_at_step" in r and r["eval_at_step"] <= UUID_STEPS[-1]]
    if not ev:
        return math.inf
    return -(ev[-1]["eval/value_token_acc"] + 1e-3 * ev[-1]["eval/exact_match"])


def _final(run, key):
    v = [r[key] for r in run["recs"] if key in r]
    return v[-1] if v else math.nan


def _ms(xs, f=".3f") -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    return format(xs[0], f) if len(xs) == 1 else f"{statistics.mean(xs):{f}} ± {statistics.stdev(xs):{f}}"


def picked_lr(runs, group, score):
    """(the group's LR, its runs): the LR with seeds > 0 (the driver's pick), else the grid's best by `score`."""
    rs = [r for r in runs if r["group"] == group]
    seeded = {r["lr"] for r in rs if r["seed"] > 0}
    if seeded:
        return seeded.pop(), rs
    grid = [r for r in rs if r["seed"] == 0]
    return (min(grid, key=score)["lr"] if grid else None), rs


def round2_tables(root) -> str:
    """Markdown tables of a round2.py directory (no matplotlib needed)."""
    L = []
    pt = round2_runs(root, "pretrain")
    if pt:
        L += ["## Pretraining: LR grid (seed 0), final held-out perplexity", "",
              "| setting | trainable | adapter scale | lr: ppl (best in bold) | best | steps |",
              "| --- | ---: | ---: | --- | --- | ---: |"]
        seeds, edges = {}, set()
        for g in [g for g in PT_NAMES if any(r["group"] == g for r in pt)]:
            lr, rs = picked_lr(pt, g, pt_rank)
            grid = sorted((r for r in rs if r["seed"] == 0), key=lambda r: r["lr"])
            lrs = [r["lr"] for r in grid]
            cells = ", ".join((f"**{r['lr']:g}: {_ppl(r):.3f}**" if r["lr"] == lr else f"{r['lr']:g}: {_ppl(r):.3f}")
                              + (" (cut)" if r["truncated"] else "") for r in grid)
            edge = len(lrs) > 1 and lr in (lrs[0], lrs[-1])
            if edge:
                edges.add(g)
            where = "-" if lr is None else f"{lr:g}" + (" (grid edge)" if edge else "")
            c = (grid or rs)[0]["cfg"]
            steps = max((r.get("step", 0) for r in (grid or rs)[0]["recs"]), default=0)
            sc = c.get("adapter_scale")
            L.append(f"| {PT_NAMES[g]} | {c.get('trainable', 0):,} | {'-' if sc is None else format(sc, 'g')} | {cells} "
                     f"| {where} | {steps}/{c['steps']} |")
            seeds[g] = (lr, sorted((r for r in rs if r["lr"] == lr), key=lambda r: r["seed"]))
        L += ["", "## Pretraining: seeds at each best LR", "",
              "| setting | lr | ppl per seed | mean ± sd | spread (max - min) |", "| --- | ---: | --- | ---: | ---: |"]
        stats = {}
        for g, (lr, rs) in seeds.items():
            v = [_ppl(r) for r in rs]
            stats[g] = v
            per = " / ".join(f"{x:.3f}" + (" (cut)" if r["truncated"] else "") for x, r in zip(v, rs))
            spread = f"{max(v) - min(v):.3f}" if len(v) > 1 else "- (1 seed)"
            L.append(f"| {PT_NAMES[g]} | {lr:g} | {per} | {_ms(v)} | {spread} |")
        rows = _gap_rows(PT_PAIRS, {"": stats}, PT_NAMES, "below", lower_better=True, edges=edges)
        if rows:
            L += ["", "## Pretraining: gaps of seed means against the seed spread", "", _GAP_HEAD, _GAP_RULE] + rows
    uu = round2_runs(root, "uuid")
    if uu:
        hdr = " | ".join(f"acc@{s}" for s in UUID_STEPS) + " | " + " | ".join(f"EM@{s}" for s in UUID_STEPS)
        L += ["", "## UUID: LR grid (seed 0), per-character accuracy and exact match at the paper's steps", "",
              f"| setting | trainable | lr | {hdr} | final EM |", "|" + " --- |" * (4 + 2 * len(UUID_STEPS))]
        seeds, edges = {}, set()
        for g in [g for g in UUID_NAMES if any(r["group"] == g for r in uu)]:
            lr, rs = picked_lr(uu, g, uuid_rank)
            lrs = sorted(r["lr"] for r in rs if r["seed"] == 0)
            if len(lrs) > 1 and lr in (lrs[0], lrs[-1]):
                edges.add(g)
            for r in sorted((r for r in rs if r["seed"] == 0), key=lambda r: r["lr"]):
                vals = [_at(r, s, "eval/value_token_acc") for s in UUID_STEPS]
                vals += [_at(r, s, "eval/exact_match") for s in UUID_STEPS]
                mark = "**" if r["lr"] == lr else ""
                L.append(f"| {UUID_NAMES[g]} | {r['cfg'].get('trainable', 0):,} | {mark}{r['lr']:g}{mark} | "
                         + " | ".join("-" if math.isnan(x) else f"{x:.3f}" for x in vals)
                         + f" | {_final(r, 'eval/exact_match'):.3f}{' (cut)' if r['truncated'] else ''} |")
            seeds[g] = (lr, sorted((r for r in rs if r["lr"] == lr), key=lambda r: r["seed"]))
        L += ["", "## UUID: mean ± sd over the seeds at each best LR", "",
              f"| setting | lr | seeds | {hdr} | final EM |", "|" + " --- |" * (4 + 2 * len(UUID_STEPS))]
        for g, (lr, rs) in seeds.items():
            cols = [_ms([_at(r, s, "eval/value_token_acc") for r in rs]) for s in UUID_STEPS]
            cols += [_ms([_at(r, s, "eval/exact_match") for r in rs]) for s in UUID_STEPS]
            edge = " (grid edge)" if g in edges else ""
            L.append(f"| {UUID_NAMES[g]} | {lr:g}{edge} | {len(rs)} | " + " | ".join(cols)
                     + f" | {_ms([_final(r, 'eval/exact_match') for r in rs])} |")
        last = UUID_STEPS[-1]
        stats = {m: {g: [_at(r, last, key) for r in rs] for g, (lr, rs) in seeds.items()}
                 for m, key in ((f"acc@{last}", "eval/value_token_acc"), (f"EM@{last}", "eval/exact_match"))}
        rows = _gap_rows(UUID_PAIRS, stats, UUID_NAMES, "above", lower_better=False, edges=edges)
        if rows:
            L += ["", f"## UUID: gaps of seed means against the seed spread (step {last})", "", _GAP_HEAD,
                  _GAP_RULE] + rows
    skipped = round2_skipped(root)
    if skipped:
        L += ["", "Skipped (status.json lists them as failed or not started):", ""]
        L += [f"- {x}" for x in skipped]
    return "\n".join(L)


_GAP_HEAD = ("| claim | metric | seeds a / b | mean a | mean b | gap in the claim's direction | larger seed spread "
             "| verdict |")
_GAP_RULE = "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"


def _gap_rows(pairs, stats, names, word, lower_better, edges=()) -> list:
    """One row per (metric, pair): the claim "a {word} b" holds ("yes") only where both have >= 2 seeds and
    the seed means differ in the claim's direction by more than the larger seed spread (max - min);
    "reversed" where they differ the other way by more than it; else "not settled". A side whose LR is at
    its grid's edge is named (its optimum may lie outside the grid)."""
    rows = []
    for metric, st in stats.items():
        for a, b in pairs:
            va, vb = [x for x in st.get(a, []) if math.isfinite(x)], [x for x in st.get(b, []) if math.isfinite(x)]
            if not va or not vb:
                continue
            ma, mb = statistics.mean(va), statistics.mean(vb)
            gap = (mb - ma) if lower_better else (ma - mb)
            if min(len(va), len(vb)) < 2:
                spread, verdict = "-", "not settled (seeds missing)"
            else:
                sp = max(max(va) - min(va), max(vb) - min(vb))
                spread = f"{sp:.3f}"
                verdict = "yes" if gap > sp else "reversed" if -gap > sp else "not settled"
            at = [names[g] for g in (a, b) if g in edges]
            if at:
                verdict += f"; grid-edge LR: {', '.join(at)}"
            rows.append(f"| {names[a]} {word} {names[b]} | {metric or 'held-out ppl'} | {len(va)} / {len(vb)} | "
                        f"{ma:.3f} | {mb:.3f} | {gap:+.3f} | {spread} | {verdict} |")
    return rows


def _band(ax, runs, key, lab, at_step=False):
    """Seed mean (line) and min-max range (band) of `key` per step over `runs`."""
    per = {}
    for r in runs:
        for x in r["recs"]:
            if key in x and (("eval_at_step" in x) if at_step else x.get("step", 0) > 0):
                per.setdefault(x["step"], []).append(x[key])
    steps = sorted(s for s, v in per.items() if len(v) == len(runs))
    if not steps:
        return
    n = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
    line, = ax.plot(steps, [statistics.mean(per[s]) for s in steps], label=f"{lab}, {n}")
    ax.fill_between(steps, [min(per[s]) for s in steps], [max(per[s]) for s in steps], color=line.get_color(),
                    alpha=0.2)


def round2_plots(root, out) -> None:
    """round2_pretrain.png (held-out ppl per step at each best LR, seed mean and range; final ppl against
    LR at seed 0) and round2_uuid.png (per-character accuracy and exact match per step at each best LR)."""
    if plt is None:
        return
    pt, uu = round2_runs(root, "pretrain"), round2_runs(root, "uuid")
    if pt:
        fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
        for g in [g for g in PT_NAMES if any(r["group"] == g for r in pt)]:
            lr, rs = picked_lr(pt, g, pt_rank)
            _band(ax[0], [r for r in rs if r["lr"] == lr], "eval/ppl", f"{PT_NAMES[g]} ({lr:g})")
            grid = sorted((r for r in rs if r["seed"] == 0), key=lambda r: r["lr"])
            ax[1].plot([r["lr"] for r in grid], [_ppl(r) for r in grid], "o-", label=PT_NAMES[g])
        ax[0].set(xlabel="step", ylabel="held-out ppl (per byte)", yscale="log")
        ax[1].set(xlabel="adapter LR (full-rank: its LR)", ylabel="final held-out ppl, seed 0", yscale="log")
        _lr_axis(ax[1], sorted({r["lr"] for r in pt}))
        for a in ax:
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(out) / "round2_pretrain.png", dpi=110)
        plt.close(fig)
    if uu:
        fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
        for g in [g for g in UUID_NAMES if any(r["group"] == g for r in uu)]:
            lr, rs = picked_lr(uu, g, uuid_rank)
            for a, key in zip(ax, ("eval/value_token_acc", "eval/exact_match")):
                _band(a, [r for r in rs if r["lr"] == lr], key, f"{UUID_NAMES[g]} ({lr:g})", at_step=True)
        ax[0].axhline(FORMAT_FLOOR, color="grey", ls=":", lw=1)
        ax[0].set(xlabel="step", ylabel="per-character accuracy (value)")
        ax[1].set(xlabel="step", ylabel="exact match")
        for a in ax:
            for s in UUID_STEPS:
                a.axvline(s, color="grey", lw=0.5, alpha=0.5)
        ax[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(out) / "round2_uuid.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("root", nargs="?", help="CPU runs (results/runs layout)")
    p.add_argument("--study", action="append", default=[], help="a gpu_study.py root (repeatable)")
    p.add_argument("--round2", nargs="+", help="round2.py output directories, read as one set of runs")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.round2:
        text = round2_tables(a.round2)
        (Path(a.out) / "tables.md").write_text(text + "\n")
        print(text)
        round2_plots(a.round2, a.out)
    if a.study:
        rs = study_rows(a.study)
        print("\n".join(gpu_uuid(rs, a.out) + gpu_pretrain(rs, a.out)))
    if a.root:
        print("\n".join(uuid_tables(a.root, a.out) + pretrain_tables(a.root, a.out)))
