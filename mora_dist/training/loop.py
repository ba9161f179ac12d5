"""The training loop: megatron-core pipeline schedules over an adapter-wrapped GPTModel.

Per step: the jagged/cosine LR; a ReLoRA/ReMoRA restart when due (restarts.py); then the shared
optimizer step (step.py): micro-batches through `get_forward_backward_func` (1F1B under PP, the
interleaved 1F1B under `parallel.vpp` > 1); megatron DistributedDataParallel reduces the gradients
over DP in its fp32 grad buffers; the global grad norm is completed over TP/PP and clipped; the
optimizer steps.

Model chunks: a rank holds one GPTModel for its pipeline stage, or, with `parallel.vpp` = V > 1,
V chunks (virtual stages vp_stage 0..V-1, each num_layers / (pp * V) layers, the layers of rank r's
chunk v being those of global virtual stage v * pp + r), each wrapped in its own DDP. `Trainer.model`
is the one GPTModel, or an nn.ModuleList of the chunks: whatever walks it (adapted_layers,
fixed_adapters, defer_tp_grads, named_adapters, checkpoints, restarts) walks every chunk, and the
layers' global names (checkpoint keys, seeds) are the same under any pipeline split.

What trains: the adapters and the full-rank parts `train.full_rank` names (embedding, output layer,
norms: their own param group at `train.full_rank_lr`). Optimizer (`train.optimizer`, see
training/optimizer.py): torch AdamW (fused on GPU; the CPU path, and adapters alone: their Adam
state is small, LoRA r=8 on 1.1B is 50 MB) or megatron's DistributedOptimizer (on a GPU, `auto`
with full-rank parts: their Adam state and fp32 masters sharded over DP).
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from mora_dist.parallel import overlap
from mora_dist.parallel.inject import adapted_layers, defer_tp_grads, fixed_adapters, zero_factor_grads

from mora_dist.training.config import Config, resolve_optimizer
from mora_dist.training.schedule import jagged_cosine_lr
from mora_dist.training.step import optimizer_step


def build_adapted_model(cfg: Config, vp_stage: int | None = None):
    """This pipeline stage's Llama GPTModel (HF weights or random init) with the configured adapters;
    with `vp_stage`, that virtual stage's chunk. Returns (model, AdapterReport)."""
    from megatron.core import parallel_state as ps

    from mora_dist.parallel.inject import apply_adapters
    from mora_dist.training.model import build_for_training

    plain = vp_stage is None
    model = build_for_training(cfg.model, cfg.parallel, cfg.train.recompute,
                               ps.is_pipeline_first_stage(ignore_virtual=plain, vp_stage=vp_stage),
                               ps.is_pipeline_last_stage(ignore_virtual=plain, vp_stage=vp_stage),
                               seq_length=cfg.data.seq_length, compile=cfg.train.compile, vp_stage=vp_stage)
    if cfg.train.recompute and getattr(model, "pre_process", False):
        # The embedding is frozen, so its output does not require grad, and megatron's checkpointed
        # layers (an autograd Function of their *inputs*) would then drop every adapter gradient.
        model.embedding.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    report = apply_adapters(model, cfg.adapter)
    for layer in adapted_layers(model):
        layer.overlap_sp = cfg.parallel.overlap_sp
    model.sp_forward_reduce = cfg.parallel.overlap_sp_loss
    return model, report


def build_adapted_chunks(cfg: Config):
    """This rank's model chunks: [the stage's model], or one per virtual stage under `parallel.vpp`
    (megatron's parallel state must have been initialised with the same vpp). Returns (chunks, the
    AdapterReport summed over them)."""
    from megatron.core import parallel_state as ps

    from mora_dist.parallel.inject import AdapterReport

    vpp = cfg.parallel.vpp
    state_vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    if state_vpp != vpp:
        raise ValueError(f"parallel.vpp={vpp} but megatron's parallel state has {state_vpp} virtual stages: "
                         "initialise it with init_distributed(..., vpp=cfg.parallel.vpp)")
    chunks, total = [], AdapterReport()
    for vp_stage in ([None] if vpp == 1 else range(vpp)):
        model, report = build_adapted_model(cfg, vp_stage=vp_stage)
        chunks.append(model)
        total += report
    return chunks, total


