"""Exports of a trained run, above training/ (they rebuild the training model): `merge` folds a
checkpoint's adapters into the base and writes Megatron + Hugging Face checkpoints; `peft` writes
LoRA / VeRA adapters in HF PEFT's format."""
