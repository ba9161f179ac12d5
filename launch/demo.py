"""End-to-end continual-pretraining demo on CPU (README's main command), in a few minutes:

1. corpus: a "domain" (docstrings of the torch package) and "general" text (docstrings of Python's
   standard library), made into jsonl, split train / held-out;
2. a SentencePiece tokenizer trained on a sample, and the Ray tokenize pipeline writing megatron
   indexed datasets;
3. a tiny Llama-style base model (random init, saved as an HF checkpoint: a stand-in for a
   pretrained model);
4. training with MoRA on all 7 projections at TP=2 (2 gloo ranks, torchrun), with one ReMoRA
   restart, domain + general replay blended 80/20, eval every 10 steps;
5. merge + export (Megatron and HF safetensors), then domain / general perplexity of the base and
   of the merged export, measured with transformers on the held-out sets.

Run: make demo (sets up .venv when missing), or .venv/bin/python launch/demo.py [--out runs/demo] [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def docstrings(package_paths, limit_chars: int) -> list[str]:
    """Module/class/function docstrings (over 200 characters) of the .py files under the given directories."""
    from mora_dist.utils.corpus import file_docstrings

    docs, total = [], 0
    for base in package_paths:
        for path in sorted(Path(base).rglob("*.py")):
            if "test" in path.parts or "site-packages" in path.relative_to(base).parts:
                continue
            for d in file_docstrings(path, min_chars=201):
                docs.append(d)
                total += len(d)
            if total > limit_chars:
                return docs
    return docs


def write_jsonl(path: Path, docs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def sh(*cmd, env=None):
    t0 = time.time()
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=ROOT)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def perplexity(model_dir: Path, prefix: str, seq: int = 64, max_windows: int = 64) -> float:
    """Token perplexity of an HF model on an indexed dataset, over fixed windows of the token stream."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    ds = IndexedDataset(prefix)
    stream = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    n = min(max_windows, (len(stream) - 1) // seq)
    x = torch.from_numpy(stream[: n * seq + 1])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 16):
            rows = range(i, min(n, i + 16))
            ids = torch.stack([x[r * seq: r * seq + seq] for r in rows])
            tgt = torch.stack([x[r * seq + 1: r * seq + seq + 1] for r in rows])
            logits = model(ids).logits.float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                     reduction="sum").item()
            count += tgt.numel()
    return math.exp(nll / count)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)

    print("== 1. corpus", flush=True)
    import torch

    rng = random.Random(0)
    sets = {"domain": docstrings([Path(torch.__file__).parent], 1_500_000),
            "general": docstrings([Path(os.__file__).parent], 1_500_000)}
    for name, docs in sets.items():
        rng.shuffle(docs)
        cut = max(1, len(docs) // 20)
        write_jsonl(corpus / f"{name}_heldout.jsonl", docs[:cut])
        write_jsonl(corpus / f"{name}_train.jsonl", docs[cut:])
        print(f"  {name}: {len(docs) - cut} train / {cut} held-out documents, {sum(map(len, docs)):,} chars")

    print("== 2. tokenizer + Ray tokenisation", flush=True)
    tok = out / "tokenizer"
    sh(PY, "-m", "data_pipeline.train_tokenizer", "--input", corpus / "domain_train.jsonl",
       corpus / "general_train.jsonl", "--model-prefix", tok, "--vocab-size", 2000, "--sample-docs", 20000, env=env)
    data = out / "data"
    import ray

    from data_pipeline.tokenize import run as tokenize

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # one local Ray, own
    try:
        for name in ("domain_train", "domain_heldout", "general_train", "general_heldout"):
            tokenize(["--input", str(corpus / f"{name}.jsonl"), "--tokenizer", f"{tok}.model",
                      "--output-prefix", str(data / name), "--workers", "2", "--progress-interval", "30"])
    finally:
        ray.shutdown()
    manifest = json.loads((data / "domain_train.manifest.json").read_text())
    eod = manifest["settings"]["eod_id"]

    print("== 3. base model", flush=True)
    from transformers import LlamaConfig, LlamaForCausalLM

    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=f"{tok}.model").get_piece_size()
    torch.manual_seed(0)
    base = out / "base_hf"
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                                 tie_word_embeddings=False)).save_pretrained(base)

    print("== 4. MoRA training, TP=2, one ReMoRA restart", flush=True)
    run = out / "run"
    sh(PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
       "--config", "configs/tiny_cpu.yaml", f"model.hf_dir={base}", f"run.out_dir={run}",
       f"checkpoint.dir={run}/ckpt", "checkpoint.every=0", f"train.steps={args.steps}",
       f"restarts.every={args.steps // 2}", "train.lr=0.01", "data.seq_length=64", f"data.eod_id={eod}",
       f"data.train=[{{path: {data}/domain_train, weight: 0.8}}, {{path: {data}/general_train, weight: 0.2}}]",
       f"data.eval_domain={data}/domain_heldout", f"data.eval_general={data}/general_heldout", env=env)

    print("== 5. merge + export, perplexity before/after (transformers, held-out)", flush=True)
    merged = out / "merged"
    sh(PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/merge.py",
       "--checkpoint", run / "ckpt", "--out", merged, "--overwrite", env=env)  # a re-run replaces its export
    rows = []
    for name in ("domain", "general"):
        before = perplexity(base, str(data / f"{name}_heldout"))
        after = perplexity(merged / "hf", str(data / f"{name}_heldout"))
        rows.append((name, before, after))
    print("\n| held-out | base ppl | after CPT (merged export) ppl |\n| --- | --- | --- |")
    for name, b, a in rows:
        print(f"| {name} | {b:,.1f} | {a:,.1f} |")

    print("== 6. run report (launch/report.py: loss, eval perplexity, throughput, memory)", flush=True)
    sh(PY, "launch/report.py", run, "--out", run / "report", env=env)
    print(f"\nartifacts: {out} (report: {run}/report/report.md; metrics: {run}/metrics.jsonl; "
          f"HF export: {merged}/hf; Megatron: {merged}/megatron)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
