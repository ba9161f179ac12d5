"""Training/eval batches from megatron-core indexed datasets (GPTDataset, blended by weight).

Sample order is a function of the global sample index only: step s, global-batch slot i reads
sample s * global_batch + i of the blended dataset. Each data-parallel rank takes a contiguous
slice of the global batch and cuts it into micro-batches, so any TP/PP/DP layout with the same
global batch trains on the same tokens, and resuming at step s needs nothing but s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Tok:
    """The slice of a tokenizer megatron's GPTDataset reads."""

    eod: int
    vocab_size: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:  # megatron hashes it into the dataset description
        return {"class": "mora_dist", "eod": self.eod, "vocab_size": self.vocab_size}


def _dataset_config(prefixes, weights, seq_length, seed, eod_id, vocab_size):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split="100,0,0",
        tokenizer=_Tok(eod=eod_id, vocab_size=vocab_size), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=None, mmap_bin_files=True,
    )


def build_dataset(prefixes, weights, num_samples: int, seq_length: int, seed: int, eod_id: int, vocab_size: int):
    """A (blended) GPTDataset with at least `num_samples` samples, built identically on every rank."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    cfg = _dataset_config(list(prefixes), list(weights) if weights else None, seq_length, seed, eod_id, vocab_size)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, cfg).build()
    return train


class BatchSource:
    """Micro-batches of this DP rank for a given step."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_size: int, dp_rank: int):
        self.ds, self.gb, self.mb = dataset, global_batch, micro_batch
        self.per_rank = global_batch // dp_size
        self.dp_rank = dp_rank
        self._pin = torch.cuda.is_available()

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.mb

    def microbatches(self, step: int):
        start = step * self.gb + self.dp_rank * self.per_rank
        for m in range(self.num_microbatches):
            idx = range(start + m * self.mb, start + (m + 1) * self.mb)
            samples = [self.ds[i % len(self.ds)] for i in idx]
            batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
            # page-locked on a GPU machine, so the non-blocking copies to the device (and into a CUDA
            # graph's static inputs) are queued behind the running step instead of waiting for it
            yield {k: v.pin_memory() for k, v in batch.items()} if self._pin else batch
