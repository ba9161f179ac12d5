"""One typed training config: YAML file + dotted CLI overrides (`train.steps=100`), validated before
any rank starts work. Errors name the offending key (and the file it came from)."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from mora_dist.adapters.base import AdapterConfig, MethodConfig, adapter_keys
from mora_dist.metrics.throughput import H100_BF16_DENSE_PEAK


class ConfigError(ValueError):
    pass


FULL_RANK_PARTS = ("embedding", "output_layer", "norms")  # train.full_rank
OPTIMIZERS = ("auto", "adamw", "distributed")  # train.optimizer
TP_TRANSPORTS = ("auto", "nccl", "copy_engine")  # parallel.tp_transport (parallel/overlap.py's TRANSPORTS)


def resolve_optimizer(train: "TrainConfig", cuda: bool) -> str:
    """The optimizer `train.optimizer` names on this machine: adamw or distributed (auto: the
    DistributedOptimizer on a GPU when a full-rank part trains, torch AdamW otherwise)."""
    if train.optimizer == "auto":
        return "distributed" if cuda and train.full_rank else "adamw"
    return train.optimizer


@dataclass
class ModelConfig:
    hf_dir: Optional[str] = None  # Llama-family HF checkpoint directory (weights + config.json)
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int = 2
    vocab_size: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "fp32"  # base weights: fp32 | bf16 (adapters always keep fp32 parameters)
    seed: int = 1234  # random init when hf_dir is not given


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # virtual pipeline stages per rank (megatron's interleaved 1F1B, virtual_pipeline_model_parallel_size):
    # each rank holds vpp model chunks of num_layers / (pp * vpp) layers; 1 = off. docs/design.md section 3
    vpp: int = 1
    sp: bool = False
    overlap_sp: bool = True  # under SP: adapted layers' all-gather / reduce-scatter overlapped with their GEMMs
    # under SP with a frozen output layer: the loss's input gradient summed onto each row's owner in the
    # forward (models/loss.py::_LinearCrossEntropySP); false: megatron's all-gather / reduce-scatter (an A/B switch)
    overlap_sp_loss: bool = True
    # SMs that cuBLAS leaves to NCCL while a GEMM runs next to SP's collectives (parallel/overlap.py); 0 = off
    overlap_sm_carveout: int = 0
    # how SP's exchanges travel between TP ranks (parallel/overlap.py): nccl, copy_engine (NVLink peer
    # copies through symmetric memory, no SM taken: parallel/p2p.py; GPUs of one node), or auto (copy_engine
    # where it serves, else nccl)
    tp_transport: str = "auto"


@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # [{path: prefix, weight: w}, ...] megatron indexed datasets
    eval_domain: Optional[str] = None
    eval_general: Optional[str] = None
    seq_length: int = 32
    eod_id: int = 0
    eval_batches: int = 4
    seed: int = 1234


@dataclass
class TrainConfig:
    steps: int = 40
    micro_batch: int = 2
    global_batch: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 4
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    recompute: bool = False
    eval_every: int = 0
    log_every: int = 1
    cuda_graph: bool = False  # replay each step as CUDA graphs (GPU, any TP/PP/DP; training/cuda_graph.py)
    compile: bool = True  # GPU: torch.compile RMSNorm / RoPE / the loss chunks (models/kernels.py)
    # full-rank parts of the base model trained besides the adapters (ReLoRA / ReMoRA train them):
    # any of embedding, output_layer, norms (every RMSNorm weight); [] = adapters only
    full_rank: list = field(default_factory=list)
    # peak LR of the full-rank parts (their own AdamW param group, on the same jagged schedule); null = train.lr
    full_rank_lr: Optional[float] = None
    # auto: megatron's DistributedOptimizer on a GPU when a full-rank part trains, else torch AdamW;
    # adamw: torch AdamW (every rank steps every trainable parameter); distributed: the DistributedOptimizer
    # (GPU only: Adam state and fp32 master weights sharded over DP). docs/design.md, "Optimizer"
    optimizer: str = "auto"


@dataclass
class RestartConfig:
    every: int = 0  # merge + re-init every N steps (ReLoRA / ReMoRA); 0 = off
    warmup: int = 5  # jagged schedule re-warm-up steps
    prune: float = 0.99  # optimizer-state magnitude pruning quantile; 1.0 = moments zeroed
    # the adapters' Adam state at a restart: prune = moments pruned by `prune`, step count kept;
    # delete = the whole state dropped (moments and step count: bias correction starts over), as the ReLoRA authors
    reset_optimizer: str = "prune"
    cycle_mora_types: bool = True  # ReMoRA: next grouping type at each restart (false: keep adapter.mora_type)
    # ReMoRA's type schedule: [1, 2] = the paper's Appendix B (1 -> 2 -> 1); [1, 2, 3, 4] = the released code's
    mora_types: list = field(default_factory=lambda: [1, 2])

    @property
    def mora_cycle(self) -> tuple:
        """The MoRA operator types a restart cycles through; () when cycling is off."""
        from mora_dist.adapters.mora import cycle_of

        return cycle_of(self.mora_types) if self.cycle_mora_types else ()


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    every: int = 0
    keep: int = 2  # N >= 1: keep the newest N step_* folders (the one just written counts); 0 or -1: keep all
    resume: bool = True  # false: refuse to start when checkpoint.dir already holds checkpoints
    allow_config_change: bool = False  # resume although model / adapter / eod_id differ from the checkpoint's


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    wandb: bool = False  # mirror metrics to wandb (offline unless WANDB_MODE says otherwise)
    peak_tflops: float = H100_BF16_DENSE_PEAK / 1e12  # per-GPU bf16 peak for MFU (H100 SXM datasheet; see metrics/throughput.py)
    # [first step, number of steps]: profile those steps (GPU kernels and CPU ops, every rank) into
    # out_dir/profile_rank<r>.txt (metrics/profile.py); [] = off
    profile: list = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    adapter: MethodConfig = field(default_factory=AdapterConfig)  # the class of adapter.method
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    restarts: RestartConfig = field(default_factory=RestartConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, key):
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool) and not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
    if typ is list and not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str, source: str, stored: bool = False):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping in {source}, got {data!r}")
    if cls is MethodConfig:  # adapter.*: the keys of the class of adapter.method
        try:
            cls, data = adapter_keys(data, stored)
        except ValueError as e:
            raise ConfigError(f"{str(e)} (in {source})") from None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} in {source}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        typ, key = hints[f.name], f"{prefix}{f.name}"
        if typing.get_origin(typ) is typing.Union and data[f.name] is not None:  # Optional[X] given: X
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, data[f.name], key + ".", source, stored)
        else:
            kwargs[f.name] = _coerce(data[f.name], typ, key)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{str(e)} (in {source})") from None


def _set_dotted(d: dict, dotted: str, value):
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    d[parts[-1]] = value


def _one_line(err: Exception) -> str:
    """A YAML parser error (several lines with a caret diagram) as one line."""
    return " ".join(str(err).split())


def load_config(path: Optional[str] = None, overrides: list[str] = ()) -> Config:
    """Load `path` (YAML) and apply `key.sub=value` overrides (values parsed as YAML)."""
    data, source = {}, "defaults"
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {_one_line(e)}") from None
        source = path
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {k.strip()}: invalid YAML value {v!r}: {_one_line(e)}") from None
        _set_dotted(data, k.strip(), value)
        source = f"{source} + overrides"
    cfg = _build(Config, data, "", source)
    validate(cfg, source)
    return cfg


def config_from_dict(data: dict, source: str) -> Config:
    """A Config from a plain dict (e.g. the one a checkpoint stores), typed and checked key by key
    like a YAML file; not validated against the launch environment. Adapter keys of other methods
    (older checkpoints stored every method's) are dropped."""
    return _build(Config, data, "", source, stored=True)


# model.* keys that describe the architecture: with model.hf_dir they are read from its config.json
SHAPE_KEYS = {"num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
              "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
              "vocab_size": "vocab_size", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
              "tie_embeddings": "tie_word_embeddings"}


def resolve_model_shape(cfg: Config) -> None:
    """With `model.hf_dir`, overwrite the shape keys of `cfg.model` with the checkpoint's (its
    config.json), so validation, the dataset and the logs see the model that is built."""
    m = cfg.model
    if not m.hf_dir:
        return
    path = os.path.join(m.hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"model.hf_dir: {path} not found (a Hugging Face model folder)")
    from mora_dist.models.config import LlamaSpec

    try:
        spec = LlamaSpec.from_hf(m.hf_dir)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.hf_dir: {path}: {e}") from None
    for key, spec_key in SHAPE_KEYS.items():
        setattr(m, key, getattr(spec, spec_key))


def _check_vpp(cfg: Config, dp: int) -> None:
    """parallel.vpp (megatron's interleaved schedule): what megatron would reject deep inside the first step."""
    t, p, m = cfg.train, cfg.parallel, cfg.model
    if p.vpp < 1:
        raise ConfigError(f"parallel.vpp must be >= 1 (1 = no virtual pipeline stages), got {p.vpp}")
    if p.vpp == 1:
        return
    if p.pp < 2:
        raise ConfigError(f"parallel.vpp={p.vpp} needs parallel.pp >= 2 (virtual stages interleave pipeline "
                          f"stages; got parallel.pp={p.pp}); set parallel.vpp=1")
    if m.num_layers % (p.pp * p.vpp):
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp * parallel.vpp = "
                          f"{p.pp} * {p.vpp} (each virtual stage holds num_layers / (pp * vpp) layers); "
                          "change parallel.vpp")
    n_micro = t.global_batch // (t.micro_batch * dp)
    if n_micro % p.pp:
        raise ConfigError(f"parallel.vpp={p.vpp}: train.global_batch / (train.micro_batch * data-parallel size) = "
                          f"{t.global_batch} / ({t.micro_batch} * {dp}) = {n_micro} micro-batches, not a multiple "
                          f"of parallel.pp={p.pp} (megatron's interleaved schedule runs them in groups of pp); "
                          "change train.global_batch or train.micro_batch")


