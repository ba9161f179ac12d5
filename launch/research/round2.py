"""Issue 20's studies in one device call: pretraining (full-rank, ReLoRA at scale 0.5 and 2, ReMoRA with
the paper's 2-type and the released 4-type schedule, LoRA and MoRA without restarts) and UUID
memorisation with the paper's metric (LoRA, MoRA decouple / rotation / sharing at r=8, sharing at r=64),
all as parallel processes on the machine's GPUs (gpu_study.run_jobs: each run sees one GPU, the one
with the fewest runs when it starts; --parallel caps the runs at once over all GPUs together), in two
phases per method: an LR grid at seed 0, then seeds 1 and 2 at that method's best LR (queued as soon
as its grid has ended).

    python launch/research/round2.py OUT                  # the study: one H200, ~7 min expected, stops by --budget
    python launch/research/round2.py OUT --smoke          # the same driver on a CPU: tiny models, 20 steps

A study too long for one call runs in pieces (launch/device/research_5k.sh):
    python launch/research/round2.py OUT1 --pt-only --grid-only --groups full relora_s2   # grids; picks in OUT1/selection.json
    python launch/research/round2.py OUT2 --seeds-from OUT1/selection.json                # then only their seeds
--grid-only picks each group's best LR (selection.json) but queues no seeds; --seeds-at GROUP=LR or
--seeds-from SELECTION.json runs only seeds 1 and 2 at that LR, and without --groups only those groups.

OUT gets ROOT/pretrain/<group>_lr<lr>_seed<s>/ and ROOT/uuid/... (metrics.jsonl, run.json, log per
run), commands.txt, status.json, selection.json (each group's grid and picked LR) and summary.json;
`summarize.py --round2 OUT` makes the tables and plots.

Pretraining keeps the paper's proportions at a tenth of its length (--pt-steps, default 500: warm-up
10%, a restart every 20% with a re-warm-up of 2.5% of a cycle); ReLoRA/ReMoRA train embeddings, head
and norms at full-rank's best LR of round 1 (5e-4, --full-rank-lr) on a plain cosine, and delete the
adapters' Adam state at restarts, as the authors do. UUID runs 63 epochs of 16 steps (1008 steps),
evaluated every 100 steps (per-character accuracy and exact match at 300/500/700/900).

Time (from round 1's runs on one H100, 27 processes at once: a pretraining step with adapters took
~7.5 ms of the shared GPU, full-rank ~6.2 ms, a UUID step ~4.6 ms (LoRA, sharing) to ~6.7 ms (rotation),
evaluations included): 49 pretraining runs x 500 steps ~ 190 s, 25 UUID runs x 1008 steps ~ 130 s, plus
~40 s of start-up (50 processes import, build the corpus, compile) and ~40 s for the last groups' seeds:
~6.5 minutes. Every run gets a deadline (start + --budget - --stop-margin) and marks itself "truncated"
("(cut)" in the tables) if it passes it; no seed run starts with less than 60 s left.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_study as gs  # noqa: E402
import summarize  # noqa: E402  (the ranking of runs: one place for the driver and the tables)

FULL_RANK_LR = "5e-4"  # full-rank's best LR in round 1 (docs/results/README.md); the full-rank grid re-checks it
SEEDS = (1, 2)

# group -> (script, its arguments, LR grid at seed 0); 5 points, x2 apart, around round 1's optima
# (LoRA's scale 0.5 needs about 4x scale 2's LR: Adam moves A and B by ~lr, dW by scale * lr)
PT_GROUPS = {
    "full": ("--method full", ["1.25e-4", "2.5e-4", "5e-4", "1e-3", "2e-3"]),
    "relora_s0.5": ("--method lora --alpha 16", ["2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2"]),
    "relora_s2": ("--method lora --alpha 64", ["5e-4", "1e-3", "2e-3", "4e-3", "8e-3"]),
    "remora_2type": ("--method mora --mora-types 1,2", ["2.5e-4", "5e-4", "1e-3", "2e-3", "4e-3"]),
    "remora_4type": ("--method mora --mora-types 1,2,3,4", ["2.5e-4", "5e-4", "1e-3", "2e-3", "4e-3"]),
    "lora_norestart": ("--method lora --alpha 64 --restart-every 0", ["5e-4", "1e-3", "2e-3", "4e-3", "8e-3"]),
    "mora_norestart": ("--method mora --restart-every 0", ["2.5e-4", "5e-4", "1e-3", "2e-3", "4e-3"]),
}
UUID_GROUPS = {
    "lora_r8": ("--method lora --r 8", ["5e-4", "1e-3", "2e-3"]),
    "mora_decouple_r8": ("--method mora --mora-type decouple --r 8", ["1e-3", "2e-3", "4e-3"]),
    "mora_rotation_r8": ("--method mora --mora-type rotation --r 8", ["1e-3", "2e-3", "4e-3"]),
    "mora_sharing_r8": ("--method mora --mora-type sharing --r 8", ["3e-4", "6e-4", "1.2e-3"]),
    "mora_sharing_r64": ("--method mora --mora-type sharing --r 64", ["3e-4", "6e-4", "1.2e-3"]),
}


def pt_args(steps: int, smoke: bool) -> str:
    every = steps // 5
    common = (f"--r 32 --steps {steps} --warmup {steps // 10} --restart-every {every} "
              f"--restart-warmup {max(1, math.ceil(every / 40))} --eval-every {max(1, steps // 10)} "
              f"--reset-optimizer delete --prune 1.0")
    model = ("--hidden 32 --layers 1 --heads 2 --ffn 64 --seq 32 --batch 4 --eval-batches 1 --log-every 5 "
             "--max-bytes 60000 --corpus docstrings" if smoke else gs.PT_MODEL)
    return f"{common} {model}"


def uuid_args(epochs: int, smoke: bool) -> str:
    if smoke:
        return f"--hidden 32 --layers 1 --heads 2 --ffn 64 --batch 8 --n-pairs 64 --epochs {epochs} --eval-steps 4"
    return f"{gs.UUID_MODEL} --n-pairs 1024 --epochs {epochs} --eval-steps 100 --eval-every 1000"


class Study:
    """The jobs of both phases; `followup` queues a group's seeds once its grid has ended."""

    def __init__(self, root: Path, pt_steps: int, uuid_epochs: int, smoke: bool, groups=None, seeds_at=None,
                 seeds=True):
        self.root, self.picked, self.seeds = root, {}, seeds  # seeds=False: pick the best LRs, queue no seeds
        self.seeds_at = dict(seeds_at or {})  # group -> LR picked in an earlier call: its seeds only
        pt, uu = pt_args(pt_steps, smoke), uuid_args(uuid_epochs, smoke)
        self.specs = {}
        for g, (args, lrs) in PT_GROUPS.items():
            extra = "" if g == "full" else f" --full-rank-lr {FULL_RANK_LR} --full-rank-schedule cosine"
            self.specs[("pretrain", g)] = (gs.PRETRAIN, f"{pt} {args}{extra}", lrs)  # the group's args win
        for g, (args, lrs) in UUID_GROUPS.items():
            self.specs[("uuid", g)] = (gs.UUID, f"{uu} {args}", lrs)
        if groups:
            self.specs = {k: v for k, v in self.specs.items() if k[1] in groups}
        if smoke:  # the same code path, two grid points per group
            self.specs = {k: (s, a, lrs[1:3]) for k, (s, a, lrs) in self.specs.items()}

    def job(self, kind, group, lr, seed):
        script, args, _ = self.specs[(kind, group)]
        return gs.job(kind, f"{group}_lr{lr}_seed{seed}", script, f"{args} --lr {lr} --seed {seed}")

    def grid(self):
        """Seed 0 over each group's LR grid; for groups in `seeds_at`, the seeds at that LR instead (their
        grid ran in an earlier call: summarize.py --round2 reads both directories as one set)."""
        jobs = []
        for (k, g), (_, _, lrs) in self.specs.items():
            if g in self.seeds_at:
                jobs += [self.job(k, g, self.seeds_at[g], sd) for sd in SEEDS]
            else:
                jobs += [self.job(k, g, lr, 0) for lr in lrs]
        return jobs

    def followup(self, key, done):
        kind, name = key.split("/")
        group = name.rsplit("_lr", 1)[0]
        if not name.endswith("_seed0") or (kind, group) in self.picked:
            return []
        lrs = self.specs[(kind, group)][2]
        keys = [f"{kind}/{group}_lr{lr}_seed0" for lr in lrs]
        if not all(k in done for k in keys):
            return []
        runs = [r for r in summarize.round2_runs(self.root, kind) if r["group"] == group and r["seed"] == 0]
        rank = summarize.pt_rank if kind == "pretrain" else summarize.uuid_rank
        scores = {f"{r['lr']:g}": rank(r) for r in runs}
        best = next((lr for lr in lrs if float(lr) == summarize.picked_lr(runs, group, rank)[0]), None)
        if best is None or not scores or not math.isfinite(min(scores.values())):
            print(f"[round2] {kind}/{group}: no grid run has a result; no seeds", flush=True)
            self.picked[(kind, group)] = dict(kind=kind, group=group, grid=lrs, scores=scores, best_lr=None)
            return []
        self.picked[(kind, group)] = dict(kind=kind, group=group, grid=lrs, scores=scores, best_lr=best,
                                          at_edge=best in (lrs[0], lrs[-1]), picked_at=time.time())
        (self.root / "selection.json").write_text(json.dumps(list(self.picked.values()), indent=1) + "\n")
        then = f"seeds {SEEDS} queued" if self.seeds else f"seeds {SEEDS} left to a later call (--grid-only)"
        print(f"[round2] {kind}/{group}: best lr {best} of {lrs} (scores {scores}); {then}", flush=True)
        return [self.job(kind, group, best, sd) for sd in SEEDS] if self.seeds else []


