"""UUID key->value memorisation (MoRA paper, Table 1 setting, scaled down to one GPU or a CPU).

    python launch/research/uuid_memorize.py --method mora --mora-type sharing --lr 1e-3 \
        --epochs 40 --out results/runs/uuid/mora_sharing_lr1e-3

Sequence: [BOS] key(36 chars) [SEP] value(36 chars) [EOD]; character vocabulary 0-9a-f and '-'
plus SEP/EOD/BOS (20 tokens). Loss only on the 36 value tokens. Exact match: every value token is
the argmax under teacher forcing; that is the same as greedy decoding reproducing the value
exactly (if every teacher-forced argmax is right, greedy decoding sees the same prefixes at every
step, by induction; if one is wrong, greedy decoding emits that wrong token at the first such step).
The base is a randomly initialised tiny Llama (the same weights for every method and run seed),
frozen for adapters; FFT trains every parameter. Runs on the GPU when there is one (TF32 matmuls by
default, fp32 parameters and optimizer state), else on the CPU in fp32. --deadline (unix time)
stops the run cleanly after the epoch that passes it; its last record then says "truncated".
--vera-budget N picks VeRA's shared rank so that its trainable count is closest to N (--r ignored).
--eval-steps K also evaluates every K optimizer steps (the paper's Table 2 reports character accuracy
at steps 300/500/700/900); those records carry "eval_at_step". --alpha: LoRA's alpha (default 2r).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

CHARS = "0123456789abcdef-"
SEP, EOD, BOS = len(CHARS), len(CHARS) + 1, len(CHARS) + 2
VOCAB = len(CHARS) + 3
UUID_LEN = 36
SEQ = 1 + UUID_LEN + 1 + UUID_LEN + 1  # 75 tokens, 74 predictions


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct (key, value) random version-4 UUID strings, deterministic in seed."""
    rng = random.Random(seed)
    seen, pairs = set(), []
    while len(pairs) < n:
        k = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        v = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if k in seen:
            continue
        seen.add(k)
        pairs.append((k, v))
    return pairs


def encode(key: str, value: str) -> list[int]:
    idx = {c: i for i, c in enumerate(CHARS)}
    return [BOS] + [idx[c] for c in key] + [SEP] + [idx[c] for c in value] + [EOD]


def batch_tensors(pairs):
    """tokens/labels [b, 74], value mask [b, 74] (True where the label is a value char)."""
    seq = torch.tensor([encode(k, v) for k, v in pairs], dtype=torch.long)
    tokens, labels = seq[:, :-1], seq[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, UUID_LEN + 1: 2 * UUID_LEN + 1] = True  # labels at positions 37..72 are the value chars
    return tokens, labels, mask