def stage_module(chunks: list) -> torch.nn.Module:
    """One module for the rank's chunks: the model itself, or an nn.ModuleList of the virtual stages."""
    return chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)


def _loss_func(loss_mask, output):
    loss = (output.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place


def _to_device(batch: dict) -> dict:
    if not torch.cuda.is_available():
        return batch
    dev = torch.cuda.current_device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _forward_step(data_iterator, model):
    b = _to_device(next(data_iterator))
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    return out, lambda o: _loss_func(b["loss_mask"].float(), o)


class Trainer:
    def __init__(self, cfg: Config):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from mora_dist.training import data as data_mod

        from mora_dist.training.optimizer import build_optimizer, enable_full_rank

        self.cfg, self.ps = cfg, ps
        overlap.set_sm_carveout(cfg.parallel.overlap_sm_carveout)
        # SP's exchanges between TP ranks: NCCL or the copy engines (one collective over the TP group)
        self.tp_transport = overlap.choose_transport(cfg.parallel.tp_transport, ps.get_tensor_model_parallel_group())
        self.chunks, self.report = build_adapted_chunks(cfg)
        # before DDP: it buckets trainable params
        self.full_rank = [f for c in self.chunks for f in enable_full_rank(c, cfg.train.full_rank)]
        n_full = sum(f.param.numel() for f in self.full_rank)
        self.report.trainable, self.report.frozen = self.report.trainable + n_full, self.report.frozen - n_full
        self.optimizer_kind = resolve_optimizer(cfg.train, torch.cuda.is_available())
        distributed = self.optimizer_kind == "distributed"
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=distributed)
        # Under graphs DDP is made on a side stream: DDP keeps each parameter's AccumulateGrad node (its
        # grad hooks live there), and a node runs on the stream it was made on: made on the legacy default
        # stream, the captured backward would have to join that stream, which CUDA forbids. Made on a side
        # stream, it joins the capture (PyTorch's recipe for DDP under CUDA graphs).
        side = torch.cuda.Stream() if cfg.train.cuda_graph and torch.cuda.is_available() else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # None: a no-op
            self.ddps = [DistributedDataParallel(c.config, ddp_config, c) for c in self.chunks]
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        self.model = model = stage_module(self.chunks)
        self._reduce_tp = defer_tp_grads(model)  # replicated adapter grads: one TP all-reduce a step
        self.params = [p for d in self.ddps for p in d.parameters() if p.requires_grad]
        self.opt = build_optimizer(cfg, self.ddps, self.params, self.full_rank, self.optimizer_kind)
        t, d = cfg.train, cfg.data
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.dp = dp
        weights = [float(x.get("weight", 1.0)) for x in d.train]
        ds = data_mod.build_dataset([x["path"] for x in d.train], weights, t.steps * t.global_batch, d.seq_length,
                                    d.seed, d.eod_id, cfg.model.vocab_size)
        self.batches = data_mod.BatchSource(ds, t.global_batch, t.micro_batch, dp, dp_rank)
        self.eval_sets = {}
        for name in ("domain", "general"):
            path = getattr(d, f"eval_{name}")
            if path:
                n = d.eval_batches * t.global_batch
                self.eval_sets[name] = data_mod.BatchSource(
                    data_mod.build_dataset([path], None, n, d.seq_length, d.seed + 1, d.eod_id, cfg.model.vocab_size),
                    t.global_batch, t.micro_batch, dp, dp_rank)
        self.step = 0
        self.restarts = 0
        self.graph = self.build_graph = None
        if t.cuda_graph:
            if not torch.cuda.is_available():
                raise ValueError("train.cuda_graph: true needs a GPU")
            from mora_dist.training.cuda_graph import BuildGraph, MicrobatchGraph, ScheduleGraph, graph_safe_rng

            if ps.get_tensor_model_parallel_world_size() == 1:  # TP > 1 (ALLoRA's all-reduce in a build) not timed
                self.build_graph = BuildGraph()

            if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
                graph_safe_rng(cfg.model.seed)
            if ps.get_pipeline_model_parallel_world_size() > 1:
                # megatron synchronises the device after batched P2P transfers (an old torch race);
                # a capture cannot contain a device sync, and the transfers are ordered on the stream
                for c in self.chunks:
                    c.config.batch_p2p_sync = False
                self.graph = ScheduleGraph(lambda batches: self._schedule(iter(batches), len(batches), False))
            else:
                self.graph = MicrobatchGraph(self._graph_fwd_bwd, self._zero_grads)

    @property
    def ddp(self):
        """The DDP-wrapped model of a rank with one chunk (`ddps`: every chunk's)."""
        if len(self.ddps) != 1:
            raise AttributeError(f"Trainer.ddp: this rank holds {len(self.ddps)} model chunks "
                                 "(parallel.vpp); use Trainer.ddps")
        return self.ddps[0]

    # --- one step ---------------------------------------------------------------------------
    def lr_at(self, step: int, peak: float | None = None) -> float:
        """The LR at `step` of a param group with peak LR `peak` (default train.lr)."""
        t, r = self.cfg.train, self.cfg.restarts
        return jagged_cosine_lr(step, t.lr if peak is None else peak, t.warmup, t.steps, t.min_lr_ratio, r.every,
                                r.warmup)

    def _run_schedule(self, source, step: int, forward_only: bool):
        return self._schedule(source.microbatches(step), source.num_microbatches, forward_only)

    def _data_iterators(self, batches):
        """megatron's data iterator: `batches` for one chunk; under parallel.vpp one iterator per chunk
        over the same micro-batches (the interleaved schedule runs every micro-batch through every chunk,
        each reading its own iterator in micro-batch order)."""
        if len(self.ddps) == 1:
            return batches
        batches = list(batches)
        return [iter(batches) for _ in self.ddps]

    def _schedule(self, batches, n: int, forward_only: bool):
        """megatron's schedule (1F1B under PP, interleaved under parallel.vpp) over `n` micro-batches
        from the iterator `batches`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=self._data_iterators(batches), model=self.ddps,
            num_microbatches=n,
            seq_length=self.cfg.data.seq_length, micro_batch_size=self.cfg.train.micro_batch,
            forward_only=forward_only)

    def _graph_fwd_bwd(self, b: dict) -> torch.Tensor:
        """One micro-batch as the no-pipelining schedule does it: loss / num_microbatches, backward."""
        out = self.ddp(b["tokens"], b["position_ids"], None, labels=b["labels"])
        loss, _ = _loss_func(b["loss_mask"].float(), out)
        (loss / self.batches.num_microbatches).backward()
        return loss.detach()

    def _zero_grads(self) -> None:
        zero_factor_grads(self.model)
        for d in self.ddps:
            d.zero_grad_buffer()
        for p in self.params:
            p.grad = None
        if self.optimizer_kind == "distributed":
            self.opt.zero_grad()  # its shards' gradients

    def _run_graphed(self, step: int) -> list:
        from mora_dist.training.cuda_graph import ScheduleGraph

        if isinstance(self.graph, ScheduleGraph):
            return self.graph(list(self.batches.microbatches(step)))
        return [{"loss": self.graph(b, first_of_step=(i == 0))}
                for i, b in enumerate(self.batches.microbatches(step))]

    def _mean_loss(self, losses) -> float:
        """Mean micro-batch loss of the last stage, averaged over DP, known to every rank."""
        ps = self.ps
        val = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage() and losses:
            val[0] = sum(x["loss"].double() for x in losses)
            val[1] = len(losses)
        dist.all_reduce(val)  # every rank of every TP/PP/DP group contributes; divide by the count
        return (val[0] / val[1]).item() if val[1] else float("nan")

    def grad_norm(self) -> float:
        """Global L2 norm of the trainable gradients (adapters, then full-rank parts): sharded tensors
        summed over TP (vocab-parallel embedding / output layer too), replicated ones (norms) counted
        once, stages summed over PP, the tied output-layer copy of a PP > 1 run not counted (DP grads
        are identical after the reduction). The DistributedOptimizer computes its own (`DistributedAdam`)."""
        ps = self.ps
        tp_rank0 = ps.get_tensor_model_parallel_rank() == 0
        grads = [p.grad for layer in adapted_layers(self.model) for a in layer.adapters.values()
                 for n, p in a.named_parameters() if p.grad is not None and (tp_rank0 or a.is_sharded(n))]
        grads += [f.param.grad for f in self.full_rank
                  if f.param.grad is not None and not f.replica and (tp_rank0 or f.sharded)]
        dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # same backend on every rank
        total = torch.zeros(1, dtype=torch.float64, device=dev)
        if grads:  # one multi-tensor kernel for the per-tensor norms, squares summed in float64
            total += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        dist.all_reduce(total, group=ps.get_model_parallel_group())
        return math.sqrt(total.item())

    def _forward_backward(self, step: int) -> list:
        """Every micro-batch of `step` (graphed, or through the schedule), gradients reduced over DP into p.grad."""
        # merged weights built once for the step's micro-batches, and their factors cast once (their gradients
        # summed over the micro-batches and sent to the trainables once), except with a micro-batch graph and
        # eager builds (TP > 1): there the graph casts them, as timed on two GPUs
        reuse = self.graph is None or self.build_graph is not None
        with fixed_adapters(self.model, self.build_graph, step_factors=reuse, accumulate=reuse) as flush:
            if self.graph is not None:
                losses = self._run_graphed(step)
            else:
                losses = self._run_schedule(self.batches, step, forward_only=False)
            flush()
        if self.cfg.train.full_rank:
            from megatron.core.distributed import finalize_model_grads

            # DP reduction, then the norms' TP all-reduce under SP and the tied embedding's over its
            # first/last-stage group (megatron's own gradient finalisation)
            finalize_model_grads(self.ddps)
        else:
            for d in self.ddps:
                d.finish_grad_sync()
        self._reduce_tp(lambda p: p.main_grad)
        if self.optimizer_kind != "distributed":  # the DistributedOptimizer reads its shards of main_grad
            for p in self.params:
                p.grad = p.main_grad
        return losses

    def close(self) -> None:
        """Release what must go before the process groups do: the CUDA graphs (`cuda_graph._release`)."""
        for g in (self.graph, self.build_graph):
            if g is not None:
                g.invalidate()

    def train_step(self) -> dict:
        from mora_dist.training import restarts

        cfg, step = self.cfg, self.step
        if cfg.restarts.every and step > 0 and step % cfg.restarts.every == 0:
            restarts.restart(self, step)
            for g in (self.graph, self.build_graph):  # restarts may rebuild tensors the graphs read
                if g is not None:
                    g.invalidate()
        lr = self.lr_at(step)
        for g in self.opt.param_groups:  # each group on the schedule of its own peak LR (max_lr)
            g["lr"] = self.lr_at(step, g["max_lr"])
        # a step that warms up or captures the CUDA graphs (PP: two eager steps, then the capture)
        # is not a measure of throughput
        graph_warmup = self.graph is not None and self.graph.graph is None
        t0 = time.perf_counter()
        losses, gnorm = optimizer_step(self.opt, self.params, lambda: self._forward_backward(step), cfg.train.clip_grad,
                                       grad_norm=lambda _: self.grad_norm(), zero_grad=self._zero_grads)
        loss = self._mean_loss(losses)
        self.step += 1
        out = dict(step=self.step, loss=loss, lr=lr, grad_norm=gnorm, step_time=time.perf_counter() - t0,
                   graph_warmup=graph_warmup)
        t = cfg.train
        if t.full_rank:
            out["lr_full_rank"] = self.lr_at(step, t.lr if t.full_rank_lr is None else t.full_rank_lr)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        out = {}
        for name, src in self.eval_sets.items():
            vals = []
            with fixed_adapters(self.model):
                for i in range(self.cfg.data.eval_batches):
                    vals.append(self._mean_loss(self._run_schedule(src, i, forward_only=True)))
            loss = sum(vals) / len(vals)
            out[f"eval/{name}_loss"] = loss
            out[f"eval/{name}_ppl"] = math.exp(loss)
        return out
