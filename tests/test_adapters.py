"""Adapters on an unsharded layer against dense float64 references (tests/reference.py)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import reference as ref
from mora_dist.adapters import AdapterConfig, Shard, build_adapter, mora_rank
from mora_dist.adapters.vera import shared_projections

D = torch.float64
VARIANTS = [
    ("lora", {}), ("lora", {"rslora": True}),
    ("mora", {"mora_type": "sharing"}), ("mora", {"mora_type": "type2"}), ("mora", {"mora_type": "type3"}),
    ("mora", {"mora_type": "type4"}), ("mora", {"mora_type": "rotation"}), ("mora", {"mora_type": "decouple"}),
    ("mora", {"mora_type": "truncation"}), ("vera", {}),
]
# (d_in, d_out, r): non-divisible unequal shapes; d_out < rh; d_in < rh with padding > d_in; divisible;
# rh = 36 (MoRA block types batch 2 chunks per aligned superblock, blockdiag.py): tiled output with a
# wrapped input, and a cut output reading 3 of 7 chunks
SHAPES = [(44, 68, 3), (68, 44, 3), (40, 12, 4), (10, 70, 3), (36, 36, 4), (120, 204, 4), (250, 74, 4)]


def random_params(adapter, gen):
    """Non-zero values for every trainable (zero-initialised B/M/b would hide most of the math)."""
    return {n: torch.randn(p.shape, generator=gen, dtype=D) * 0.3 for n, p in adapter.named_parameters()}


def dense_dw(method, cfg, adapter, params, d_in, d_out):
    if method == "lora":
        scale = 1.0 if cfg.allora_eta else cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)  # ALLoRA: no scaling
        return ref.lora_dw(params["A"], params["B"], scale)
    if method == "vera":
        A, B = shared_projections(cfg.seed, cfg.r, d_in, d_out)
        return ref.vera_dw(A[:, :d_in], B[:d_out], params["d"], params["b"])
    t = {"sharing": 1, "type2": 2, "type3": 3, "type4": 4, "rotation": 6}.get(cfg.mora_type, cfg.mora_type)
    return ref.mora_dw(params["M"], d_in, d_out, t)


@pytest.mark.parametrize("d_in,d_out,r", SHAPES)
@pytest.mark.parametrize("method,kw", VARIANTS, ids=[f"{m}-{k.get('mora_type', k)}" for m, k in VARIANTS])
def test_forward_grads_delta_match_dense_reference(method, kw, d_in, d_out, r):
    cfg = AdapterConfig(method=method, r=r, **kw)
    adapter = build_adapter(cfg, Shard(d_in, d_out)).to(D)
    if kw.get("mora_type") == "rotation":  # rotation needs an even side: odd rh rounds down
        assert adapter.rh == mora_rank(d_in, d_out, r) // 2 * 2
    gen = torch.Generator().manual_seed(d_in * 1000 + d_out)
    params = random_params(adapter, gen)
    adapter.load_full_(params)
    ref_params = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    x = torch.randn(3, 5, d_in, generator=gen, dtype=D, requires_grad=True)
    g = torch.randn(3, 5, d_out, generator=gen, dtype=D)

    out = adapter(x)
    (out * g).sum().backward()

    xr = x.detach().clone().requires_grad_(True)
    dw = dense_dw(method, cfg, adapter, ref_params, d_in, d_out)
    yr = xr @ dw.t()
    (yr * g).sum().backward()

    torch.testing.assert_close(out, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    for n, p in adapter.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-10, atol=1e-10, msg=f"grad of {n}")
    torch.testing.assert_close(adapter.delta_weight(), dw.detach(), rtol=1e-10, atol=1e-10)


def test_mora_param_count_matches_lora():
    for d_in, d_out, r in [(2048, 2048, 8), (2048, 5632, 8), (5632, 2048, 8), (2048, 256, 8), (44, 68, 3)]:
        lora = r * (d_in + d_out)
        rh = mora_rank(d_in, d_out, r)
        n = sum(p.numel() for p in build_adapter(AdapterConfig("mora", r=r), Shard(d_in, d_out)).parameters())
        assert n == rh * rh
        # rh is sqrt(lora) rounded to the nearest integer: |rh^2 - lora| <= rh
        assert abs(n - lora) <= rh, (d_in, d_out, n, lora)


def test_vera_param_count_and_init():
    a = build_adapter(AdapterConfig("vera", r=256), Shard(2048, 5632), d_in_max=5632, d_out_max=5632)
    assert sum(p.numel() for p in a.parameters()) == 5632 + 256
    assert torch.all(a.d == 0.1) and torch.all(a.b == 0)


def test_vera_projections_equal_peft():
    """Same seed and max shapes -> the same frozen A/B as PEFT draws (its projection_prng_key)."""
    from peft.tuners.vera.model import _kaiming_init

    A, B = shared_projections(7, 16, 48, 80)
    g = torch.Generator(device="cpu").manual_seed(7)
    torch.testing.assert_close(A, _kaiming_init((16, 48), generator=g), rtol=0, atol=0)
    torch.testing.assert_close(B, _kaiming_init((80, 16), generator=g), rtol=0, atol=0)


def test_lora_init_and_zero_start():
    for cfg in [AdapterConfig("lora", r=4), AdapterConfig("mora", r=4), AdapterConfig("vera", r=4)]:
        a = build_adapter(cfg, Shard(20, 30))
        assert torch.count_nonzero(a.delta_weight()) == 0  # every method starts as the identity update
    a = build_adapter(AdapterConfig("lora", r=4), Shard(20, 30))
    bound = 1 / math.sqrt(20)  # kaiming-uniform a=sqrt(5), as nn.Linear
    assert a.A.abs().max() <= bound and a.A.abs().max() > 0.8 * bound


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="dora"), "unknown method 'dora'"),
    (dict(r=0), "positive integer, got 0"),
    (dict(r=-3), "got -3"),
    (dict(method="mora", mora_type="spiral"), "unknown MoRA type 'spiral'"),
])
def test_bad_config_names_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)


def test_rotation_rejects_explicit_odd_rank():
    from mora_dist.adapters.mora import MoRA

    with pytest.raises(ValueError, match="even rh, got rh=11"):
        MoRA(AdapterConfig("mora", r=2, mora_type="rotation"), Shard(32, 32), rh=11)


def _rotation_tables(geo):
    """MoRA rotation's (cos, sin) tables for this geometry, float64, as the adapter hands them to
    the merged path (`MoRA.block_operator`)."""
    adapter = build_adapter(AdapterConfig("mora", r=1, mora_type="rotation"), Shard(geo.d_in, geo.d_out), rh=geo.rh)
    return adapter.double().block_operator()[2]


def _dense_block_update(geo, M, rot):
    """The block adapter's [d_out, d_in] update from the independent reference (tests/reference.py):
    rotation when the tables are given, else decouple."""
    return ref.mora_dw(M, geo.d_in, geo.d_out, 6 if rot is not None else "decouple")


@pytest.mark.integration
@pytest.mark.parametrize("d_in,d_out,rh,segs,n_out", [
    (120, 204, 36, ((0, 102, 0), (102, 204, 120)), 240),  # tiled rows in two groups
    (250, 74, 36, ((0, 74, 3),), 80),                       # 3 of 7 chunks reach the output, wrapped input
    (200, 90, 44, ((0, 30, 0), (30, 60, 40), (60, 90, 80)), 120),  # pieces start mid-chunk
    # chunk 4 wraps at column 8 < h = 24: rotation pairs split over its two items; 2 groups, 12-row tail
    (200, 300, 48, ((0, 150, 0), (150, 300, 160)), 320),
    # the kernel's 128 x 128 tiles (rh > 160) cut at 48; chunk 2 wraps at column 108 > h = 88, so its
    # second item only meets the tiles' partner halves
    (460, 600, 176, ((0, 600, 0),), 600),
    # one segment over 2.3 tiles of L = 132 (wrapped last chunk): g folded over the tiles first
    (90, 300, 44, ((0, 300, 5),), 310),
    # a TP shard's rows: flat rows from 70 on (mid-chunk, mid-tile) at layer row 3, folded with a shift
    (90, 300, 44, ((70, 300, 3),), 240),
    # folded where the new kernel serves (rh > 256, as the 8B gate / up): 1.5 tiles of L = 520
    (300, 800, 260, ((0, 800, 0),), 800),
    # and a TP shard's rows there (flat rows from 100 on at layer row 3: the fold's shift)
    (300, 1000, 260, ((100, 1000, 3),), 910),
])
def test_block_grads_many_tokens(d_in, d_out, rh, segs, n_out):
    """d loss / d M of MoRA block adapters (`blockdiag.block_grads`, rotation and decouple) over 300
    tokens against float64 autograd through the dense update. Under TRITON_INTERPRET=1
    (test_merged_layer_triton_kernels) the Triton kernels run: the one `grad_impl` picks (v9 here,
    rh <= 256) with its own tiling; the new kernel with tiles small enough that rh and h = rh/2 cut
    them and the tokens split into 4 ranges (the last one and a 16-token step partial), rotation
    both with pairs (a, a + h) in one tile and with contiguous column tiles (partner columns in a
    second partial), at rh 176 with its own 128 x 128 tiles in both rotation forms; v9 (rotation)
    with small tiles, 3 units of 64 tokens a program, units crossing items, the last one partial."""
    from mora_dist.adapters import blockdiag

    gen = torch.Generator().manual_seed(rh + d_in)
    geo = blockdiag.geometry(rh, d_in, d_out)
    T = 300
    g, x = torch.randn(T, n_out, generator=gen, dtype=D), torch.randn(T, d_in, generator=gen, dtype=D)
    rows = torch.cat([torch.arange(d0, d0 + f1 - f0) for f0, f1, d0 in segs])
    fold = blockdiag.folded(geo, segs)
    assert (fold is not None) == ((d_in, d_out, rh) in ((90, 300, 44), (300, 800, 260), (300, 1000, 260)))
    kern = blockdiag._kernels(x, geo)
    assert (kern is not None) == (os.environ.get("TRITON_INTERPRET") == "1")
    for rot in (_rotation_tables(geo), None):
        M = torch.randn(rh, rh, generator=gen, dtype=D, requires_grad=True)
        flat = torch.cat([torch.arange(f0, f1) for f0, f1, _ in segs])  # the adapter rows the segments hold
        ((x @ _dense_block_update(geo, M, rot)[flat].t()) * g[:, rows]).sum().backward()
        got = blockdiag.block_grads(g, x, [(geo, segs)], [M.detach()], [rot], [True])
        assert got[0].dtype == D
        torch.testing.assert_close(got[0], M.grad, rtol=1e-10, atol=1e-10)
        if kern is None or fold is not None:
            continue
        assert kern.grad_impl(rh) == "v9"  # what block_grads ran
        if rh > 64:  # the new kernel's own tiles, rotation in both forms
            cfgs = [dict(kern.grad_config(rh, 8), IMPL="new", PAIR=p) for p in (True, False)]
        else:
            cfgs = [dict(BI=16, BK=32, BT=16, TP=96, num_warps=4, num_stages=2, IMPL="new", PAIR=p) for p in (True, False)]
            cfgs += [dict(BI=16, BK=32, BT=32, TB=64, UPP=3, num_warps=4, num_stages=2, IMPL="v9")] if rot is not None else []
        for cfg in cfgs[1 if rot is None else 0:]:
            got = kern.block_grad(g, x, rot, blockdiag.items(geo, segs), rh, D, cfg)
            torch.testing.assert_close(got, M.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.integration
@pytest.mark.parametrize("d_in,d_out,rh,tp", [
    (44, 68, 18, 2),   # chunk 1 crosses the boundary, the wrapped last chunk is split over both shards, rows tiled
    (44, 68, 18, 4),   # shards narrower than a chunk: chunk 1 spans three of them
    (248, 74, 36, 4),  # 3 of 7 chunks reach the output: chunk 1 crosses, shards 2 and 3 hold no used chunk
    (64, 200, 16, 2),  # chunks aligned with the shards, rows tiled
])
def test_block_row_shards(d_in, d_out, rh, tp):
    """A row-parallel shard of MoRA block adapters (`blockdiag.geometry(..., cols)`, what
    `MoRA.block_operator` gives at TP > 1): each of tp shards' weight add equals the dense update's
    columns, and the shards' partial dM (zero where a shard holds no used chunk) sum to d loss / d M
    (float64 autograd through the dense update), rotation and decouple, adapter rows from layer row 3
    on. Under TRITON_INTERPRET=1 (test_merged_layer_triton_kernels) the Triton kernels run, the
    gradient by both implementations (cfg IMPL v9, and new with its default and contiguous columns) too."""
    from mora_dist.adapters import blockdiag

    gen = torch.Generator().manual_seed(rh + d_in)
    glob = blockdiag.geometry(rh, d_in, d_out)
    segs, n_out, T, n = ((0, d_out, 3),), d_out + 5, 50, d_in // tp
    g, x = torch.randn(T, n_out, generator=gen, dtype=D), torch.randn(T, d_in, generator=gen, dtype=D)
    empty = 0
    for rot in (_rotation_tables(glob), None):
        M = torch.randn(rh, rh, generator=gen, dtype=D, requires_grad=True)
        dw = _dense_block_update(glob, M, rot)
        ((x @ dw.t()) * g[:, 3:3 + d_out]).sum().backward()
        dM = torch.zeros(rh, rh, dtype=D)
        cfgs = {"v9": {"IMPL": "v9"}, "new": {"IMPL": "new"}, "new unpaired": {"IMPL": "new", "PAIR": False}}
        dM_impl = {k: torch.zeros(rh, rh, dtype=D) for k in cfgs}
        for r in range(tp):
            a, b = r * n, (r + 1) * n
            geo = blockdiag.geometry(rh, d_in, d_out, (a, b))
            empty += not blockdiag.items(geo, segs)
            kern = blockdiag._kernels(x, geo)
            assert (kern is not None) == (os.environ.get("TRITON_INTERPRET") == "1")
            W0 = torch.randn(n_out, b - a, generator=gen, dtype=D)
            W = W0.clone()
            blockdiag.add_blocks_(W, [(geo, segs)], [M.detach()], [rot])
            torch.testing.assert_close(W[3:3 + d_out] - W0[3:3 + d_out], dw.detach()[:, a:b], rtol=1e-12, atol=1e-12)
            assert torch.equal(W[:3], W0[:3]) and torch.equal(W[3 + d_out:], W0[3 + d_out:])
            part = blockdiag.block_grads(g, x[:, a:b].contiguous(), [(geo, segs)], [M.detach()], [rot], [True])[0]
            assert part.dtype == D and (part.abs().max() == 0) == (not blockdiag.items(geo, segs))
            dM += part
            for k in cfgs if kern is not None and blockdiag.items(geo, segs) else ():
                dM_impl[k] += kern.block_grad(g, x[:, a:b].contiguous(), rot, blockdiag.items(geo, segs), rh, D, cfgs[k])
        torch.testing.assert_close(dM, M.grad, rtol=1e-10, atol=1e-10)
        for k in cfgs if kern is not None else ():
            torch.testing.assert_close(dM_impl[k], M.grad, rtol=1e-10, atol=1e-10, msg=k)
    assert empty == (4 if d_in == 248 else 0)


@pytest.mark.integration
@pytest.mark.parametrize("d_in,shapes", [
    (120, [(204, 36, 2), (40, 16, 1)]),  # tiled rows over 2 groups + a cut adapter (like q and k)
    (250, [(74, 36, 1)]),                # 3 of 7 chunks reach the output (like down)
    (64, [(64, 16, 4), (64, 16, 1)]),    # aligned chunks, 4 groups
    (200, [(90, 44, 3), (30, 20, 3)]),   # rh = 44: 2 chunks a superblock, pieces start mid-chunk
])
def test_merged_layer_matches_dense(d_in, shapes):
    """The merged-weight path (mora_dist/parallel/merged.py) of a layer holding MoRA block adapters,
    each adapter's rows split into G groups interleaved in a wider output (as q/k/v in megatron's
    fused qkv layer), plus two factor adapters in a per-group gap (a trainable P with a matrix mid and
    ALLoRA row coefficients c; a frozen P with a vector mid); the first block adapter with ALLoRA c
    too. Block adapters rotate (the adapter's RoPE tables), the second one is decouple (R_c = I)
    where there are two. Against float64 dense references built independently: y = x (W0 + sum dW)^T,
    block dW from tests/reference.py (block_diag of M R_c, rows read mod L, input columns mod
    d_in); parameter gradients from the output gradient scaled by c on each
    adapter's rows, the input gradient from the plain one."""
    from mora_dist.adapters import blockdiag
    from mora_dist.parallel import merged

    gen = torch.Generator().manual_seed(d_in)
    T, gap, k = 6, 4, 3
    widths = [d_out // G for d_out, _, G in shapes]
    stride = sum(widths) + gap  # the factor adapter's rows close each group
    G = shapes[0][2]
    assert all(sh[2] in (1, G) for sh in shapes)
    n_out = G * stride
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=D) * 0.3  # noqa: E731
    blocks, Ms, cols = [], [], []
    off = 0
    for i, ((d_out, rh, g), w) in enumerate(zip(shapes, widths)):
        geo = blockdiag.geometry(rh, d_in, d_out)
        segs = ((0, d_out, off),) if g == 1 else tuple((j * w, (j + 1) * w, off + j * stride) for j in range(g))
        c = torch.rand(d_out, generator=gen, dtype=D) + 0.5 if i == 0 else None
        rot = None if i == 1 else _rotation_tables(geo)
        blocks.append(merged.Block((geo, segs), c, rot))
        Ms.append(rnd(rh, rh).requires_grad_(True))
        cols.append(torch.cat([torch.arange(d0, d0 + f1 - f0) for f0, f1, d0 in segs]))
        off += w
    w2 = gap // 2
    pos = [(off + o + stride * torch.arange(G)[:, None] + torch.arange(w2)[None, :]).reshape(-1) for o in (0, w2)]
    P, mid, Q = (rnd(*sh).requires_grad_(True) for sh in ((k, d_in), (k, k), (G * w2, k)))
    P2, mid2, Q2 = rnd(k + 1, d_in), rnd(k + 1).requires_grad_(True), rnd(G * w2, k + 1).requires_grad_(True)
    c_f = torch.rand(G * w2, generator=gen, dtype=D) + 0.5
    terms = (merged.Term(merged.RowBlocks(G, stride, off, w2, pos[0]), 0, c_f),
             merged.Term(merged.RowBlocks(G, stride, off + w2, w2, pos[1]), 1, None))
    W0 = rnd(n_out, d_in)
    x = rnd(T, d_in).requires_grad_(True)
    gout = torch.randn(T, n_out, generator=gen, dtype=D)
    plan = merged.Plan(2, terms, tuple(blocks))
    if os.environ.get("TRITON_INTERPRET") == "1":  # test_merged_layer_triton_kernels: the kernels must serve
        assert all(blockdiag._kernels(x, b.plan[0]) is not None for b in blocks)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the one-pass factor build (kernels/build.py) too
        assert merged._kernel_build(W0) is not None
    out = merged.MergedLinear.apply(x, W0, None, plan, P, P2, mid, Q, mid2, Q2, *Ms)
    (out * gout).sum().backward()
    # the weight built once for the step (inject.fixed_adapters) and passed in: the same output
    W = merged.build_weight(W0, plan, [P, P2, mid, Q, mid2, Q2, *Ms])
    torch.testing.assert_close(merged.MergedLinear.apply(x.detach(), W0, W, plan, P, P2, mid, Q, mid2, Q2, *Ms),
                               out.detach(), rtol=1e-12, atol=1e-12)

    params = [P, mid, Q, mid2, Q2, *Ms]
    refs = [t.detach().clone().requires_grad_(True) for t in params]
    xr = x.detach().clone().requires_grad_(True)
    Pr, Mr, Qr, M2r, Q2r = refs[:5]
    parts = [(Qr @ Mr @ Pr, pos[0], c_f), (Q2r @ (M2r[:, None] * P2), pos[1], None)]  # (dW rows, layer rows, c)
    for blk, M, c in zip(blocks, refs[5:], cols):
        parts.append((_dense_block_update(blk.plan[0], M, blk.rot), c, blk.c))
    Weff = W0.clone()
    for dw, rows, _ in parts:
        Weff = Weff.index_add(0, rows, dw)
    yr = xr @ Weff.t()
    xr.grad, = torch.autograd.grad((yr * gout).sum(), xr)
    sum(((x.detach() @ dw.t()) * gout[:, rows] * (1 if c is None else c)).sum() for dw, rows, c in parts).backward()
    torch.testing.assert_close(out, yr, rtol=1e-10, atol=1e-10)
    for got, want in [(x.grad, xr.grad)] + [(t.grad, r.grad) for t, r in zip(params, refs)]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,d,k", [(70, 50, 3), (130, 90, 40), (16, 300, 17)])
def test_factor_build_matches_float64(n, d, k):
    """W = W0 + Q R (merged._build's one product over all factor terms) against float64 addmm, into a
    new tensor and into a given buffer (a layer's step buffer). Under TRITON_INTERPRET=1
    (test_merged_layer_triton_kernels) the one-pass Triton kernel (kernels/build.py) computes it,
    with K = 40 spanning several K blocks and shapes that cut every tile."""
    from mora_dist.parallel import merged

    gen = torch.Generator().manual_seed(n + d + k)
    W0, Q, P = (torch.randn(*sh, generator=gen, dtype=D) for sh in ((n, d), (n, k), (k, d)))
    plan = merged.Plan(1, (merged.Term(merged.RowRange(0, n), 0, None),), ())
    assert (merged._kernel_build(W0) is not None) == (os.environ.get("TRITON_INTERPRET") == "1")
    want = W0 + Q @ P
    torch.testing.assert_close(merged.build_weight(W0, plan, [P, None, Q]), want, rtol=1e-12, atol=1e-12)
    buf = torch.full_like(W0, float("nan"))
    got = merged.build_weight(W0, plan, [P, None, Q], out=buf)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["groups", "range", "range+product"])