def seeds_from(files) -> dict:
    """{group: best_lr} of the groups that earlier calls' selection.json files picked an LR for."""
    out = {}
    for f in files:
        for sel in json.loads(Path(f).read_text()):
            if sel.get("best_lr") is not None:
                out[sel["group"]] = sel["best_lr"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory ($OUT on the device)")
    p.add_argument("--smoke", action="store_true", help="tiny models, 20 steps, 2 grid points: a CPU check")
    p.add_argument("--budget", type=float, default=480, help="seconds of wall clock for all jobs")
    p.add_argument("--stop-margin", type=float, default=20, help="jobs stop themselves this long before the budget")
    p.add_argument("--pt-steps", type=int, default=500)
    p.add_argument("--uuid-epochs", type=int, default=63, help="16 steps each at 1024 pairs, batch 64")
    p.add_argument("--parallel", type=int, default=64, help="runs at once, over all GPUs together")
    p.add_argument("--gpus", type=int, default=None,
                   help="spread the runs over this many GPUs (default: every visible one; each run sees one)")
    p.add_argument("--groups", nargs="*", help="only these groups (names in PT_GROUPS / UUID_GROUPS)")
    p.add_argument("--pt-only", action="store_true", help="only the pretraining groups (no UUID runs)")
    p.add_argument("--grid-only", action="store_true",
                   help="run the seed-0 grids and write selection.json, but queue no seeds (a later call runs them)")
    p.add_argument("--seeds-at", nargs="*", default=[], metavar="GROUP=LR",
                   help="run only the seeds of GROUP at LR (its grid ran in an earlier call); without --groups, "
                        "only these groups run")
    p.add_argument("--seeds-from", nargs="*", default=[], metavar="SELECTION_JSON",
                   help="as --seeds-at, for every group that these earlier calls' selection.json picked an LR for "
                        "(--seeds-at wins for a group in both)")
    p.add_argument("--progress-every", type=float, default=60)
    a = p.parse_args(argv)
    try:
        seeds_at = dict(seeds_from(a.seeds_from), **dict(x.split("=", 1) for x in a.seeds_at))
    except ValueError:
        p.error(f"--seeds-at takes GROUP=LR pairs, got {a.seeds_at}")
    known = set(PT_GROUPS) | set(UUID_GROUPS)
    unknown = sorted((set(a.groups or ()) | set(seeds_at)) - known)
    if unknown:
        p.error(f"unknown groups {unknown}; known: {sorted(known)}")
    groups = a.groups or (sorted(seeds_at) if seeds_at else None)  # seeds only: just those groups
    if a.pt_only:
        groups = [g for g in (groups or PT_GROUPS) if g in PT_GROUPS]
    if groups is not None and not groups:
        p.error("no group left to run")
    if a.smoke:
        a.pt_steps, a.uuid_epochs = 20, 3
    root = Path(a.out).resolve()
    study = Study(root, a.pt_steps, a.uuid_epochs, a.smoke, groups, seeds_at, seeds=not a.grid_only)
    t0 = time.time()
    done = gs.run_jobs(study.grid(), root, a.budget, a.parallel, a.stop_margin, a.progress_every,
                       gs.HERE.parent.parent, min_run=60 if not a.smoke else 5, followup=study.followup,
                       gpus=a.gpus)
    failed = {k: v for k, v in done.items() if not v.startswith("rc 0")}
    for k, v in failed.items():
        print(f"[round2] FAILED {k}: {v}; log tail: {gs.last_line(root / (k + '.log'))}", flush=True)
    rows = gs.collect(root)
    (root / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(summarize.round2_tables(root), flush=True)
    print(f"[round2] {len(done)} runs, {len(failed)} not clean, {time.time() - t0:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
