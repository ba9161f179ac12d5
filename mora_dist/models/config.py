"""Llama-family architecture description, read from / written to a Hugging Face config.json.

One dataclass covers Llama 2/3 (incl. llama3 rope scaling), Mistral and Qwen2: the differences
are the RoPE base/scaling, qkv bias (Qwen2), tied embeddings and an optional sliding window.
Anything we cannot reproduce exactly raises `UnsupportedModelError` instead of building a model
whose logits would silently differ from transformers'.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or an option of it is not supported by the builder."""


@dataclass
class LlamaSpec:
    """Architecture hyper-parameters (HF names in comments).

    `rope_scaling` is None or an HF rope-parameters dict with `rope_type` "linear" or "llama3".
    `hf_config` keeps the original config.json dict (if any) so export can write it back.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int  # num_hidden_layers
    num_attention_heads: int
    num_query_groups: int  # num_key_value_heads
    ffn_hidden_size: int  # intermediate_size
    head_dim: Optional[int] = None  # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: Optional[int] = None
    model_type: str = "llama"
    init_method_std: float = 0.02
    hf_config: Optional[dict] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "llama3"):
                raise UnsupportedModelError(
                    f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)"
                )

    # ------------------------------------------------------------------ HF config
    @classmethod
    def from_hf(cls, source) -> "LlamaSpec":
        """From a HF model directory, a config.json path, a dict or a `transformers` config."""
        if isinstance(source, (str, os.PathLike)):
            path = os.path.join(source, "config.json") if os.path.isdir(source) else str(source)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                d = json.load(f)
        elif isinstance(source, dict):
            d = copy.deepcopy(source)
        else:  # a transformers PretrainedConfig
            d = source.to_dict()
        return cls._from_dict(d)

    @classmethod
    def _from_dict(cls, d: dict) -> "LlamaSpec":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {mt!r} (architectures {d.get('architectures')}) is not supported; "
                f"supported: {SUPPORTED_MODEL_TYPES}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
        if mt == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
            raise UnsupportedModelError("llama attention_bias/mlp_bias=True is not supported (o_proj/MLP biases)")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        # transformers 5 nests RoPE settings in rope_parameters; 4.x used rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
        scaling = None
        if kind not in (None, "default"):
            scaling = {k: v for k, v in {**legacy, **rope}.items() if k != "rope_theta"}
            scaling["rope_type"] = kind
        window = d.get("sliding_window")
        if mt == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        if mt == "qwen2" and window is not None:
            raise UnsupportedModelError("qwen2 use_sliding_window=True (per-layer windows) is not supported")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=d.get("num_key_value_heads") or heads,
            ffn_hidden_size=d["intermediate_size"],
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=(mt == "qwen2"),
            sliding_window=window,
            model_type=mt,
            init_method_std=d.get("initializer_range", 0.02),
            hf_config=d,
        )

    def to_hf_dict(self, dtype: Optional[torch.dtype] = None) -> dict:
        """config.json contents for export: the original dict updated with our fields."""
        d = copy.deepcopy(self.hf_config) if self.hf_config else {}
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        d.update(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            intermediate_size=self.ffn_hidden_size,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            rope_parameters=rope,
        )
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if dtype is not None:
            d["dtype"] = str(dtype).removeprefix("torch.")
            d.pop("torch_dtype", None)
        return d

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("hf_config")
        return d


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """RoPE inverse frequencies as transformers computes them (default, linear, llama3).

    `linear` divides positions by the factor, i.e. inv_freq / factor. `llama3` (transformers'
    `_compute_llama3_parameters`): wavelengths longer than original_max/low_freq_factor are
    divided by factor, shorter than original_max/high_freq_factor kept, and the band in between
    interpolated with smooth = (original_max / wavelen - low) / (high - low).
    """
    dim = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = spec.rope_scaling
    if not s:
        return inv
    kind = s.get("rope_type", s.get("type"))
    factor = float(s["factor"])
    if kind == "linear":
        return inv / factor
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, out)
