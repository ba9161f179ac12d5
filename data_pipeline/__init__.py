"""Tokenize domain corpora into megatron-core indexed datasets (`.bin` + `.idx`) on Ray Data."""
