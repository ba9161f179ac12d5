"""Hugging Face safetensors <-> megatron GPTModel shards for Llama-family decoders.

Import: every rank opens the checkpoint lazily (`safe_open`) and reads only the slices of the
tensors its TP/PP shard needs, so no rank ever holds the whole model. Sharded checkpoints
(`model.safetensors.index.json`) and single files are both supported.

Export: every TP rank may first transform its local shards (`shard_transform`, e.g. merging an
adapter's delta into its shard of W0), shards are gathered to TP rank 0 of each pipeline stage,
split into canonical HF tensors, optionally transformed again (`transform`), and that rank writes
one safetensors file for its stage; global rank 0 writes the index and config.json. Output files
from different stages go to the same directory, so multi-node export needs a shared filesystem.
The directory is staged beside `out_dir` and renamed into place when complete (no stale shards).

Both directions walk the same per-stage table (`_entries`), so names and layouts cannot drift.
Modules are reached by attribute (`layer.self_attention.linear_qkv`); a wrapper that keeps the
frozen linear as `.base_layer` or `.base` is looked through (see `_owner`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from mora_dist.models.config import LlamaSpec
from mora_dist.models.layout import fc1_row_index, fuse_rows, qkv_row_index, split_rows

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ----------------------------------------------------------------------------- reading
class SafetensorsDir:
    """Lazy reader over a HF checkpoint directory; reads slices without loading whole tensors."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map: Dict[str, str] = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if not files:
                others = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth"))]
                hint = f" (found {others}: convert them to safetensors)" if others else ""
                raise FileNotFoundError(f"no *.safetensors files and no {INDEX_FILE} in {self.path}{hint}")
            self.weight_map = {}
            for fn in files:
                with safe_open(os.path.join(self.path, fn), "pt") as h:
                    self.weight_map.update({k: fn for k in h.keys()})
        self._open = safe_open
        self._handles: dict = {}

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in checkpoint {self.path}")
        fn = self.weight_map[name]
        if fn not in self._handles:
            full = os.path.join(self.path, fn)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{fn} (listed for tensor {name!r} in {INDEX_FILE}) is missing from {self.path}")
            self._handles[fn] = self._open(full, "pt")
        return self._handles[fn]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, name: str, shape: tuple, rows=None, cols=None) -> torch.Tensor:
        """Tensor `name` (checked to have full `shape`), restricted to rows/cols (start, stop)."""
        sl = self._handle(name).get_slice(name)
        got = tuple(sl.get_shape())
        if got != tuple(shape):
            raise ValueError(
                f"tensor {name!r} in {self.path} has shape {list(got)} but the model config expects {list(shape)}"
            )
        if rows is not None:
            return sl[rows[0]:rows[1]]
        if cols is not None:
            return sl[:, cols[0]:cols[1]]
        return sl[:]


# ----------------------------------------------------------------------------- mapping table
@dataclass
class _Entry:
    qualname: str  # megatron parameter name within this stage's model, e.g. decoder.layers.0...weight
    module: torch.nn.Module  # module owning the parameter (after looking through wrappers)
    attr: str  # "weight" | "bias" | "layer_norm_weight"
    kind: str  # vocab | replicated | qkv | cols | fc1
    hf: List[str]  # HF tensor names; qkv: [q, k, v], fc1: [gate, up]


def _owner(module: torch.nn.Module, attr: str) -> torch.nn.Module:
    """The module that actually holds `attr` (looks through adapter wrappers)."""
    m = module
    for _ in range(4):
        if isinstance(getattr(m, attr, None), torch.Tensor):
            return m
        m = getattr(m, "base_layer", None) or getattr(m, "base", None)
        if m is None:
            break
    raise AttributeError(f"{type(module).__name__} has no tensor {attr!r} (nor a wrapped base layer with one)")


def _norm_entry(layer_name, layer, plain: str, fused_into: str, hf: str) -> _Entry:
    """Local spec: separate norm module; TE spec: norm fused into the next linear."""
    norm = getattr(layer, plain, None)
    if norm is not None and isinstance(getattr(norm, "weight", None), torch.Tensor):
        return _Entry(f"{layer_name}.{plain}.weight", norm, "weight", "replicated", [hf])
    mod = layer
    for part in fused_into.split("."):
        mod = getattr(mod, part)
    return _Entry(f"{layer_name}.{fused_into}.layer_norm_weight", _owner(mod, "layer_norm_weight"),
                  "layer_norm_weight", "replicated", [hf])