def test_sharing_build_matches_float64(layout, monkeypatch):
    """MoRA sharing's weight build (merged._build; on the GPU `kernels/build.tile_add`, M read at row and
    column mod rh, no product) against W0 plus tests/reference.py's dense update (the authors' definition),
    d_in = 50 wrapping both adapters' strided compress (rh 12 and 11, padded to 16), into a new tensor and a
    NaN-filled step buffer. "groups": q- and k-like adapters interleaved per query group over every layer row
    (k's tiles cross the groups), one pass from W0; "range": a sharing adapter's rows from layer row 3, the
    other rows W0's; "range+product": and a LoRA-like term after them (the product). Under TRITON_INTERPRET=1
    (test_merged_layer_triton_kernels) the kernel must serve every sharing term."""
    from mora_dist.kernels import build
    from mora_dist.parallel import merged

    gen = torch.Generator().manual_seed(11)
    d_in, G = 50, 2
    adapters = [build_adapter(AdapterConfig("mora", r=2, mora_type="sharing"), Shard(d_in, d_out)) for d_out in (24, 8)]
    if layout != "groups":
        adapters = adapters[:1]
    facs, dws = [], []
    for a in adapters:
        with torch.no_grad():
            a.M.copy_(torch.randn(a.M.shape, generator=gen, dtype=D))
        facs.append(a.factors(D))
        dws.append(ref.mora_dw(a.M.detach(), d_in, a.shard.d_out, 1))
    assert [f.p_tile for f in facs] == [f.q_tile for f in facs] == [a.rh for a in adapters][:len(facs)]
    ts = [f.P for f in facs] + [v for f in facs for v in (f.mid, f.Q)]
    if layout == "groups":
        ws = [a.shard.d_out // G for a in adapters]
        stride = sum(ws)
        n_out, offs = G * stride, [0, ws[0]]
        pos = [(o + stride * torch.arange(G)[:, None] + torch.arange(w)[None, :]).reshape(-1) for o, w in zip(offs, ws)]
        terms = [merged.Term(merged.RowBlocks(G, stride, o, w, p), i, None, f.q_tile)
                 for i, (o, w, p, f) in enumerate(zip(offs, ws, pos, facs))]
        p_tiles = tuple(f.p_tile for f in facs)
    else:
        n_out, d_out = 34, adapters[0].shard.d_out
        pos = [torch.arange(3, 3 + d_out), torch.arange(3 + d_out, 3 + d_out + 5)]
        Pl, Ql = torch.randn(3, d_in, generator=gen, dtype=D), torch.randn(5, 3, generator=gen, dtype=D)
        terms = [merged.Term(merged.RowRange(3, 3 + d_out), 0, None, facs[0].q_tile),
                 merged.Term(merged.RowRange(3 + d_out, 3 + d_out + 5), 1, None)]
        ts = [facs[0].P, Pl, facs[0].mid, facs[0].Q, None, Ql]
        dws.append(Ql @ Pl)
        p_tiles = (facs[0].p_tile, None)
        if layout == "range":
            terms, ts, p_tiles, pos, dws = terms[:1], ts[:1] + ts[2:4], p_tiles[:1], pos[:1], dws[:1]
    plan = merged.Plan(len(p_tiles), tuple(terms), (), p_tiles)
    W0 = torch.randn(n_out, d_in, generator=gen, dtype=D)
    want = W0.clone()
    for p, dw in zip(pos, dws):
        want[p] += dw
    calls = []
    monkeypatch.setattr(build, "tile_add", lambda *a, _f=build.tile_add: calls.append(1) or _f(*a))
    torch.testing.assert_close(merged.build_weight(W0, plan, ts), want, rtol=1e-12, atol=1e-12)
    buf = torch.full_like(W0, float("nan"))
    assert merged.build_weight(W0, plan, ts, out=buf).data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, want, rtol=1e-12, atol=1e-12)
    assert len(calls) == (2 * len(facs) if os.environ.get("TRITON_INTERPRET") == "1" else 0)


