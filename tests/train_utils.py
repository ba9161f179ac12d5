"""Helpers for training tests: tiny learnable indexed datasets and configs."""
import numpy as np


def write_dataset(prefix, n_docs=64, vocab=256, seed=0, doc_len=(20, 60)):
    """Documents made of a few repeated random motifs (learnable), written with megatron's builder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    motifs = [rng.integers(1, vocab, size=rng.integers(3, 8)) for _ in range(8)]
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        n = rng.integers(*doc_len)
        toks = np.concatenate([motifs[i] for i in rng.integers(0, len(motifs), size=n)])[:n]
        b.add_document(torch.from_numpy(np.append(toks, 0).astype(np.int64)), [n + 1])
    b.finalize(prefix + ".idx")
    return prefix


def tiny_config(tmp, **overrides):
    from mora_dist.training.config import load_config

    dom = write_dataset(str(tmp / "domain"), seed=1)
    gen = write_dataset(str(tmp / "general"), seed=2)
    ev = write_dataset(str(tmp / "eval_domain"), seed=3, n_docs=16)
    base = [f"data.train=[{{path: {dom}, weight: 0.7}}, {{path: {gen}, weight: 0.3}}]", f"data.eval_domain={ev}",
            "train.steps=6", "train.global_batch=8", "train.micro_batch=2", "train.warmup=2", f"run.out_dir={tmp}/run"]
    return load_config(None, base + [f"{k}={v}" for k, v in overrides.items()])
