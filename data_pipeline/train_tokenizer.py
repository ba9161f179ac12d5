"""CLI: train a SentencePiece tokenizer (BPE or unigram, byte fallback) on a sample of the corpus.

    python -m data_pipeline.train_tokenizer --input data/*.jsonl.gz --model-prefix out/tok \
        --vocab-size 32000 [--model-type bpe|unigram] [--sample-docs 200000] [--field text]

Settings are chosen so decode(encode(doc)) == doc for normalised documents: identity
normalisation (the pipeline already applied NFC), no whitespace collapsing, byte fallback for
unseen characters. The sample is a seeded reservoir over all valid documents, so it is reproducible.
"""
from __future__ import annotations

import argparse
import random
import sys

from data_pipeline.normalize import extract
from data_pipeline.sources import list_inputs, plan_file, read_part


def iter_documents(inputs, field="text", fmt="auto", txt_mode="line", max_chars=1_000_000):
    """Normalised valid documents of the corpus, in input order (rejects skipped)."""
    for uri in list_inputs(inputs, fmt):
        info = plan_file(uri, fmt, 1 << 62, txt_mode)
        for part in info["parts"]:
            for _, raw in read_part(info, part, field, txt_mode):
                ex = extract(raw, info["format"], field, max_chars)
                if ex.reason is None:
                    yield ex.text


def sample_documents(docs, k: int, seed: int) -> list[str]:
    """Reservoir sample of k documents (algorithm R), order kept stable by original index."""
    rng, res = random.Random(seed), []
    for i, d in enumerate(docs):
        if i < k:
            res.append((i, d))
        else:
            j = rng.randint(0, i)
            if j < k:
                res[j] = (i, d)
    return [d for _, d in sorted(res)]


def train(docs: list[str], model_prefix: str, vocab_size: int, model_type: str = "bpe",
          character_coverage: float = 0.9995, seed: int = 0) -> str:
    """Train on the documents' lines; returns the .model path. eos (id 2) is the EOD token."""
    import sentencepiece as spm

    lines = [ln for d in docs for ln in d.split("\n") if ln.strip()]
    if not lines:
        raise ValueError("no documents to train the tokenizer on")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=character_coverage, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2, hard_vocab_limit=False)
    return model_prefix + ".model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.train_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--sample-docs", type=int, default=200_000)
    p.add_argument("--field", default="text")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "parquet", "txt"))
    p.add_argument("--txt-mode", default="line", choices=("line", "file"))
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    docs = sample_documents(iter_documents(a.input, a.field, a.format, a.txt_mode), a.sample_docs, a.seed)
    path = train(docs, a.model_prefix, a.vocab_size, a.model_type, a.character_coverage, a.seed)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    print(f"[train_tokenizer] {path}: {len(docs)} sampled documents, vocab_size={sp.get_piece_size()}, "
          f"eod_id(eos)={sp.eos_id()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
