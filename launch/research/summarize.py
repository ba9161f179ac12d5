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
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
def study_rows(studies):
    """gpu_study.collect rows of every study dir, each with its run dir (`path`) and records."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_study

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


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("root", nargs="?", help="CPU runs (results/runs layout)")
    p.add_argument("--study", action="append", default=[], help="a gpu_study.py root (repeatable)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.study:
        rs = study_rows(a.study)
        print("\n".join(gpu_uuid(rs, a.out) + gpu_pretrain(rs, a.out)))
    if a.root:
        print("\n".join(uuid_tables(a.root, a.out) + pretrain_tables(a.root, a.out)))
