"""Adapters on megatron-core TP linears at TP=1/2/4 (gloo) against the dense float64 layer.

Every rank builds the same ColumnParallelLinear / RowParallelLinear (megatron's CPU init draws
the full weight then slices it), loads its shard of the same full adapter parameters, runs its
shard of the same input (a sequence shard under SP) and upstream gradient, and compares its
output, input gradient and parameter-gradient shards with y = x (W0 + dW)^T computed densely in
float64 from the full tensors (tests/reference.py), i.e. with the TP=1 layer.
"""
import pytest
import torch

from dist import run_ranks
from test_adapters import VARIANTS, dense_dw, random_params

pytestmark = pytest.mark.integration  # multi-process / subprocess: outside the fast unit subset

D_IN, D_OUT, R, S, B = 44, 68, 3, 8, 2  # rh = 18: d_in, d_out not multiples; chunks cross shards
TOL = dict(rtol=1e-5, atol=1e-5)


def _layer(mode, d_in, d_out, sp):
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from mora_dist.compat import mcore_cpu

    cfg = ModelParallelConfig(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                              sequence_parallel=sp, params_dtype=torch.float32, **mcore_cpu.config_overrides(ModelParallelConfig))
    torch.manual_seed(1234)
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    if mode == "column":
        return ColumnParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=False, gather_output=False)
    return RowParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                             skip_bias_add=False)


def _gather(t, dim):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def _rel(got, exp):
    """Max abs difference relative to the reference's scale (fp32 rounding grows with magnitude)."""
    exp = exp.detach().double()
    return ((got.detach().double() - exp).abs().max() / exp.abs().max().clamp(min=1.0)).item()


