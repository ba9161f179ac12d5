"""Tables (Markdown, printed) and plots (PNG) for docs/results/ from the runs' metrics.jsonl.

    python launch/research/summarize.py docs/results/runs --out docs/results
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


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    print("\n".join(uuid_tables(a.root, a.out) + pretrain_tables(a.root, a.out)))