def _entries(model, spec: LlamaSpec) -> List[_Entry]:
    out = []
    if model.pre_process:
        emb = model.embedding.word_embeddings
        out.append(_Entry("embedding.word_embeddings.weight", emb, "weight", "vocab", ["model.embed_tokens.weight"]))
    for i, layer in enumerate(model.decoder.layers):
        p = f"model.layers.{layer.layer_number - 1}"
        ln = f"decoder.layers.{i}"
        attn, mlp = layer.self_attention, layer.mlp
        out.append(_norm_entry(ln, layer, "input_layernorm", "self_attention.linear_qkv",
                               f"{p}.input_layernorm.weight"))
        qkv = [f"{p}.self_attn.{x}_proj" for x in "qkv"]
        out.append(_Entry(f"{ln}.self_attention.linear_qkv.weight", _owner(attn.linear_qkv, "weight"), "weight",
                          "qkv", [n + ".weight" for n in qkv]))
        if spec.qkv_bias:
            out.append(_Entry(f"{ln}.self_attention.linear_qkv.bias", _owner(attn.linear_qkv, "bias"), "bias",
                              "qkv", [n + ".bias" for n in qkv]))
        out.append(_Entry(f"{ln}.self_attention.linear_proj.weight", _owner(attn.linear_proj, "weight"), "weight",
                          "cols", [f"{p}.self_attn.o_proj.weight"]))
        out.append(_norm_entry(ln, layer, "pre_mlp_layernorm", "mlp.linear_fc1",
                               f"{p}.post_attention_layernorm.weight"))
        out.append(_Entry(f"{ln}.mlp.linear_fc1.weight", _owner(mlp.linear_fc1, "weight"), "weight", "fc1",
                          [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"]))
        out.append(_Entry(f"{ln}.mlp.linear_fc2.weight", _owner(mlp.linear_fc2, "weight"), "weight", "cols",
                          [f"{p}.mlp.down_proj.weight"]))
    if model.post_process:
        out.append(_Entry("decoder.final_layernorm.weight", model.decoder.final_layernorm, "weight", "replicated",
                          ["model.norm.weight"]))
        if model.output_layer.weight is not None:  # None when tied and on the embedding's stage
            hf = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
            out.append(_Entry("output_layer.weight", model.output_layer, "weight", "vocab", [hf]))
    return out


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _full_shapes(spec: LlamaSpec) -> Dict[str, tuple]:
    """Canonical HF shape per tensor-name suffix (the checkpoint must match these)."""
    h, hn = spec.hidden_size, spec.head_dim
    q, kv, f = spec.num_attention_heads * hn, spec.num_query_groups * hn, spec.ffn_hidden_size
    return {
        "embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
        "norm.weight": (h,), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (h, q),
        "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
    }


def _shape(shapes, name):
    return shapes[".".join(name.split(".")[-2:])]


# ----------------------------------------------------------------------------- import
@torch.no_grad()
def load_hf_checkpoint(model, hf_dir) -> None:
    """Fill this rank's shards of `model` (from `build_model`) from a HF safetensors directory.

    Reads only the slices this rank owns. Raises FileNotFoundError / KeyError / ValueError that
    name the directory, the tensor and the shapes involved.
    """
    models = model if isinstance(model, (list, tuple)) else [model]
    reader = SafetensorsDir(hf_dir)
    tp, r = _tp()
    for m in models:
        spec: LlamaSpec = m.llama_spec
        shapes = _full_shapes(spec)
        idx_qkv = qkv_row_index(spec.num_attention_heads, spec.num_query_groups, spec.head_dim, tp, r)
        idx_fc1 = fc1_row_index(spec.ffn_hidden_size, tp, r)
        for e in _entries(m, spec):
            param = getattr(e.module, e.attr)
            n = param.shape[0]
            if e.kind == "replicated":
                val = reader.read(e.hf[0], _shape(shapes, e.hf[0]))
            elif e.kind == "vocab":
                start, stop = r * n, min((r + 1) * n, spec.vocab_size)
                val = torch.zeros(param.shape, dtype=param.dtype)
                if stop > start:
                    val[: stop - start] = reader.read(e.hf[0], _shape(shapes, e.hf[0]), rows=(start, stop))
            elif e.kind == "cols":
                k = param.shape[1]
                val = reader.read(e.hf[0], _shape(shapes, e.hf[0]), cols=(r * k, (r + 1) * k))
            else:
                index = idx_qkv if e.kind == "qkv" else idx_fc1
                parts = {
                    key: reader.read(name, _shape(shapes, name), rows=rows.span())
                    for (key, rows), name in zip(index.items(), e.hf)
                }
                val = fuse_rows(parts, index)
            if tuple(val.shape) != tuple(param.shape):
                raise ValueError(
                    f"{e.qualname}: local shard shape {list(param.shape)} but {e.hf} gives {list(val.shape)}"
                )
            param.copy_(val.to(param.dtype))


# ----------------------------------------------------------------------------- export
def _gather_tp(t: torch.Tensor) -> List[torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [t]
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t, group=ps.get_tensor_model_parallel_group())
    return parts


def _canonical(e: _Entry, parts: List[torch.Tensor], spec: LlamaSpec) -> Dict[str, torch.Tensor]:
    """TP shards of one parameter -> {hf_name: full tensor}."""
    tp = len(parts)
    if e.kind == "replicated":
        return {e.hf[0]: parts[0]}
    if e.kind == "vocab":
        return {e.hf[0]: torch.cat(parts, 0)[: spec.vocab_size]}
    if e.kind == "cols":
        return {e.hf[0]: torch.cat(parts, 1)}
    pieces: Dict[str, List[torch.Tensor]] = {}
    for r, shard in enumerate(parts):
        if e.kind == "qkv":
            index = qkv_row_index(spec.num_attention_heads, spec.num_query_groups, spec.head_dim, tp, r)
        else:
            index = fc1_row_index(spec.ffn_hidden_size, tp, r)
        for key, val in split_rows(shard, index).items():
            pieces.setdefault(key, []).append(val)
    return {name: torch.cat(pieces[key], 0) for key, name in zip(pieces, e.hf)}


@torch.no_grad()
def export_hf(
    model,
    out_dir,
    *,
    shard_transform: Optional[Callable[[str, torch.nn.Module, torch.Tensor], torch.Tensor]] = None,
    transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> None:
    """Write `model` (this stage's GPTModel, or a list of virtual-stage chunks) as a HF checkpoint.

    Atomic (utils/atomic_dir.py): written beside `out_dir` and renamed into place, so no file
    of an older export survives; an existing non-empty `out_dir` is refused unless `overwrite`.

    Collective: every rank of the model-parallel world must call it.
    shard_transform(qualname, module, local_shard) -> local_shard runs on every TP rank before
      gathering (qualname like "decoder.layers.0.self_attention.linear_qkv.weight", module the
      owner of the parameter): the place to merge adapter deltas into local shards.
    transform(hf_name, tensor) -> tensor runs on the writer on each full canonical HF tensor.
    dtype: output dtype (default: the parameters' dtype).
    """
    from megatron.core import parallel_state as ps

    models = model if isinstance(model, (list, tuple)) else [model]
    spec: LlamaSpec = models[0].llama_spec
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    writer = tp_rank == 0 and ps.get_data_parallel_rank() == 0
    tensors: Dict[str, torch.Tensor] = {}
    out_dtype = dtype
    for m in models:
        for e in _entries(m, spec):
            local = getattr(e.module, e.attr).detach()
            if shard_transform is not None:
                new = shard_transform(e.qualname, e.module, local)
                if tuple(new.shape) != tuple(local.shape):
                    raise ValueError(f"shard_transform changed {e.qualname} from {list(local.shape)} to {list(new.shape)}")
                local = new
            out_dtype = out_dtype or local.dtype
            parts = _gather_tp(local)
            if not writer:
                continue
            for name, val in _canonical(e, parts, spec).items():
                if name in tensors:  # tied embedding also present on the last stage's output layer
                    continue
                if transform is not None:
                    val = transform(name, val)
                tensors[name] = val.to(device="cpu", dtype=out_dtype).contiguous()
    filename = SINGLE_FILE if pp == 1 else f"model-{pp_rank + 1:05d}-of-{pp:05d}.safetensors"
    from mora_dist.utils.atomic_dir import atomic_output

    with atomic_output(out_dir, overwrite, "HF export") as tmp:
        if writer:
            from safetensors.torch import save_file

            save_file(tensors, os.path.join(tmp, filename), metadata={"format": "pt"})
        # global rank 0 collects the names of every stage for the index, then writes config.json
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        names = ({n: filename for n in tensors}, size) if writer else ({}, 0)
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(names, gathered, dst=0)
        if dist.get_rank() == 0:
            weight_map = {k: v for d, _ in gathered for k, v in d.items()}
            if pp > 1:
                meta = {"total_size": sum(n for _, n in gathered)}
                with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                    json.dump({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(spec.to_hf_dict(out_dtype), f, indent=2)