def _reduce_deferred(adapter):
    """What the Trainer does once a step with deferred TP gradients (`inject.defer_tp_grads`): sum
    the partial gradients of the replicated parameters the merged path left to it over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    for n in sorted(adapter.deferred):
        dist.all_reduce(getattr(adapter, n).grad, group=ps.get_tensor_model_parallel_group())


def check_layer(method, kw, mode, sp, d_in=D_IN, d_out=D_OUT, fast=True, r=R, defer=None):
    """Returns the worst differences (out, x grad, param grads, merged out, unmerge) for one case,
    on the merged-weight path (`fast`, the default at every TP) or the per-adapter path. `defer`: a
    dict: replicated parameters keep partial gradients (the Trainer's `defer_tp_grads`), summed over
    TP here after each backward; defer[name] gets the largest |local partial| before that sum."""
    from megatron.core import parallel_state as ps

    from mora_dist.adapters import AdapterConfig, build_adapter
    from mora_dist.parallel.inject import layer_shard
    from mora_dist.parallel.wrappers import AdaptedLinear

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    base = _layer(mode, d_in, d_out, sp)
    W0 = _gather(base.weight.detach(), 0 if mode == "column" else 1).to(torch.float64)
    cfg = AdapterConfig(method=method, r=r, fast_path=fast, **kw)
    shard = layer_shard(base, mode)
    adapter = build_adapter(cfg, shard)
    adapter.defer_tp_grad = defer is not None
    gen = torch.Generator().manual_seed(7)
    full_ref = build_adapter(cfg, type(shard)(d_in, d_out)).double()  # TP=1 shapes, for the full params
    params = random_params(full_ref, gen)
    adapter.load_full_({n: p.float() for n, p in params.items()})
    base.weight.requires_grad_(False)  # frozen, as in training (the merged path needs it)
    layer = AdaptedLinear(base, mode)
    layer.add_adapter("adapter", adapter)

    x = torch.randn(S, B, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(S, B, d_out, generator=gen, dtype=torch.float64)
    seq = slice(rank * S // tp, (rank + 1) * S // tp)
    cols = slice(shard.in_start, shard.in_end)
    rows = shard.out_rows
    if mode == "column":
        x_in = x[seq] if sp else x
        g_out = g[:, :, rows]
    else:
        x_in = x[:, :, cols]
        g_out = g[seq] if sp else g
    x_in = x_in.float().clone().requires_grad_(True)
    from mora_dist.parallel import overlap

    calls, fns = [], (overlap.gather_mm, overlap.mm_scatter)
    overlap.gather_mm = lambda *a, **k: (calls.append("gather"), fns[0](*a, **k))[1]
    overlap.mm_scatter = lambda *a, **k: (calls.append("scatter"), fns[1](*a, **k))[1]
    try:
        out, _ = layer(x_in)
        (out * g_out.float()).sum().backward()
    finally:
        overlap.gather_mm, overlap.mm_scatter = fns
    partials = {n: p.grad.clone() for n, p in adapter.named_parameters()} if defer is not None else {}
    if defer is not None:
        _reduce_deferred(adapter)

    # dense float64 TP=1 reference
    ref_params = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    xr = x.clone().requires_grad_(True)
    dw = dense_dw(method, cfg, None, ref_params, d_in, d_out)
    yr = xr @ (W0 + dw).t()
    if cfg.allora_eta is None:
        (yr * g).sum().backward()
    else:  # ALLoRA: output grad to the parameters scaled per row by 1/sqrt(||dW_i|| + 1/eta^2)
        c = 1 / (dw.detach().norm(dim=1) + 1 / cfg.allora_eta**2).sqrt()
        xr.grad, = torch.autograd.grad((yr * g).sum(), xr, retain_graph=True)
        ((x @ dw.t()) * g * c).sum().backward()
    y_exp = yr[:, :, rows] if mode == "column" else (yr[seq] if sp else yr)
    gx_exp = (xr.grad[seq] if sp else xr.grad) if mode == "column" else xr.grad[:, :, cols]
    diffs = dict(out=_rel(out, y_exp), xgrad=_rel(x_in.grad, gx_exp),
                 wrong_path=float(layer._use_merged(None) != fast))
    # under SP at TP > 1 the merged path runs SP's collectives inside its GEMMs (overlap.py): forward
    # and input gradient each through one of them
    diffs["wrong_comm_path"] = float(len(calls) != (2 if fast and sp and tp > 1 else 0))
    # the fast path merges every adapter into the weight (MoRA's block types on row shards too):
    # no adapter left to its own forward
    diffs["wrong_kernel_path"] = float(fast and adapter.factors(torch.float32) is None
                                       and adapter.block_operator() is None)
    diffs["per_adapter_extra"] = float(fast and bool(layer._merged_plan()[2]))
    for n, p in adapter.named_parameters():
        diffs[f"grad_{n}"] = _rel(p.grad, adapter.shard_of(n, ref_params[n].grad))
    if defer is not None:
        diffs["not_deferred"] = float(fast and tp > 1 and not adapter.deferred)
        defer.update({n: partials[n].abs().max().item() for n in adapter.deferred})

    # inside inject.fixed_adapters (an optimizer step's micro-batches): the merged weight is built
    # once, on entry, and two micro-batches read it; their output and accumulated gradients are
    # twice the single pass's
    from mora_dist.parallel import merged as merged_mod
    from mora_dist.parallel.inject import fixed_adapters

    grads1 = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    for p in adapter.parameters():
        p.grad = None
    builds, build = [], merged_mod.build_weight
    merged_mod.build_weight = lambda *a, **k: (builds.append(1), build(*a, **k))[1]
    try:
        x_f = x_in.detach().clone().requires_grad_(True)
        with fixed_adapters(layer):
            for _ in range(2):
                out_f, _ = layer(x_f)
                (out_f * g_out.float()).sum().backward()
        if defer is not None:
            _reduce_deferred(adapter)
    finally:
        merged_mod.build_weight = build
    diffs["fixed_out"] = _rel(out_f, out)
    diffs["fixed_xgrad"] = _rel(x_f.grad / 2, x_in.grad)
    diffs["fixed_builds"] = float(len(builds) != (1 if fast else 0))
    for n, p in adapter.named_parameters():
        diffs[f"fixed_grad_{n}"] = _rel(p.grad / 2, grads1[n])

    # merge: the merged layer alone gives the adapted output; unmerge restores W0
    w_before = base.weight.detach().clone()
    with torch.no_grad():
        layer.merge()
        merged, _ = layer(x_in)
        diffs["merged"] = _rel(merged, out)
        layer.unmerge()
        diffs["unmerge"] = (base.weight - w_before).abs().max().item()
        unmerged, _ = layer(x_in)
        diffs["unmerged_out"] = _rel(unmerged, out)
    return diffs


ALLORA = [("lora", {"allora_eta": 2.0}), ("mora", {"mora_type": "sharing", "allora_eta": 1.0}),
          ("vera", {"allora_eta": 1.5}), ("mora", {"mora_type": "rotation", "allora_eta": 1.0})]


def _all_cases(rank, sps):
    out = {}
    for method, kw in VARIANTS + ALLORA:
        for mode in ("column", "row"):
            for sp in sps:
                for fast in (True, False):
                    out[(method, str(kw), mode, sp, fast)] = check_layer(method, kw, mode, sp, fast=fast)
    return out


def _assert_small(results):
    bad = []
    for rank, res in enumerate(results):
        for case, diffs in res.items():
            for k, v in diffs.items():
                if not v <= 1e-5:
                    bad.append(f"rank {rank} {case} {k}={v:.2e}")
    assert not bad, "\n".join(bad[:40])


def test_tp1_all_methods():
    _assert_small(run_ranks(_all_cases, 1, [False], tp=1))


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_equals_dense_all_methods_with_and_without_sp(tp):
    _assert_small(run_ranks(_all_cases, tp, [False, True], tp=tp))


# MoRA's block types on row-parallel shards (linear_proj, linear_fc2) on the merged path, (d_in, d_out, r)
# with rh for rotation / decouple: the default shape (rh 18: chunks cross every shard boundary, the
# wrapped last chunk is split between the last and first shards, rows tiled: L = 54 < 68); d_in > d_out
# (rh 14 / 15, 2 of 7 chunks reach the output: shards from the second (TP=2) / third (TP=4) on hold no
# used chunk, as linear_fc2 at 1.1B and 8B); chunks aligned with the shards (rh 16); tiled rows with
# aligned chunks at TP=2 and cut ones at TP=4 (rh 16, L = 32 < 100)
ROW_BLOCK_SHAPES = [(D_IN, D_OUT, R), (96, 20, 2), (64, 64, 2), (32, 100, 2)]
ROW_BLOCK_TYPES = [{"mora_type": "rotation"}, {"mora_type": "decouple"}, {"mora_type": "rotation", "allora_eta": 1.0}]


def _row_block_cases(rank, sps):
    """Every row-block case on the merged and per-adapter paths against the dense float64 layer,
    then on the merged path with deferred TP gradients: (diffs, {case: (largest |partial dM|, shard
    holds a used chunk)})."""
    from megatron.core import parallel_state as ps

    from mora_dist.adapters import blockdiag
    from mora_dist.adapters.mora import mora_rank

    tp = ps.get_tensor_model_parallel_world_size()
    out, partials = {}, {}
    for d_in, d_out, r in ROW_BLOCK_SHAPES:
        for kw in ROW_BLOCK_TYPES:
            for sp in sps:
                for fast in (True, False):
                    out[(str(kw), d_in, d_out, sp, fast)] = check_layer("mora", kw, "row", sp, d_in, d_out, fast, r)
                part = {}
                out[(str(kw), d_in, d_out, sp, "deferred")] = check_layer("mora", kw, "row", sp, d_in, d_out, True, r,
                                                                          defer=part)
                rh = mora_rank(d_in, d_out, r)
                rh -= rh % 2 if kw["mora_type"] == "rotation" else 0
                holds = rank * (d_in // tp) < blockdiag.geometry(rh, d_in, d_out).L  # used chunks: flat [0, L)
                partials[(str(kw), d_in, d_out, sp)] = (part.get("M"), holds)
    return out, partials


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_mora_blocks_on_merged_path(tp):
    """MoRA rotation / decouple on a row-parallel layer at TP=2/4, SP off and on: the merged-weight
    path is taken (no adapter left to its own forward, one weight build a step) and its output, input
    gradient and M gradient equal the dense float64 layer's, as the per-adapter path's do; with
    deferred TP gradients each rank's M gradient is a partial (zero on a shard holding no used chunk)
    whose sum over TP is M's gradient."""
    res = run_ranks(_row_block_cases, tp, [False, True], tp=tp)
    _assert_small([diffs for diffs, _ in res])
    empty = 0
    for rank, (_, partials) in enumerate(res):
        for case, (part, holds) in partials.items():
            assert part is not None, (rank, case)  # M's gradient was left to the caller's TP sum
            if holds:
                assert part > 0, (rank, case)
            else:
                empty += 1
                assert part == 0, (rank, case, part)
    assert empty >= (1 if tp == 2 else 2) * len(ROW_BLOCK_TYPES) * 2  # (96, 20): shards without a used chunk


def test_sm_carveout_only_beside_collectives(monkeypatch):
    """parallel.overlap_sm_carveout: the GEMMs inside `_beside_collective` run through cuBLASLt with the
    carveout, and both flags are restored after (the GEMMs outside keep all SMs); off (0) or without
    CUDA it touches neither. The CPU build has no cuBLASLt, so the library switch is recorded."""
    from mora_dist.parallel import overlap

    libs = []
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library",
                        lambda lib=None: libs.append(lib) or "cublas-before")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        overlap.set_sm_carveout(0)
        with overlap._beside_collective():
            assert torch._C._get_sm_carveout_experimental() is None
        assert libs == []
        overlap.set_sm_carveout(8)
        with overlap._beside_collective():
            assert torch._C._get_sm_carveout_experimental() == 8
            assert libs == [None, "cublaslt"]
        assert torch._C._get_sm_carveout_experimental() is None and libs[-1] == "cublas-before"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with overlap._beside_collective():
            assert torch._C._get_sm_carveout_experimental() is None
        assert len(libs) == 3
    finally:
        overlap.set_sm_carveout(0)


def _transports(rank):
    """parallel.tp_transport resolved on a 2-rank gloo TP group (no GPU): auto falls back to NCCL's
    path, copy_engine is refused with the reason, and the choice is what the exchanges then use."""
    from megatron.core import parallel_state as ps

    from mora_dist.parallel import overlap

    group = ps.get_tensor_model_parallel_group()
    out = {"auto": overlap.choose_transport("auto", group), "nccl": overlap.choose_transport("nccl", group)}
    for bad in ("copy_engine", "fast"):
        try:
            overlap.choose_transport(bad, group)
            out[bad] = "accepted"
        except ValueError as e:
            out[bad] = str(e)
    out["now"] = overlap._transport
    return out


def test_tp_transport_auto_falls_back_without_gpus():
    for res in run_ranks(_transports, 2, tp=2):
        assert res["auto"] == res["nccl"] == res["now"] == "nccl"
        assert res["copy_engine"] == ("parallel.tp_transport: copy_engine cannot serve this run (no CUDA GPU is "
                                      "visible); set parallel.tp_transport=auto or nccl")
        assert res["fast"].startswith("parallel.tp_transport must be one of auto, nccl, copy_engine, got 'fast'")
