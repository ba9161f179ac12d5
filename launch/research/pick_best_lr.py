"""Print the best LR per method from the UUID sweep: highest final exact match, then highest final
value-token accuracy, then lowest final loss. Usage: python pick_best_lr.py SWEEP_DIR"""
import json
import os
import sys
from pathlib import Path


def best_per_method(sweep_dir):
    by = {}
    for d in sorted(Path(sweep_dir).iterdir()):
        f = d / "metrics.jsonl"
        if not f.is_file():
            continue
        recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        last = recs[-1]
        cfg = json.loads((d / "run.json").read_text())["config"]
        method = cfg["method"] + ("_" + cfg["mora_type"] if cfg["method"] == "mora" else "")
        key = (last.get("eval/exact_match", 0), last.get("eval/value_token_acc", 0), -last.get("loss", 9e9))
        by.setdefault(method, []).append((key, cfg["lr"], d.name))
    return {m: max(v)[1] for m, v in by.items()}, by


if __name__ == "__main__":
    best, _ = best_per_method(sys.argv[1])
    for m, lr in sorted(best.items()):
        print(m, lr)
