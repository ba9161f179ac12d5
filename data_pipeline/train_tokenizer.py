"""CLI: train a SentencePiece tokenizer (BPE or unigram, byte fallback) on a sample of the corpus.

    python -m data_pipeline.train_tokenizer --input data/*.jsonl.gz --model-prefix out/tok \
        --vocab-size 32000 [--model-type bpe|unigram] [--sample-docs 200000] [--field text] [--hf-json]
    python -m data_pipeline.train_tokenizer --to-hf out/tok.model      # only: out/tok.json from a model

Settings are chosen so decode(encode(doc)) == doc for normalised documents: identity
normalisation (the pipeline already applied NFC), no whitespace collapsing, byte fallback for
unseen characters. The sample is a seeded reservoir over all valid documents, so it is reproducible.

`--hf-json` / `--to-hf` also write the same BPE as an HF `tokenizers` file (`<prefix>.json`, `to_hf`):
the same ids for every text, run by the Rust tokenizer (multithreaded `encode_batch`).
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


# SentencePiece's words under split_by_whitespace with whitespace-only pieces allowed: a run of the
# meta symbol and what follows it up to the next one (a leading run belongs to its word), or a word
# with no meta symbol (a document's start is given one by the dummy prefix)
_WORDS = "\u2581+[^\u2581]*|[^\u2581]+"


def to_hf(model_path: str, out_json: str) -> str:
    """Write the SentencePiece BPE `model_path` (this module's settings: identity normalisation, dummy
    prefix, digits split, byte fallback, whitespace kept) as an HF `tokenizers` JSON giving the same ids.
    Merges: every split of a piece into two pieces, ranked by the merged piece's id (SentencePiece BPE
    numbers pieces in merge order), then by the parts' ids. Refuses models it would not reproduce."""
    import sentencepiece as spm
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HF

    sp = spm.SentencePieceProcessor(model_file=model_path)

    def text(ids) -> str:  # the pieces' text, byte-fallback pieces as their bytes (a corpus may lack a probe char)
        return b"".join(bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i) else sp.id_to_piece(i).encode()
                        for i in ids).decode()

    probe = sp.encode("a  b12")  # identity normalisation keeps both spaces; split_digits: "1", "2" apart
    if text(probe[-1:]) != "2" or text(probe) != "\u2581a\u2581\u2581b12":
        raise ValueError(f"{model_path}: only models trained with this module's settings convert (identity "
                         "normalisation, whitespace kept, digits split)")
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = sorted((i, vocab[p[:k]], vocab[p[k:]]) for i, p in enumerate(pieces)
                    if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    unk = pieces[sp.unk_id()]
    tok = HF(models.BPE(vocab, [(pieces[a], pieces[b]) for _, a, b in merges], unk_token=unk, fuse_unk=True,
                        byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_WORDS), behavior="isolated"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    # <s>, </s>, <unk> stay plain vocabulary entries (their ids, EOD lookup): as HF added tokens they would be
    # matched in the text itself ("git rebase --strategy <s>" -> the BOS id), which SentencePiece never does
    tok.save(out_json)
    return out_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.train_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+")
    p.add_argument("--model-prefix", help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--hf-json", action="store_true", help="also write <prefix>.json (HF tokenizers, same ids; BPE)")
    p.add_argument("--to-hf", metavar="MODEL", help="only convert this .model to <model without .model>.json")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--sample-docs", type=int, default=200_000)
    p.add_argument("--field", default="text")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "parquet", "txt"))
    p.add_argument("--txt-mode", default="line", choices=("line", "file"))
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.to_hf:
        try:
            out = to_hf(a.to_hf, a.to_hf.removesuffix(".model") + ".json")
        except (OSError, RuntimeError, ValueError) as e:  # a missing / unreadable / unconvertible model
            p.error(f"--to-hf {a.to_hf}: {e}")
        print(f"[train_tokenizer] {out}: {a.to_hf} as an HF tokenizers file")
        return 0
    if not a.input or not a.model_prefix:
        p.error("--input and --model-prefix are required (or --to-hf MODEL)")
    if a.hf_json and a.model_type != "bpe":
        p.error("--hf-json: only --model-type bpe converts")
    docs = sample_documents(iter_documents(a.input, a.field, a.format, a.txt_mode), a.sample_docs, a.seed)
    path = train(docs, a.model_prefix, a.vocab_size, a.model_type, a.character_coverage, a.seed)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    print(f"[train_tokenizer] {path}: {len(docs)} sampled documents, vocab_size={sp.get_piece_size()}, "
          f"eod_id(eos)={sp.eos_id()}")
    if a.hf_json:
        try:
            print(f"[train_tokenizer] {to_hf(path, a.model_prefix + '.json')}: the same BPE as an HF tokenizers file")
        except ValueError as e:
            p.error(f"--hf-json: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