def exact_match(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """(fraction of sequences with every masked token = argmax, masked token accuracy)."""
    pred = logits.argmax(-1)
    ok = (pred == labels) | ~mask
    return ok.all(-1).float().mean().item(), ((pred == labels) & mask).sum().item() / mask.sum().item()


@torch.no_grad()
def evaluate(model, tokens, labels, mask, bs=2048):
    """(exact match, value-token accuracy) over all pairs, teacher forced, in batches of bs."""
    model.eval()
    em = tok = 0.0
    n = tokens.shape[0]
    for i in range(0, n, bs):
        t, l, m = tokens[i:i + bs], labels[i:i + bs], mask[i:i + bs]
        pos = torch.arange(t.shape[1], device=t.device).expand_as(t)
        logits = model(t, pos, None)[..., :VOCAB]
        e, a = exact_match(logits, l, m)
        em += e * t.shape[0]
        tok += a * t.shape[0]
    model.train()
    return em / n, tok / n


def adapted_dims(model):
    """(d_in, d_out) of every matrix an adapter would wrap (q, k, v, o, gate, up, down per layer)."""
    dims = []
    for layer in model.decoder.layers:
        a, m = layer.self_attention, layer.mlp
        d, q = a.linear_proj.output_size, a.linear_proj.input_size
        kv = (a.linear_qkv.output_size - q) // 2
        ffn = m.linear_fc2.input_size
        dims += [(d, q), (d, kv), (d, kv), (q, d), (d, ffn), (d, ffn), (ffn, d)]
    return dims


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["lora", "mora", "vera", "fft"], required=True)
    p.add_argument("--mora-type", default="sharing")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--n-pairs", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--warmup-frac", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=common.PRECISIONS, default="tf32", help="GPU matmul precision")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    p.add_argument("--eval-steps", type=int, default=0, help="also evaluate every K optimizer steps (0: off)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--eval-batch", type=int, default=512, help="pairs per evaluation forward pass")
    p.add_argument("--vera-budget", type=int, default=0, help="VeRA: choose r for this trainable count")
    p.add_argument("--deadline", type=float, default=0.0, help="unix time: stop after the epoch past it")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    dev = common.setup_single_process(a.threads, a.seed, a.precision)
    from mora_dist.metrics.logger import MetricsLogger
    from mora_dist.training.schedule import cosine_lr
    from mora_dist.training.step import backward, optimizer_step

    model = common.tiny_model(VOCAB, a.hidden, a.layers, a.heads, a.ffn, 128, seed=1234)  # same base for all
    if a.method == "vera" and a.vera_budget:
        a.r = common.vera_equal_budget_r(adapted_dims(model), a.vera_budget)
    trainable = common.attach(model, a.method, a.r, a.mora_type, seed=a.seed, alpha=a.alpha)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = common.adamw(params, a.lr, (0.9, 0.999), 0.0)
    tokens, labels, mask = (x.to(dev) for x in batch_tensors(make_pairs(a.n_pairs, seed=42)))
    steps_per_epoch = math.ceil(a.n_pairs / a.batch)
    total = steps_per_epoch * a.epochs
    warmup = max(1, int(a.warmup_frac * total))
    name = f"{a.method}{'_' + a.mora_type if a.method == 'mora' else ''}_lr{a.lr:g}"
    cfg = dict(vars(a), trainable=trainable, adapter_scale=common.adapter_scale(model), steps=total, device=str(dev))
    print(f"{name}: trainable {trainable:,}, {total} steps on {dev}", flush=True)
    g = torch.Generator().manual_seed(a.seed)
    step, t0 = 0, time.time()
    pos = torch.arange(tokens.shape[1], device=dev)
    with MetricsLogger(a.out, name, cfg, rank=0, num_gpus=1, stream=open(os.devnull, "w")) as log:
        em, acc = evaluate(model, tokens, labels, mask, a.eval_batch)
        log.log(0, {"epoch": 0, "eval/exact_match": em, "eval/value_token_acc": acc})
        for epoch in range(1, a.epochs + 1):
            perm = torch.randperm(a.n_pairs, generator=g).to(dev)
            tot = torch.zeros((), device=dev)  # summed on the device: no host sync per step
            for i in range(0, a.n_pairs, a.batch):
                idx = perm[i:i + a.batch]
                t, l, m = tokens[idx], labels[idx], mask[idx]
                lr = cosine_lr(step, a.lr, warmup, total, 0.1)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss, gn = optimizer_step(opt, params, lambda: backward(
                    (model(t, pos.expand_as(t), None, labels=l) * m).sum() / m.sum()), 1.0)
                step += 1
                tot += loss.detach()
                if a.eval_steps and step % a.eval_steps == 0:
                    em_s, acc_s = evaluate(model, tokens, labels, mask, a.eval_batch)
                    log.log(step, {"eval_at_step": step, "eval/exact_match": em_s, "eval/value_token_acc": acc_s,
                                   "elapsed_s": time.time() - t0})
            truncated = bool(a.deadline) and time.time() > a.deadline and epoch < a.epochs
            rec = {"epoch": epoch, "loss": tot.item() / steps_per_epoch, "lr": lr, "grad_norm": gn.item(),
                   "elapsed_s": time.time() - t0}
            if epoch % a.eval_every == 0 or epoch == a.epochs or truncated:
                em, acc = evaluate(model, tokens, labels, mask, a.eval_batch)
                rec.update({"eval/exact_match": em, "eval/value_token_acc": acc})
            if truncated:
                rec["truncated"] = True
            if (truncated or epoch == a.epochs) and dev.type == "cuda":
                rec["max_mem_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
            log.log(step, rec)
            print(f"{name} epoch {epoch} loss {rec['loss']:.4f} EM {em:.3f} tokacc {acc:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if truncated:
                print(f"{name}: deadline passed, stopped after epoch {epoch} of {a.epochs}", flush=True)
                break


if __name__ == "__main__":
    main()