def validate(cfg: Config, source: str = "config", world_size: Optional[int] = None) -> None:
    """Checks that need several sections or the launch environment; run before any rank works."""
    from mora_dist.training.config_rules import check_ranges

    resolve_model_shape(cfg)  # first: every size check below is about the model that is built
    check_ranges(cfg, ConfigError)  # first: the arithmetic below divides by some of these
    t, p, m = cfg.train, cfg.parallel, cfg.model
    world = world_size or int(os.environ.get("WORLD_SIZE", 1))
    if p.tp < 1 or p.pp < 1:
        raise ConfigError(f"parallel.tp / parallel.pp must be >= 1 (got {p.tp}, {p.pp})")
    if world % (p.tp * p.pp):
        raise ConfigError(f"parallel.tp * parallel.pp = {p.tp * p.pp} does not divide the world size {world}")
    dp = world // (p.tp * p.pp)
    if t.global_batch % (t.micro_batch * dp):
        raise ConfigError(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch * "
                          f"data-parallel size = {t.micro_batch} * {dp}")
    if m.num_layers % p.pp:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    _check_vpp(cfg, dp)
    if m.num_query_groups % p.tp or m.num_attention_heads % p.tp:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} / num_attention_heads must be divisible "
                          f"by parallel.tp={p.tp}")
    if p.tp_transport not in TP_TRANSPORTS:
        raise ConfigError(f"parallel.tp_transport must be one of {', '.join(TP_TRANSPORTS)}, got {p.tp_transport!r}")
    ce = p.tp_transport == "copy_engine" and p.tp > 1
    cuda = False
    if ce or t.cuda_graph or t.optimizer == "distributed" or (t.optimizer == "auto" and t.full_rank):
        import torch  # only here: the rest of the config needs no torch

        cuda = torch.cuda.is_available()
    if t.cuda_graph and not cuda:
        raise ConfigError("train.cuda_graph: true needs a GPU (none is visible); set train.cuda_graph=false")
    if ce and not cuda:
        raise ConfigError("parallel.tp_transport: copy_engine needs GPUs (none is visible); set parallel.tp_transport=nccl")
    if t.optimizer == "distributed" and not cuda:
        raise ConfigError("train.optimizer: distributed needs a GPU (none is visible); "
                          "set train.optimizer=adamw (or auto)")
    if t.full_rank and m.dtype != "fp32" and resolve_optimizer(t, cuda) == "adamw":
        raise ConfigError(f"train.full_rank with model.dtype={m.dtype} needs fp32 master weights, which only "
                          "train.optimizer=distributed (on a GPU) keeps; set model.dtype=fp32 or train.full_rank=[]")
    vocab_parts = sorted(set(t.full_rank) & {"embedding", "output_layer"})
    if vocab_parts and m.vocab_size % p.tp:
        raise ConfigError(f"train.full_rank: {', '.join(vocab_parts)} at parallel.tp={p.tp} needs model.vocab_size="
                          f"{m.vocab_size} divisible by parallel.tp (padded vocab rows would train); "
                          "change parallel.tp")
    if m.tie_embeddings and len(vocab_parts) == 1:
        raise ConfigError(f"train.full_rank lists {vocab_parts[0]} alone, but model.tie_embeddings: true makes the "
                          "output layer the embedding; list both embedding and output_layer, or neither")
    if cfg.run.profile and (len(cfg.run.profile) != 2 or min(int(v) for v in cfg.run.profile) < 1):
        raise ConfigError(f"run.profile must be [first_step, n_steps] with both >= 1 (got {cfg.run.profile}); [] = off")
    if m.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"model.dtype must be fp32 or bf16, got {m.dtype!r}")
    for i, item in enumerate(cfg.data.train):
        for suffix in (".bin", ".idx"):
            if not os.path.exists(item["path"] + suffix):
                raise ConfigError(f"data.train[{i}].path: {item['path']}{suffix} not found")
    for key in ("eval_domain", "eval_general"):
        path = getattr(cfg.data, key)
        if path and not os.path.exists(path + ".idx"):
            raise ConfigError(f"data.{key}: {path}.idx not found")
    if cfg.restarts.every and cfg.restarts.every <= cfg.restarts.warmup:
        raise ConfigError(f"restarts.every={cfg.restarts.every} must exceed restarts.warmup={cfg.restarts.warmup}")

