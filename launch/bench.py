"""Adapter CPT step throughput on one GPU, side by side with Hugging Face PEFT (issue 7).

One command measures tokens/s, model TFLOP/s, MFU and peak memory of a continual-pretraining step
(forward, backward, fused AdamW over the trainables) on the Llama-style 1.1B model of docs/design.md
section 5 (seq 2048) for: the frozen base without adapters, LoRA r=8, MoRA sharing and rotation
(r=8-equivalent), VeRA r=256, ALLoRA (LoRA r=8, eta=2) and full fine-tuning; every configuration
runs in its own process (peak memory per configuration). It then runs the peer script
`bench/peer_peft.py` (transformers + PEFT) in the same call and prints one table with
ratios to PEFT LoRA. FLOPs and MFU use the peer's formula (frozen base: 2x forward, full FT: 3x).

    python3 launch/bench.py                       # the table (GPU): every row eager and as one CUDA graph
    python3 launch/bench.py --check               # merged-weight adapter path vs per-adapter path vs dense
    python3 launch/bench.py --sweep               # before/after variants (docs/performance.md)
    python3 launch/bench.py --attn                # SDPA kernels on the model's attention shape

Options: --rows, --modes eager,graph, --mbs, --steps, --no-compile, --no-fuse, --peer PATH (default: bench/peer_peft.py),
--no-peer, --json OUT.
Library knobs it measures: adapter.fast_path (merged-weight adapter path, default on; the sweep's
per-adapter rows set MORA_DIST_ADAPTER_FAST=0, the documented override of that default),
megatron config fusions and torch.compile of RMSNorm / RoPE (mora_dist/models/kernels.py, on by
default on a GPU) and the whole step as one CUDA graph. Results: docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mora_dist.metrics.throughput import H100_BF16_MEASURED_PEAK  # noqa: E402  (no torch import)

# Llama-style 1.1B of docs/design.md section 5 (TinyLlama shape)
SIZES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_attention_heads=32, num_query_groups=4,
               ffn_hidden_size=5632),
    # Llama-3-8B shape: what continual-pretraining users adapt (docs/performance.md, 8B section)
    "8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=14336),
    "tiny": dict(vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=8, num_query_groups=2,
                 ffn_hidden_size=704),
}
PEAK_BF16_TFLOPS = H100_BF16_MEASURED_PEAK / 1e12  # MFU against the measured matmul peak (docs/design.md section 5)
NCCL_ENV = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

# name -> configuration (method: none = frozen base, full = full fine-tuning)
ROWS = {
    "frozen": dict(method="none"),
    "lora": dict(method="lora", r=8),
    "mora-sharing": dict(method="mora", r=8, mora_type="sharing"),
    "mora-rotation": dict(method="mora", r=8, mora_type="rotation"),
    "vera": dict(method="vera", r=256),
    "allora": dict(method="lora", r=8, allora={"eta": 2.0}),
    "full": dict(method="full"),
}


def flops_per_token(size: dict, seq: int, full: bool) -> float:
    """The peer's formula (bench/peer_peft.py), i.e. mora_dist.metrics.flops without adapter terms:
    frozen base = forward + input-grad backward = 2x forward, full FT = 3x forward."""
    from mora_dist.metrics.flops import DecoderShape
    from mora_dist.metrics.flops import flops_per_token as model_flops_per_token

    return model_flops_per_token(DecoderShape.from_config(size, seq), full_finetune=full)


# ----------------------------------------------------------------------------- one configuration
def _init_dist():
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    from mora_dist.compat import mcore_cpu
    from mora_dist.parallel.state import init_distributed

    mcore_cpu.apply()  # no-op with CUDA
    init_distributed(tp=1, pp=1)


def build(cfg: dict):
    import torch

    from mora_dist.models import LlamaSpec, build_model

    size = SIZES[cfg.get("size", "1b")]
    spec = LlamaSpec(max_position_embeddings=cfg["seq"], **size)
    # build_model turns on megatron's fusions and the compiled RMSNorm/RoPE on a GPU (models/kernels.py)
    from mora_dist.models.kernels import CUDA_FUSIONS

    overrides = {} if cfg.get("fuse", True) else {k: False for k, v in CUDA_FUSIONS.items() if v is True}
    torch.manual_seed(0)
    model = build_model(spec, pre_process=True, post_process=True, params_dtype=torch.bfloat16, attention="sdpa",
                        parallel_output=True, **overrides)
    method = cfg["method"]
    if method in ("lora", "mora", "vera"):
        from mora_dist.adapters import AdapterConfig
        from mora_dist.parallel.inject import apply_adapters

        kw = {k: cfg[k] for k in ("r", "mora_type", "allora") if k in cfg}
        apply_adapters(model, AdapterConfig(method=method, **kw))
        # no timing on zeros (B, M, b start at zero): small random trainables
        g = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 1e-3)
    elif method == "none":
        for p in model.parameters():
            p.requires_grad_(False)
        # nothing trains: make the backward run through every layer (input gradients, as adapters need)
        model.embedding.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return model, spec, size


def run_one(cfg: dict) -> dict:
    import torch

    from mora_dist.parallel.inject import fixed_adapters
    from mora_dist.training.step import optimizer_step

    os.environ.update(NCCL_ENV)
    for k, v in cfg.get("env", {}).items():
        os.environ[k] = v
    if not cfg.get("compile", True):
        os.environ["MORA_DIST_COMPILE"] = "0"
    _init_dist()
    model, spec, size = build(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    ntrain = sum(p.numel() for p in params)
    graph = bool(cfg.get("graph")) and torch.cuda.is_available()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=graph) if params else None
    mbs, seq = cfg["mbs"], cfg["seq"]
    cuda = torch.cuda.is_available()
    dev = torch.cuda.current_device() if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = torch.randint(0, spec.vocab_size, (mbs, seq), device=dev)
    pos = torch.arange(seq, device=dev).unsqueeze(0).expand(mbs, -1)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    accum = cfg.get("accum", 1)  # micro-batches per optimizer step (gradient accumulation)
    step_factors = cfg.get("step_factors", True)  # fixed_adapters' (--cast-per-forward: off)
    accumulate = step_factors and cfg.get("accumulate", True)  # its factor gradients summed a step (--per-micro-grads: off)

    def micro():
        loss = model(tokens, pos, None, labels=tokens).mean()
        (loss / accum if accum > 1 else loss).backward()
        return loss

    def forward_backward():
        # with accumulation the merged weights are built once a step and read by every micro-batch;
        # a one-micro-batch step builds them in its forward (inside the whole-step graph)
        with fixed_adapters(model, step_factors=step_factors, accumulate=accumulate) if accum > 1 else \
                contextlib.nullcontext(lambda: None) as flush:
            for _ in range(accum):
                loss = micro()
            flush()
        return loss

    def step():  # the Trainer's step (training/step.py): zero, forward + backward, grad norm, AdamW
        if opt is None:
            return forward_backward()
        return optimizer_step(opt, params, forward_backward, max_norm=0.0)[0]

    t_c = time.perf_counter()
    build_graph = None
    if graph and accum > 1:
        if not cfg.get("eager_build"):
            from mora_dist.training.cuda_graph import BuildGraph
            build_graph = BuildGraph()
        step = capture_accum_step(model, opt, micro, accum, cfg.get("warm", 3), build_graph, step_factors, accumulate)
    elif graph:
        step = capture_step(opt, step, cfg.get("warm", 3))
    else:
        for _ in range(cfg.get("warm", 3)):
            loss = step()
    loss = step()
    sync()
    warm_s = time.perf_counter() - t_c
    steps = cfg.get("steps", 10)
    per = []
    t0 = time.perf_counter()
    if cuda:
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        ev[0].record()
    for i in range(steps):
        loss = step()
        if cuda:
            ev[i + 1].record()
    sync()
    dt = (time.perf_counter() - t0) / steps
    per = sorted(ev[i].elapsed_time(ev[i + 1]) for i in range(steps)) if cuda else [dt * 1e3]
    tok_s = mbs * seq * accum / dt
    fpt = flops_per_token(size, seq, cfg["method"] == "full")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    extra = {}
    if build_graph is not None:
        extra["build_graph_diff"] = build_graph_check(model, build_graph)
    if cuda and cfg.get("profile"):
        extra = profile_steps(step, cfg["profile"], f"{cfg.get('name')}: mean step {dt * 1e3:.1f} ms",
                              cpu=bool(cfg.get("profile_cpu")))
    return dict(**extra, graph=graph, name=cfg.get("name"), method=cfg["method"], size=cfg.get("size", "1b"), mbs=mbs,
                accum=accum,
                seq=seq, trainable=ntrain,
                step_ms=round(dt * 1e3, 2), step_ms_median=round(per[len(per) // 2], 2),
                step_ms_min=round(per[0], 2), tokens_per_s=round(tok_s), model_tflops=round(tok_s * fpt / 1e12, 1),
                mfu=round(tok_s * fpt / 1e12 / PEAK_BF16_TFLOPS, 3), peak_gib=round(peak, 2),
                loss=round(float(loss), 4), warm_s=round(warm_s, 1))


def capture_step(opt, eager_step, warm: int):
    """The whole step (zero, forward, backward, grad norm, fused AdamW) as one CUDA graph: the same
    kernels with no per-op CPU launch cost (PyTorch's whole-network capture recipe: warm up on a side
    stream, grads set to None before capture so the replayed backward writes them; AdamW
    capturable=True). Collectives over 1-rank groups (megatron's vocab-parallel loss at TP=1) are
    identities and are skipped, so nothing but kernels is captured."""
    import torch

    from mora_dist.training.cuda_graph import skip_single_rank_collectives

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), skip_single_rank_collectives():
        for _ in range(warm):
            eager_step()
    torch.cuda.current_stream().wait_stream(s)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with skip_single_rank_collectives(), torch.cuda.graph(g, capture_error_mode="thread_local"):
        loss = eager_step()

    def replay():
        g.replay()
        return loss

    return replay


def capture_accum_step(model, opt, micro, accum: int, warm: int, build=None, step_factors: bool = True,
                       accumulate: bool = True):
    """A step of `accum` micro-batches as the Trainer runs it under `train.cuda_graph`: the merged
    weights built once (fixed_adapters; by `build`, a `BuildGraph`, as the Trainer does, or eagerly
    when None), one micro-batch's forward and backward replayed `accum` times from the Trainer's
    `MicrobatchGraph` (captured at the first step; gradients allocated before capture, so the
    replayed backward accumulates into them), the factor gradients' flush (`accumulate`), the grad norm and
    fused AdamW eagerly (`training/step.py`)."""
    import torch

    from mora_dist.parallel.inject import fixed_adapters, zero_factor_grads
    from mora_dist.training.cuda_graph import MicrobatchGraph
    from mora_dist.training.step import optimizer_step

    params = [p for p in model.parameters() if p.requires_grad]

    def zero_grads():
        zero_factor_grads(model)
        for p in params:
            p.grad = torch.zeros_like(p)

    graph = MicrobatchGraph(lambda _: micro().detach(), zero_grads, warmup=warm)

    def forward_backward():
        with fixed_adapters(model, build, step_factors, accumulate) as flush:
            loss = [graph({}, first_of_step=i == 0) for i in range(accum)][-1]
            flush()
            return loss

    def step():  # grads zeroed in place: the captured backward adds into them
        if opt is None:
            return forward_backward()
        return optimizer_step(opt, params, forward_backward, max_norm=0.0, zero_grad=lambda: opt.zero_grad(set_to_none=False))[0]

    return step


def build_graph_check(model, build_graph) -> float:
    """Max |W - W'| over the adapted layers between the step weights a `BuildGraph` replay wrote and an eager
    build from the same (trained) parameters: 0 unless a replay read stale tensors."""
    import torch

    from mora_dist.parallel.inject import adapted_layers, fixed_adapters

    with torch.no_grad(), fixed_adapters(model, build_graph):
        return max([m.fixed_weight_error() for m in adapted_layers(model)], default=0.0)


def profile_steps(step, path: str, title: str, n: int = 2, cpu: bool = False) -> dict:
    """Kernel time per step and the top kernels (and CPU ops, `cpu`) of n steps, appended to path."""
    from mora_dist.metrics.profile import profiled

    with profiled(path, title, n, cpu=cpu) as res:
        for _ in range(n):
            step()
    return res


def spawn(cfg: dict, timeout: int = 300) -> dict:
    env = dict(os.environ, **NCCL_ENV, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(name=cfg.get("name"), error=f"timeout {timeout}s")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = [ln for ln in (p.stderr or p.stdout).splitlines() if "Error" in ln or "error" in ln]
    return dict(name=cfg.get("name"), error=(err[-1] if err else "") + " | " + (p.stderr or p.stdout)[-3000:])


# ----------------------------------------------------------------------------- the training loop
TRAIN_ROWS = ("lora", "mora-sharing", "mora-rotation", "vera", "allora")


def random_tokens(prefix: str, vocab: int, n_tokens: int) -> str:
    """A megatron indexed dataset of uniform random token ids (seed 0, documents of 4,096), written
    afresh at `prefix`; uint16 where the vocabulary fits."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16 if vocab < 65500 else np.int32)
    for _ in range(-(-n_tokens // 4096)):
        b.add_document(torch.from_numpy(rng.integers(3, vocab, 4096).astype(np.int64)), [4096])
    b.finalize(prefix + ".idx")
    return prefix


def model_overrides(size: str) -> list:
    """launch/train.py overrides for the bench shape `size` with a bf16 base."""
    return [f"model.{k}={v}" for k, v in SIZES[size].items()] + ["model.dtype=bf16"]


def train_rows(names, steps: int, mbs: int, seq: int, workdir: str, timeout: int = 300, size: str = "1b",
               modes=(False, True)) -> list:
    """What `launch/train.py` itself achieves (megatron DDP, schedules, grad norm/clip, AdamW,
    metrics) on the 1.1B model, eager and with `train.cuda_graph=true`: random tokens (a megatron
    indexed dataset written here), global batch 2 micro-batches, one process per run. Returns
    rows with the loop's own throughput summary (post-warm-up mean) and the per-step losses."""
    os.makedirs(workdir, exist_ok=True)
    sz = SIZES[size]
    prefix = random_tokens(os.path.join(workdir, "random_tokens"), sz["vocab_size"],
                           (steps + 2) * 2 * mbs * (seq + 1) * 2)
    out = []
    for name in names:
        row = ROWS[name]
        adapter = [f"adapter.method={row['method']}", f"adapter.r={row['r']}"]
        adapter += [f"adapter.mora_type={row['mora_type']}"] if "mora_type" in row else []
        adapter += [f"adapter.allora.eta={row['allora']['eta']}"] if "allora" in row else []
        for graph in modes:
            tag = f"{name}{'+graph' if graph else ''}"
            run_dir = os.path.join(workdir, tag)
            ov = model_overrides(size)
            ov += adapter + [f"data.train=[{{path: {prefix}}}]", f"data.seq_length={seq}", "data.eod_id=0",
                             f"train.steps={steps}", f"train.micro_batch={mbs}", f"train.global_batch={2 * mbs}",
                             "train.lr=1e-4", "train.warmup=2", f"train.cuda_graph={str(graph).lower()}",
                             "train.log_every=1000", f"run.out_dir={run_dir}", f"run.peak_tflops={PEAK_BF16_TFLOPS}",
                             "parallel.tp=1"]
            env = dict(os.environ, **NCCL_ENV, PYTHONUNBUFFERED="1", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + len(out)))
            env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
            try:
                p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *ov], env=env,
                                   capture_output=True, text=True, timeout=timeout)
                text = p.stdout
            except subprocess.TimeoutExpired as e:
                p, text = None, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            summ = next((json.loads(ln.split(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("throughput: ")), None)
            if summ is None or summ.get("tokens_per_s") is None:
                with open(run_dir + ".log", "w") as f:
                    f.write(text + "\n----- stderr\n" + (p.stderr if p is not None else "timeout"))
                err = (p.stderr if p is not None else "timeout")[-2000:]
                out.append(dict(name=f"train:{tag}", error=err))
                print(json.dumps(out[-1]), flush=True)
                continue
            losses = []
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                for ln in f:
                    d = json.loads(ln)
                    if "loss" in d:
                        losses.append(round(d["loss"], 5))
            tok_s = summ["tokens_per_s"]
            fpt = flops_per_token(sz, seq, False)
            out.append(dict(name=f"train:{tag}", method=row["method"], size=size, mbs=mbs, seq=seq, graph=graph,
                            step_ms=round(summ["mean_step_time"] * 1e3, 2), tokens_per_s=round(tok_s),
                            model_tflops=round(tok_s * fpt / 1e12, 1), mfu=round(tok_s * fpt / 1e12 / PEAK_BF16_TFLOPS, 3),
                            peak_gib=round(summ["peak_mem_gib"], 2), trainable=None, losses=losses))
            print(json.dumps(out[-1]), flush=True)
    return out


# ----------------------------------------------------------------------------- peer
def find_peer(path):
    for c in ([path] if path else []) + [os.path.join(ROOT, "bench", "peer_peft.py")]:
        if c and os.path.isfile(c):
            return os.path.abspath(c)
    return None


def run_peer(path, mbs: int, seq: int, timeout: int = 420, size: str = "1b", methods: str = "lora,vera,full",
             liger: bool = False):
    env = dict(os.environ, **NCCL_ENV, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, path, "--size", size, "--seq", str(seq), "--mbs", str(mbs), "--methods", methods]
    try:
        p = subprocess.run(cmd + (["--liger"] if liger else []), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], dict(error="peer timeout")
    rows, head = [], {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            (rows.append(d) if "method" in d else head.update(d))
    if not rows:
        head["error"] = p.stderr[-1500:]
    return rows, head


# ----------------------------------------------------------------------------- checks
def check(size_name: str = "1b", layers: int = 2) -> list:
    """On the current device, for each method: the merged-weight path (adapter.fast_path)
    against the per-adapter path (output, input grad, parameter grads of a short model) and one
    layer (linear_qkv) against a dense float64 reference x (W0 + dW)^T."""
    import torch

    from mora_dist.adapters import AdapterConfig
    from mora_dist.models import LlamaSpec, build_model
    from mora_dist.parallel.inject import apply_adapters

    _init_dist()
    size = dict(SIZES[size_name], num_layers=layers)
    spec = LlamaSpec(max_position_embeddings=256, **size)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = []

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    for name, row in ROWS.items():
        if row["method"] in ("none", "full"):
            continue
        torch.manual_seed(0)
        model = build_model(spec, pre_process=True, post_process=True, params_dtype=torch.bfloat16, attention="sdpa")
        model.to(dev)
        kw = {k: row[k] for k in ("r", "mora_type", "allora") if k in row}
        acfg = AdapterConfig(method=row["method"], **kw)
        apply_adapters(model, acfg)
        g = torch.Generator(device=dev).manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g, device=dev) * 0.02)
        tok = torch.randint(0, spec.vocab_size, (2, 256), generator=g, device=dev)
        pos = torch.arange(256, device=dev).unsqueeze(0).expand(2, -1)
        res = {}

        def grads(fast):
            acfg.fast_path = fast  # every adapter of the model holds this config
            model.zero_grad(set_to_none=True)
            loss = model(tok, pos, None, labels=tok).mean()
            loss.backward()
            return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

        res["merged"], res["per_adapter"] = grads(True), grads(False)
        acfg.fast_path = True
        # one layer against float64 dense (bf16 model)
        layer = model.decoder.layers[0].self_attention.linear_qkv
        x = torch.randn(64, 2, spec.hidden_size, generator=g, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            y, _ = layer(x)
            W = layer.base.weight.double().clone()
            for n, a in layer.adapters.items():
                W.index_add_(0, getattr(layer, f"_pos_{n}"), a.delta_weight().double())
            ref = x.double() @ W.t()
            base = x.double() @ layer.base.weight.double().t()
        model.float()  # fp32 reference of the same model: every adapter gradient, both bf16 paths
        res["fp32"] = grads(True)
        row = dict(check=name, loss_merged=round(float(res["merged"][0]), 5), loss_per_adapter=round(float(res["per_adapter"][0]), 5),
                   loss_fp32=round(float(res["fp32"][0]), 5))
        for k in ("merged", "per_adapter"):
            row[f"grad_rel_{k}_vs_fp32"] = round(max(rel(res[k][1][n], res["fp32"][1][n]) for n in res["fp32"][1]), 5)
        row.update(qkv_out_rel_vs_fp64=round(rel(y, ref), 5),
                   adapter_share_of_qkv=round(float((ref - base).norm() / ref.norm()), 4))
        out.append(row)
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


def check_loss(size_name: str = "8b", tokens: int = 4096) -> list:
    """The chunked linear cross-entropy (models/loss.py) in bf16 on the device against float64 of the
    same bf16 inputs, next to the plain bf16 computation (whole logits, torch cross entropy): loss,
    gradient of the hidden states, gradient of the output weight (when it trains). Relative norms."""
    import torch
    import torch.nn.functional as F

    from mora_dist.models.loss import linear_cross_entropy

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    size = SIZES[size_name]
    h, V = size["hidden_size"], size["vocab_size"]
    g = torch.Generator(device=dev).manual_seed(5)
    x0 = torch.randn(tokens, 1, h, generator=g, device=dev).bfloat16()
    W0 = (torch.randn(V, h, generator=g, device=dev) * 0.02).bfloat16()
    labels = torch.randint(0, V, (1, tokens), generator=g, device=dev)
    gl = torch.rand(1, tokens, generator=g, device=dev)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def run(fn, dtype):
        x = x0.to(dtype).clone().requires_grad_(True)
        W = W0.to(dtype).clone().requires_grad_(True)
        loss = fn(x, W)
        (loss.double() * gl.double()).sum().backward()
        return loss.detach(), x.grad, W.grad

    def plain(x, W):
        return F.cross_entropy((x[:, 0] @ W.t()).float(), labels[0], reduction="none")[None]

    ref = run(plain, torch.float64)
    out = []
    for name, fn in (("chunked", lambda x, W: linear_cross_entropy(x, W, labels)), ("plain-bf16", plain)):
        got = run(fn, torch.bfloat16)
        out.append(dict(check=f"loss:{name}", size=size_name, tokens=tokens, loss_rel=round(rel(got[0], ref[0]), 7),
                        xgrad_rel=round(rel(got[1], ref[1]), 5), wgrad_rel=round(rel(got[2], ref[2]), 5)))
        if name == "chunked":  # the frozen-weight path (dx = g * D from the forward)
            x = x0.clone().requires_grad_(True)
            (linear_cross_entropy(x, W0, labels).double() * gl.double()).sum().backward()
            out[-1]["xgrad_rel_frozen_w"] = round(rel(x.grad, ref[1]), 5)
    return out


def attn_bench(mbs: int = 4, seq: int = 2048, heads: int = 32, groups: int = 4, hd: int = 64) -> list:
    """SDPA kernels, forward + backward, on the model's [s, b, n, h] -> [b, n, s, h] views."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    q = torch.randn(seq, mbs, heads, hd, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3).requires_grad_()
    k = torch.randn(seq, mbs, groups, hd, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3).requires_grad_()
    v = torch.randn(seq, mbs, groups, hd, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3).requires_grad_()
    go = torch.randn(mbs, heads, seq, hd, device=dev, dtype=torch.bfloat16)
    flops = 4 * mbs * heads * seq * seq * hd / 2 * 3.5  # causal fwd + bwd (2.5x fwd)
    rows = []
    outs = {}
    for name, be, expand in (("flash-gqa", SDPBackend.FLASH_ATTENTION, False),
                             ("cudnn-gqa", SDPBackend.CUDNN_ATTENTION, False),
                             ("cudnn-expand", SDPBackend.CUDNN_ATTENTION, True),
                             ("flash-expand", SDPBackend.FLASH_ATTENTION, True),
                             ("efficient-expand", SDPBackend.EFFICIENT_ATTENTION, True)):
        def f():
            kk, vv = k, v
            if expand:
                kk, vv = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
            with sdpa_kernel([be]):
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand)
            o.backward(go)
            return o
        try:
            q.grad = k.grad = v.grad = None
            o = f()
            outs[name] = [t.detach().float() for t in (o, q.grad, k.grad, v.grad)]
            for _ in range(2):
                f()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                f()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / 10 * 1e3
            r = dict(attn=name, ms_fwd_bwd=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
            if name != "flash-gqa" and "flash-gqa" in outs:  # out, dq, dk, dv against torch's default kernel
                r["rel_vs_flash"] = [round(float((a - b).norm() / b.norm()), 5) for a, b in zip(outs[name], outs["flash-gqa"])]
            rows.append(r)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(attn=name, error=repr(e)[:200]))
        q.grad = k.grad = v.grad = None
    return rows


def matmul_peak() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t) / 1e12


# ----------------------------------------------------------------------------- table
def flat_row(r: dict, system: str, size: str, device: str) -> dict:
    """One result in the committed row format (docs/perf/*.json): system, config, size, seq, mbs,
    tokens_per_s, step_ms, peak_gib, device (+ mfu, error where known)."""
    cfg = r.get("name") or r.get("method")
    if system == "peft":
        cfg = ("peft+liger " if r.get("liger") else "peft ") + str(r.get("method"))
    out = dict(system=system, config=cfg, size=r.get("size", size), seq=r.get("seq"), mbs=r.get("mbs"),
               tokens_per_s=r.get("tokens_per_s"), step_ms=r.get("step_ms"), peak_gib=r.get("peak_gib"), device=device)
    if "mfu" in r or "model_tflops" in r:
        out["mfu"] = r.get("mfu", round(r.get("model_tflops", 0) / PEAK_BF16_TFLOPS, 3))
    if "build_graph_diff" in r:
        out["build_graph_diff"] = r["build_graph_diff"]
    if "error" in r:
        out["error"] = r["error"][:300]
    return out


def table(rows: list) -> str:
    """Markdown table of flat rows; ratios to the best PEFT LoRA and the best PEFT + Liger LoRA row."""
    def best(liger):
        c = [r["tokens_per_s"] for r in rows if r["system"] == "peft" and r["config"] == ("peft+liger lora" if liger else "peft lora")
             and r.get("tokens_per_s")]
        return max(c) if c else None

    ref, ref_l = best(False), best(True)
    lines = ["| system | config | size | seq | mbs | tokens/s | x PEFT LoRA best | x PEFT+Liger LoRA best | step ms | MFU | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("error") or not r.get("tokens_per_s"):
            lines.append(f"| {r['system']} | {r['config']} | {r['size']} | {r['seq']} | {r['mbs']} | error: {str(r.get('error'))[:120]!r} | | | | | |")
            continue
        x = lambda b: f"{r['tokens_per_s'] / b:.2f}" if b else "-"  # noqa: E731
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['system']} | {r['config']} | {r['size']} | {r['seq']} | {r['mbs']} | {r['tokens_per_s']:,} | "
                     f"{x(ref)} | {x(ref_l)} | {r['step_ms']} | {mfu} | {r['peak_gib']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--attn", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="before/after variants instead of the table")
    ap.add_argument("--train", default="", help="also run launch/train.py for these rows "
                    "(comma list of " + ",".join(TRAIN_ROWS) + ", or 'all')")
    ap.add_argument("--train-modes", default="eager,graph", help="--train: eager and/or graph (train.cuda_graph)")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/mora_dist_bench", help="--train: dataset and run directories")
    ap.add_argument("--size", default="1b", choices=sorted(k for k in SIZES if k != "tiny"),
                    help="1b: the 1.1B TinyLlama shape (vocab 32000); 8b: the Llama-3-8B shape (vocab 128256)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ",".join(ROWS))
    ap.add_argument("--modes", default="eager,graph", help="eager and/or graph (whole step as one CUDA graph)")
    ap.add_argument("--mbs", default="4", help="micro-batch size(s), comma list: every row at each")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", default="1", help="micro-batches per optimizer step, comma list: every row at each "
                    "(the merged weights are built once a step)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--per-micro-grads", action="store_true", help="accum > 1: the factors' gradients go to the "
                    "trainables in every micro-batch's backward (as before fixed_adapters' accumulate), for an A/B")
    ap.add_argument("--cast-per-forward", action="store_true", help="accum > 1: each forward casts its adapters' "
                    "factors (as before fixed_adapters' step_factors), for an A/B")
    ap.add_argument("--eager-build", action="store_true", help="graph + accum: the merged weights built eagerly "
                    "a step (the Trainer's before BuildGraph), for an A/B")
    ap.add_argument("--no-compile", action="store_true", help="without the compiled RMSNorm/RoPE (MORA_DIST_COMPILE=0)")
    ap.add_argument("--no-fuse", action="store_true", help="without megatron's fused SwiGLU/residual/CE")
    ap.add_argument("--peer", default=None)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-methods", default="lora,vera,full")
    ap.add_argument("--peer-mbs", default=None, help="peer micro-batch size(s), comma list (default: --mbs)")
    ap.add_argument("--liger", action="store_true", help="also the peer with Liger's Triton kernels (--liger) for LoRA")
    ap.add_argument("--profile", default=None, help="append per-configuration kernel profiles to this file")
    ap.add_argument("--profile-cpu", action="store_true", help="--profile: CPU ops too, sorted by CPU time")
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--only", default="", help="--sweep: comma list of name prefixes to run")
    ap.add_argument("--json", default=None, help="write all results here (rewritten after each configuration)")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(json.loads(a.one))), flush=True)
        return
    os.environ.update(NCCL_ENV)
    results = dict()
    if a.check:
        results["check"] = check() + check_loss(a.size)
        for r in results["check"]:
            print(json.dumps(r), flush=True)
    if a.attn:
        results["attn"] = attn_bench(int(a.mbs.split(",")[0]), a.seq)
        for r in results["attn"]:
            print(json.dumps(r), flush=True)
    if a.check or a.attn:
        if a.json:
            json.dump(results, open(a.json, "w"), indent=1)
        return
    import torch

    head = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                bf16_matmul_tflops=round(matmul_peak(), 1))
    print(json.dumps(head), flush=True)
    dev = head["device"]
    mbs_list = [int(m) for m in a.mbs.split(",")]
    base = dict(size=a.size, seq=a.seq, steps=a.steps, warm=a.warm, compile=not a.no_compile, fuse=not a.no_fuse,
                eager_build=a.eager_build, step_factors=not a.cast_per_forward, accumulate=not a.per_micro_grads)
    if a.profile:
        base["profile"] = os.path.abspath(a.profile)
        base["profile_cpu"] = a.profile_cpu
    if a.sweep:
        cfgs = sweep_configs(dict(base, mbs=mbs_list[0]))
        if a.only:
            cfgs = [c for c in cfgs if any(c["name"].startswith(p) for p in a.only.split(","))]
    else:
        cfgs = []
        for mbs in mbs_list:
            for accum in [int(x) for x in a.accum.split(",")]:
                for mode in a.modes.split(","):
                    for n in a.rows.split(","):
                        if n:
                            tag = ("+graph" if mode == "graph" else "") + (f"+accum{accum}" if accum > 1 else "")
                            tag += "+eager-build" if a.eager_build and mode == "graph" and accum > 1 else ""
                            tag += "+cast-per-forward" if a.cast_per_forward and accum > 1 else ""
                            tag += "+per-micro-grads" if a.per_micro_grads and not a.cast_per_forward and accum > 1 else ""
                            cfgs.append(dict(base, mbs=mbs, accum=accum, name=n + tag, graph=mode == "graph", **ROWS[n]))
    rows = []
    results.update(head=head, rows=rows)

    def emit(r, system):
        rows.append(flat_row(r, system, a.size, dev))
        print(json.dumps(r), flush=True)
        if a.json:
            json.dump(results, open(a.json, "w"), indent=1)

    for c in cfgs:
        emit(spawn(c, timeout=600), "mora_dist")
    if a.train:
        names = TRAIN_ROWS if a.train == "all" else a.train.split(",")
        modes = tuple(m == "graph" for m in a.train_modes.split(","))
        for mbs in mbs_list:
            for r in train_rows(names, a.train_steps, mbs, a.seq, a.workdir, size=a.size, modes=modes, timeout=600):
                emit(r, "mora_dist")
    if not a.no_peer:
        path = find_peer(a.peer)
        if path is None:
            results["peer_head"] = dict(error="peer_peft.py not found")
        peer_mbs = [int(m) for m in (a.peer_mbs or a.mbs).split(",")] if path else []
        for mbs in peer_mbs:
            for liger in ([False, True] if a.liger else [False]):
                methods = "lora" if liger else a.peer_methods
                peer, peer_head = run_peer(path, mbs, a.seq, size=a.size, methods=methods, liger=liger, timeout=900)
                results.setdefault("peer_head", peer_head)
                if not peer:
                    peer = [dict(method=methods, liger=liger, mbs=mbs, seq=a.seq, error=peer_head.get("error", "no rows"))]
                for r in peer:
                    emit(r, "peft")
    print(f"\n{head['device']}, torch {head['torch']}, bf16 matmul {head['bf16_matmul_tflops']} TFLOP/s measured; "
          f"MFU against {PEAK_BF16_TFLOPS} (peer's formula)\n")
    print(table(rows))


def sweep_configs(base: dict) -> list:
    """Before/after variants for docs/performance.md (eager unless named +graph)."""
    plain = dict(base, compile=False, fuse=False)
    slow = dict(MORA_DIST_ADAPTER_FAST="0")
    out = [
        dict(plain, name="frozen:plain", **ROWS["frozen"]),
        dict(base, compile=False, name="frozen:+fuse", **ROWS["frozen"]),
        dict(base, name="frozen:+fuse+compile", **ROWS["frozen"]),
        dict(base, name="frozen:mbs8", **dict(ROWS["frozen"], mbs=8)),
        dict(plain, name="lora:plain+per-adapter", env=slow, **ROWS["lora"]),
    ]
    for n in ("lora", "mora-sharing", "vera", "mora-rotation", "allora"):
        out.append(dict(base, name=f"{n}:per-adapter", env=slow, **ROWS[n]))
        out.append(dict(base, name=f"{n}:fast", **ROWS[n]))
        out.append(dict(base, name=f"{n}:fast+graph", graph=True, **ROWS[n]))
    out += [
        dict(base, name="lora-mbs8:fast", **dict(ROWS["lora"], mbs=8)),
        dict(base, name="full", **ROWS["full"]),
    ]
    return out


if __name__ == "__main__":
    main()
