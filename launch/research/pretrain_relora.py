"""Small-scale pretraining from scratch: full-rank vs ReLoRA (LoRA + restarts) vs ReMoRA (MoRA +
restarts with grouping-type cycling, --mora-types: 1,2 = the paper's Appendix B, 1,2,3,4 = the released
code), same data, same steps, same model. --restart-every 0 trains LoRA/MoRA without restarts.

    python launch/research/pretrain_relora.py --method mora --lr 2e-3 --out results/runs/pretrain/remora

Corpus (--corpus): 'docstrings' = the docstrings of this Python's standard library (ast over
sysconfig's stdlib *.py, sorted file order; ~1.5 MB), 'source' = the stdlib *.py files themselves
(~11 MB); byte-level tokens (256 bytes + EOD); files are split 95/5 into train/held-out by a
hash of the path. Batches are random 128-token windows drawn from a generator seeded by the step
(and --seed, which also changes the random base), so every method sees the same tokens.
ReLoRA/ReMoRA follow the MoRA authors' pretraining setup: adapters on all 7 projections,
embeddings, output layer and norms trained in full, merge + reset every --restart-every steps,
Adam state of the adapters dropped (prune 1.0) at restarts, jagged cosine LR (min ratio 0.1,
re-warm-up over --restart-warmup steps). No full-rank warm start. The full-rank parts are their own
AdamW param group: --full-rank-lr (default: --lr) on --full-rank-schedule (jagged: the adapters'
schedule; cosine: warm-up + cosine without re-warm-ups, as full-rank training). --reset-optimizer
delete drops the adapters' Adam state with its step count at restarts (the ReLoRA authors);
prune (default) prunes the moments by --prune (1.0: zeroed) and keeps the count. --alpha: LoRA's
alpha (scale alpha / r; default 2r, scale 2; the authors' ReLoRA recipe is scale 0.5).
Runs on the GPU when there is one (TF32 matmuls by default, fp32 parameters and optimizer state),
else on the CPU in fp32. Train loss is logged as the mean over --log-every steps (one host sync per
window). --deadline (unix time) stops the run cleanly (last record "truncated") once passed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

EOD = 256
VOCAB = 257


def docstrings(path: str) -> list[str]:
    from mora_dist.utils.corpus import file_docstrings

    return file_docstrings(path, min_chars=40)


def build_corpus(max_bytes: int = 3_000_000, kind: str = "docstrings"):
    """(train tokens, held-out tokens) as int64 tensors; deterministic for a given Python."""
    lib = sysconfig.get_paths()["stdlib"]
    files = []
    for dp, dn, fn in os.walk(lib):
        dn[:] = sorted(d for d in dn if d not in ("test", "tests", "site-packages", "idlelib", "__pycache__"))
        files += [os.path.join(dp, f) for f in sorted(fn) if f.endswith(".py")]
    train, held = [], []
    n = 0
    for f in files:
        rel = os.path.relpath(f, lib)
        dst = held if zlib.crc32(rel.encode()) % 20 == 0 else train
        texts = docstrings(f) if kind == "docstrings" else [open(f, "rb").read().decode("utf-8", "replace")]
        for d in texts:
            b = list(d.encode("utf-8")) + [EOD]
            dst.extend(b)
            n += len(b)
        if n >= max_bytes and len(held) >= 20_000:  # a held-out set of some size, even when max_bytes is small
            break
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long)


def windows(data: torch.Tensor, n: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq - 1, (n,), generator=gen)
    return torch.stack([data[s:s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def eval_ppl(model, held: torch.Tensor, seq: int, n_batches: int = 8, bs: int = 16, dev="cpu") -> float:
    """Per-byte perplexity on n_batches fixed (seeded) batches of held-out windows."""
    model.eval()
    gen = torch.Generator().manual_seed(999)
    tot = torch.zeros((), dtype=torch.float64, device=dev)
    cnt = 0
    for _ in range(n_batches):
        w = windows(held, bs, seq, gen).to(dev)
        t, l = w[:, :-1], w[:, 1:]
        pos = torch.arange(seq, device=dev).expand_as(t)
        loss = model(t, pos, None, labels=l)
        tot += loss.double().sum()
        cnt += loss.numel()
    model.train()
    return math.exp(tot.item() / cnt)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["full", "lora", "mora"], required=True)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--restart-every", type=int, default=150)
    p.add_argument("--restart-warmup", type=int, default=20)
    p.add_argument("--prune", type=float, default=1.0)
    p.add_argument("--no-cycle", action="store_true", help="ReMoRA without type cycling")
    p.add_argument("--mora-types", default="1,2", help="ReMoRA's type schedule: 1,2 (paper) or 1,2,3,4 (released code)")
    p.add_argument("--reset-optimizer", choices=["prune", "delete"], default="prune")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--full-rank-lr", type=float, default=None, help="peak LR of embeddings/head/norms (default --lr)")
    p.add_argument("--full-rank-schedule", choices=["jagged", "cosine"], default="jagged")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=1, help="steps per train-loss record (mean over them)")
    p.add_argument("--corpus", choices=["docstrings", "source"], default="docstrings")
    p.add_argument("--max-bytes", type=int, default=3_000_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="base init and batch order; 0 = the study's sweep")
    p.add_argument("--precision", choices=common.PRECISIONS, default="tf32", help="GPU matmul precision")
    p.add_argument("--deadline", type=float, default=0.0, help="unix time: stop once passed")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    dev = common.setup_single_process(a.threads, 0, a.precision)
    from mora_dist.metrics.logger import MetricsLogger
    from mora_dist.training.schedule import cosine_lr, jagged_cosine_lr
    from mora_dist.training.step import backward, optimizer_step

    train, held = build_corpus(a.max_bytes, a.corpus)
    model = common.tiny_model(VOCAB, a.hidden, a.layers, a.heads, a.ffn, 256, seed=1234 + a.seed)
    if a.method == "full":
        trainable = common.attach(model, "fft", a.r)
        groups = [{"params": [q for q in model.parameters() if q.requires_grad], "sched": "jagged", "peak": a.lr}]
    else:
        common.attach(model, a.method, a.r, "sharing", alpha=a.alpha)  # MoRA starts at type 1 (sharing), as the authors
        full = []
        for n, q in model.named_parameters():
            if common.is_full_rank_part(n):
                q.requires_grad_(True)
                full.append(q)
        trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
        ids = {id(q) for q in full}
        groups = [{"params": [q for q in model.parameters() if q.requires_grad and id(q) not in ids],
                   "sched": "jagged", "peak": a.lr},
                  {"params": full, "sched": a.full_rank_schedule, "peak": a.full_rank_lr or a.lr}]
    params = [q for g in groups for q in g["params"]]
    opt = common.adamw(groups, a.lr, (0.9, 0.95), 0.01)
    types = () if a.no_cycle else common.mora_types(a.mora_types)
    every = 0 if a.method == "full" else a.restart_every
    name = ({"full": "full-rank", "lora": "ReLoRA", "mora": "ReMoRA"} if every else
            {"full": "full-rank", "lora": "LoRA", "mora": "MoRA"})[a.method] + f"_lr{a.lr:g}"
    print(f"{name}: trainable {trainable:,} / {sum(q.numel() for q in model.parameters()):,}; "
          f"train {train.numel():,} tokens, held-out {held.numel():,}", flush=True)
    cfg = dict(vars(a), trainable=trainable, adapter_scale=common.adapter_scale(model), train_tokens=train.numel(),
               heldout_tokens=held.numel(), device=str(dev))
    t0, restarts = time.time(), 0
    pos = torch.arange(a.seq, device=dev)
    acc, nacc = torch.zeros((), device=dev), 0
    ev = dict(held=held, seq=a.seq, n_batches=a.eval_batches, bs=a.batch, dev=dev)
    with MetricsLogger(a.out, name, cfg, rank=0, num_gpus=1, stream=open(os.devnull, "w")) as log:
        log.log(0, {"eval/ppl": eval_ppl(model, **ev)})
        for step in range(a.steps):
            if every and step > 0 and step % every == 0:
                restarts += 1
                common.restart_adapters(model, opt, restarts, types, a.prune, a.reset_optimizer == "delete")
            for g in opt.param_groups:
                g["lr"] = (jagged_cosine_lr(step, g["peak"], a.warmup, a.steps, 0.1, every, a.restart_warmup)
                           if every and g["sched"] == "jagged" else cosine_lr(step, g["peak"], a.warmup, a.steps, 0.1))
            lr = opt.param_groups[0]["lr"]
            w = windows(train, a.batch, a.seq, torch.Generator().manual_seed(step + 1_000_003 * a.seed)).to(dev)
            t, l = w[:, :-1], w[:, 1:]
            loss, gn = optimizer_step(opt, params, lambda: backward(model(t, pos.expand_as(t), None, labels=l).mean()), 1.0)
            acc += loss.detach()
            nacc += 1
            last = step + 1 == a.steps
            truncated = bool(a.deadline) and time.time() > a.deadline and not last
            evaluate = (step + 1) % a.eval_every == 0 or last or truncated
            if (step + 1) % a.log_every == 0 or evaluate:
                rec = {"loss": acc.item() / nacc, "lr": lr, "lr_full_rank": opt.param_groups[-1]["lr"],
                       "grad_norm": gn.item(), "restarts": restarts, "elapsed_s": time.time() - t0}
                acc.zero_()
                nacc = 0
                if evaluate:
                    rec["eval/ppl"] = eval_ppl(model, **ev)
                    print(f"{name} step {step + 1} loss {rec['loss']:.3f} eval ppl {rec['eval/ppl']:.2f} "
                          f"({time.time() - t0:.0f}s)", flush=True)
                if truncated:
                    rec["truncated"] = True
                if (truncated or last) and dev.type == "cuda":
                    rec["max_mem_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
                log.log(step + 1, rec)
            if truncated:
                print(f"{name}: deadline passed, stopped after step {step + 1} of {a.steps}", flush=True)
                break


if __name__ == "__main__":
    main()