@pytest.mark.parametrize("T,rows", [
    (70, "ranges"),   # gate/up: two LoRA terms over row ranges of one output, ALLoRA c on the second
    (300, "groups"),  # q/k/v: terms interleaved per query group (megatron's fused qkv)
])
def test_factor_grads_lora_terms(T, rows, monkeypatch):
    """The gradients of LoRA-like factor terms (P and Q both train, mid None) through MergedLinear against
    float64 autograd through the dense update, input gradient included, with g a strided view (a row-parallel
    layer's gathered gradient is one). Under TRITON_INTERPRET=1 (test_merged_layer_triton_kernels) g Q and
    g^T H come from one pass over g (kernels/dualmm.py), checked also alone with small tiles (several
    row blocks and D ranges) against float64 products."""
    from mora_dist.parallel import merged

    gen = torch.Generator().manual_seed(T)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=D) * 0.3  # noqa: E731
    d_in, ks = 52, (8, 5, 3)
    if rows == "ranges":
        n_out, spans = 90, [(0, 40), (40, 90)]
        sel = [torch.arange(a, b) for a, b in spans]
        terms = tuple(merged.Term(merged.RowRange(a, b), i, None) for i, (a, b) in enumerate(spans))
        c = [None, torch.rand(50, generator=gen, dtype=D) + 0.5]
    else:  # 2 groups of (q 6, k 2, v 2) rows
        G, widths = 2, (6, 2, 2)
        n_out, stride = G * sum(widths), sum(widths)
        offs = [0, 6, 8]
        sel = [(o + stride * torch.arange(G)[:, None] + torch.arange(w)[None, :]).reshape(-1)
               for o, w in zip(offs, widths)]
        terms = tuple(merged.Term(merged.RowBlocks(G, stride, o, w, p), i, None)
                      for i, (o, w, p) in enumerate(zip(offs, widths, sel)))
        c = [None, torch.rand(len(sel[1]), generator=gen, dtype=D) + 0.5, None]
    terms = tuple(t._replace(c=ci) for t, ci in zip(terms, c))
    Ps = [rnd(ks[i], d_in).requires_grad_(True) for i in range(len(terms))]
    Qs = [rnd(len(sel[i]), ks[i]).requires_grad_(True) for i in range(len(terms))]
    W0, x = rnd(n_out, d_in), rnd(T, d_in).requires_grad_(True)
    gout = torch.randn(T, n_out + 3, generator=gen, dtype=D)[:, 2:n_out + 2]
    plan = merged.Plan(len(terms), terms, ())
    ts = [*Ps] + [v for Q in Qs for v in (None, Q)]
    dual = merged._dual_kernel(gout)
    assert (dual is not None) == (os.environ.get("TRITON_INTERPRET") == "1")
    for cfg in [(32, 16, 4, 1), (64, 32, 4, 2), (16, 64, 4, 1)] if dual else ():
        A, B = rnd(n_out, 5), rnd(T, 3)
        got_a, got_b = dual.dual_mm(gout, A, B, cfg)
        torch.testing.assert_close(got_a, gout @ A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_b, gout.t() @ B, rtol=1e-12, atol=1e-12)
    passes = []
    if dual:  # the backward below must take the one pass
        monkeypatch.setattr(dual, "dual_mm", lambda *a, _f=dual.dual_mm: passes.append(1) or _f(*a))
    y = merged.MergedLinear.apply(x, W0, None, plan, *ts)
    (y * gout).sum().backward()
    assert len(passes) == (1 if dual else 0)

    refs = [t.detach().clone().requires_grad_(True) for t in Ps + Qs]
    xr = x.detach().clone().requires_grad_(True)
    W = W0.clone()
    for i, s_ in enumerate(sel):
        W = W.index_add(0, s_, refs[len(Ps) + i] @ refs[i])
    yr = xr @ W.t()
    xr.grad, = torch.autograd.grad((yr * gout).sum(), xr)
    # ALLoRA: the parameters see each term's rows of the output gradient scaled by its c
    sum(((x.detach() @ (refs[len(Ps) + i] @ refs[i]).t()) * gout[:, s_] * (1 if ci is None else ci)).sum()
        for i, (s_, ci) in enumerate(zip(sel, c))).backward()
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for got, want in [(x.grad, xr.grad)] + [(t.grad, r.grad) for t, r in zip(Ps + Qs, refs)]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.integration
def test_merged_layer_triton_kernels():
    """test_merged_layer_matches_dense, test_block_grads_many_tokens, test_block_row_shards,
    test_factor_build_matches_float64, test_sharing_build_matches_float64 and test_factor_grads_lora_terms with
    the factor builds (kernels/build.py),
    the factor gradients' pass over g (kernels/dualmm.py) and MoRA blocks'
    weight add and M gradient done by the Triton kernels (mora_dist/kernels/blockdiag.py, what a
    GPU runs), executed by Triton's interpreter on the CPU in float64 (TRITON_INTERPRET=1 must be
    set before triton is imported: a subprocess)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_merged_layer_matches_dense", f"{__file__}::test_block_grads_many_tokens",
                        f"{__file__}::test_block_row_shards", f"{__file__}::test_factor_build_matches_float64",
                        f"{__file__}::test_sharing_build_matches_float64", f"{__file__}::test_factor_grads_lora_terms"],
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "25 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("n_out,n,width,shift", [(70, 12, 16, 0), (48, 12, 12, 0), (5, 8, 8, 0), (70, 12, 16, 7),
                                                 (300, 132, 132, 70)])
def test_tile_sum_is_the_decompress_product(n_out, n, width, shift, monkeypatch):
    """tiles.tile_sum(g, n, width, shift=s) = g Q for MoRA's tile decompress Q[j, p] = [p == (j + s) mod n]
    (padded to `width` zero columns), which replaces that GEMM in the merged path's M gradient (s: a
    shard's rows from flat position s on, the block types' fold); float64 exact, bf16 within one
    rounding of the float64 product. Under TRITON_INTERPRET=1 (test_tile_sum_kernel) the kernel runs."""
    from mora_dist.adapters import tiles

    assert (tiles._kernel(torch.zeros(2, 2)) is not None) == (os.environ.get("TRITON_INTERPRET") == "1")
    gen = torch.Generator().manual_seed(n_out)
    g = torch.randn(33, n_out + 3, generator=gen, dtype=D)[:, 2:2 + n_out]  # a column slice, as the callers pass
    Q = torch.zeros(n_out, width, dtype=D)
    Q[torch.arange(n_out), (torch.arange(n_out) + shift) % n] = 1.0
    torch.testing.assert_close(tiles.tile_sum(g, n, width, shift=shift), g @ Q, rtol=1e-12, atol=1e-12)
    if tiles._kernel(g) is not None:  # the kernel's loop with 3 column blocks a step (past the last one masked)
        monkeypatch.setattr("mora_dist.kernels.tilesum.UNROLL", 3)
        torch.testing.assert_close(tiles.tile_sum(g, n, width, shift=shift), g @ Q, rtol=1e-12, atol=1e-12)
    got = tiles.tile_sum(g.bfloat16(), n, width, shift=shift)
    assert got.dtype == torch.bfloat16
    # one rounding of the fp32 sum (the interpreter's cast truncates: two ulps there)
    torch.testing.assert_close(got.double(), g.bfloat16().double() @ Q, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("d_in,n,width", [(50, 12, 16), (48, 12, 12), (12, 12, 16), (300, 256, 256)])
def test_wrapped_tile_sum_is_the_strided_compress(d_in, n, width, monkeypatch):
    """tiles.tile_sum(x, n, width, wrap=True) = x P^T for MoRA's strided compress, built here
    from its definition: x' = x padded to a multiple of n with its own first columns, slot s sums
    x'[c n + s] over c (zero rows beyond n)."""
    from mora_dist.adapters import tiles

    gen = torch.Generator().manual_seed(d_in)
    x = torch.randn(21, d_in, generator=gen, dtype=D)
    L = -(-d_in // n) * n
    P = torch.zeros(width, d_in, dtype=D)
    for p in range(L):
        P[p % n, p % d_in] += 1.0
    torch.testing.assert_close(tiles.tile_sum(x, n, width, wrap=True), x @ P.t(), rtol=1e-12, atol=1e-12)
    if tiles._kernel(x) is not None:  # 3 column blocks a loop step: none past the last may wrap
        monkeypatch.setattr("mora_dist.kernels.tilesum.UNROLL", 3)
        torch.testing.assert_close(tiles.tile_sum(x, n, width, wrap=True), x @ P.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("G,w,n,gap", [(4, 6, 4, 3), (2, 12, 12, 5), (3, 5, 7, 2)])
def test_tiled_decompress_in_interleaved_rows(G, w, n, gap, monkeypatch):
    """A factor term whose Q is MoRA's frozen tile map (Q[j, s] = [s == j mod n], q_tile = n) on rows
    interleaved with the layer's other rows (merged.RowBlocks: q/k/v in the fused qkv layer), only
    mid training (MoRA sharing): the merged path takes g Q as block sums of each group's rows
    (tiles.tile_sum_groups, groups cutting the tiles when n does not divide w); output, input and mid
    gradients against float64 autograd through the dense update."""
    from mora_dist.adapters import tiles
    from mora_dist.parallel import merged

    gen = torch.Generator().manual_seed(G * w + n)
    d_in, T, stride = 9, 11, w + gap
    assert (tiles._kernel(torch.zeros(2, 2)) is not None) == (os.environ.get("TRITON_INTERPRET") == "1")
    pos = (1 + stride * torch.arange(G)[:, None] + torch.arange(w)[None, :]).reshape(-1)
    rows = merged.RowBlocks(G, stride, 1, w, pos)
    Q = torch.zeros(G * w, n, dtype=D)
    Q[torch.arange(G * w), torch.arange(G * w) % n] = 1.0
    P = torch.randn(n, d_in, generator=gen, dtype=D)
    mid = torch.randn(n, n, generator=gen, dtype=D, requires_grad=True)
    W0 = torch.randn(G * stride, d_in, generator=gen, dtype=D)
    x = torch.randn(T, d_in, generator=gen, dtype=D, requires_grad=True)
    gout = torch.randn(T, G * stride, generator=gen, dtype=D)
    plan = merged.Plan(1, (merged.Term(rows, 0, None, n),), ())
    sums = []  # the block sums serve the term (no GEMM over g)
    monkeypatch.setattr(merged, "tile_sum_groups", lambda *a, **k: sums.append(a[1]) or tiles.tile_sum_groups(*a, **k))
    y = merged.MergedLinear.apply(x, W0, None, plan, P, mid, Q)
    (y * gout).sum().backward()
    assert sums == [[(1 + j * stride, w) for j in range(G)]]
    midr, xr = mid.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    yr = (xr @ W0.t()).index_add(1, pos, xr @ (Q @ midr @ P).t())
    (yr * gout).sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mid.grad, midr.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.integration
def test_tile_sum_kernel():
    """The three tile-sum tests with the Triton kernel (kernels/tilesum.py, what a GPU runs) executed by
    Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before triton is imported)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_tile_sum_is_the_decompress_product",
                        f"{__file__}::test_wrapped_tile_sum_is_the_strided_compress",
                        f"{__file__}::test_tiled_decompress_in_interleaved_rows"],
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "12 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("mora_type", ["sharing", "type2", "type3", "type4"])
@pytest.mark.parametrize("d_in,d_out", [(50, 70), (64, 40), (40, 64)])
def test_mora_tile_hints_match_its_factors(mora_type, d_in, d_out):
    """Factors.p_tile / q_tile claim MoRA's compress P / decompress Q are tile maps; where set, the
    block sums the merged path uses in their place equal the products with P and Q themselves."""
    from mora_dist.adapters.tiles import tile_sum

    a = build_adapter(AdapterConfig("mora", r=2, mora_type=mora_type), Shard(d_in, d_out))
    fac = a.factors(D)
    gen = torch.Generator().manual_seed(d_in * d_out)
    x, g = torch.randn(9, d_in, generator=gen, dtype=D), torch.randn(9, d_out, generator=gen, dtype=D)
    strided, tile = mora_type in ("sharing", "type4"), mora_type in ("sharing", "type3")
    assert (fac.p_tile is not None) == strided and (fac.q_tile is not None) == tile
    if fac.p_tile:
        torch.testing.assert_close(tile_sum(x, fac.p_tile, fac.P.shape[0], wrap=True), x @ fac.P.t(),
                                   rtol=1e-12, atol=1e-12)
    if fac.q_tile:
        torch.testing.assert_close(tile_sum(g, fac.q_tile, fac.Q.shape[1]), g @ fac.Q, rtol=1e-12, atol=1e-12)
