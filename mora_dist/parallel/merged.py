"""The merged-weight path of a layer's local shard: y = x (W0 + sum_i dW_i)^T as one GEMM.

Why (docs/performance.md): adding each adapter's update to the base output costs passes over the
layer's activations in both directions (LoRA: x @ A^T, a read-modify-write of the output, an
input-gradient GEMM and its accumulation into dx; MoRA rotation: block GEMMs over every chunk
and output tile). A layer's weight is far smaller than its activations (1.1B model, 8,192 tokens
a step: linear_fc1's weight holds 23M values, its output 92M), so the layer builds its effective
weight once a step, W = W0 + dW, and the forward and the input gradient cost exactly what the
frozen base costs. The parameter gradients come from (g, x) without the dense g^T x:

- factor adapters (`Factors`, delta = mid(x P^T) Q^T, dW = Q mid P): H = x P^T for the layer's
  distinct P (one GEMM), E = g^T H for Q's and mid's gradients, g Q only where P trains (LoRA),
  formulas in `_factor_grads`; ALLoRA scales the output gradient's rows by c for the parameters
  only (x gets the plain one);
- MoRA block types (rotation, decouple): `blockdiag.block_grads`, M's gradient from the
  block-diagonal part of g^T x' (one Triton pass over g and x per adapter on the GPU).

Precision: W0 + dW is rounded once to W0's dtype (addmm/add accumulate in fp32), as the bf16
weights of mixed-precision full fine-tuning are; dW's gradients and the fp32 masters are exact.
W is kept for the backward: one extra copy of the adapted weights at peak memory. The adapters do
not change between an optimizer step's micro-batches, so inside `inject.fixed_adapters` (the
Trainer's step, evaluation, the bench) each layer builds W once into a step buffer and every
micro-batch reads it: one build a step instead of one a micro-batch (17 ms each at the 8B shape),
and one copy of W however many micro-batches are in flight (PP).

TP: the same Function serves a rank's shard (wrappers.py gives it the local weight, the local
factors and the gathered input of a column shard); replicated trainables arrive through
`Adapter.merged_param`, whose backward sums their partial gradients over TP.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import torch

from mora_dist.adapters import blockdiag
from mora_dist.adapters.base import Factors
from mora_dist.adapters.tiles import tile_sum, tile_sum_groups
from mora_dist.kernels import interpreted, kernel_for
from mora_dist.parallel import overlap


class RowRange(NamedTuple):
    """An adapter's rows of the layer's output as one slice [start, end)."""
    start: int
    end: int


class RowBlocks(NamedTuple):
    """Rows off + stride * g + i (g < G, i < w), G * stride = the layer's rows: one block per query
    group (q/k/v in the fused linear_qkv); `pos` lists them (read here by index, like `RowIndex`)."""
    G: int
    stride: int
    off: int
    w: int
    pos: torch.Tensor


class RowIndex(NamedTuple):
    """Any other rows, by index."""
    pos: torch.Tensor


class Term(NamedTuple):
    """A factor adapter: its rows in the layer's output (RowRange | RowBlocks | RowIndex, made by
    `wrappers._row_blocks`), the index of its P among the layer's distinct P, ALLoRA's row
    coefficients c (None without ALLoRA) and `Factors.q_tile`."""
    rows: tuple
    slot: int
    c: Optional[torch.Tensor]
    q_tile: Optional[int] = None


class Block(NamedTuple):
    """A MoRA block adapter: (geometry, segments) for `blockdiag`, ALLoRA's c (None without), the
    rotation tables (cos, sin) [n_used, rh] in M's dtype (None: decouple)."""
    plan: tuple
    c: Optional[torch.Tensor]
    rot: Optional[tuple] = None


class Plan(NamedTuple):
    """The layer's adapters. The Function's tensors are the n_p distinct P, then (mid, Q) per term,
    then M per block. `p_tiles`: `Factors.p_tile` of each distinct P (empty: none). `accs` (empty: none):
    one per tensor, an fp32 buffer the backward adds that tensor's gradient into instead of returning it
    (None: returned), the step's gradient accumulation of `AdaptedLinear.begin_fixed`; the Function's
    tensors then end with an anchor, a leaf that requires grad so the backward runs (its gradient: None)."""
    n_p: int
    terms: tuple
    blocks: tuple
    p_tiles: tuple = ()
    accs: tuple = ()


@torch.no_grad()
def factor_row_coefficients(fac: Factors, eta: float, tp_group=None) -> torch.Tensor:
    """ALLoRA's c_i = 1/sqrt(||dW_i|| + 1/eta^2) from the factors, dW = Q mid P, through the small
    Gram matrix mid P P^T mid^T (never the dense d_out x d_in update). `tp_group`: a row-parallel
    shard's group, over which the squared row norms (partial over input columns) are summed."""
    P, Q = fac.P.float(), fac.Q.float()
    G = P @ P.t()
    if fac.mid is not None:
        m = fac.mid.float()
        G = m[:, None] * G * m[None, :] if m.dim() == 1 else m @ G @ m.t()
    sq = ((Q @ G) * Q).sum(1).clamp_min(0)
    if tp_group is not None:
        torch.distributed.all_reduce(sq, group=tp_group)
    return torch.rsqrt(sq.sqrt() + 1.0 / eta**2)


def _rows_of(t: torch.Tensor, rows: tuple) -> torch.Tensor:
    """Rows `rows` (a Term's) of a 2-D tensor over the layer's output rows (a copy unless a range)."""
    return t[rows.start:rows.end] if isinstance(rows, RowRange) else t.index_select(0, rows.pos)


def _stacked_q(n: int, parts, like: torch.Tensor) -> torch.Tensor:
    """[n, sum k] with each (rows, Q [rows, k]) of `parts` at its layer rows and its own columns:
    several factor terms as one GEMM over all n rows of the layer."""
    Qf = like.new_zeros(n, sum(Q.shape[1] for _, Q in parts))
    o = 0
    for rows, Q in parts:
        at = slice(rows.start, rows.end) if isinstance(rows, RowRange) else rows.pos
        Qf[at, o:o + Q.shape[1]] = Q
        o += Q.shape[1]
    return Qf


# The one-pass build is memory-bound only while the summed rank is small; at K = 256 (VeRA r=256,
# MoRA sharing's compressed width at 8B where `_tile_build` does not serve: TP row shards) its plain tiles
# compute slower than cuBLAS, which won there (8B, H200, 2026-11-30: sharing 15,593 -> 15,193 tokens/s
# with the kernel at K = 256, LoRA held).
BUILD_KERNEL_MAX_K = 64


def _kernel_build(W0: torch.Tensor, K: int = 0):
    """The one-pass Triton build (`kernels/build.py`) when it serves W0 + Q R with K = Q's columns:
    a CUDA half-precision weight and K <= BUILD_KERNEL_MAX_K (or TRITON_INTERPRET=1 for the CPU
    checks), else None (torch's addmm)."""
    return kernel_for("build", W0, half=True) if K <= BUILD_KERNEL_MAX_K or interpreted() else None


def _dual_kernel(g: torch.Tensor):
    """`kernels/dualmm.py` (g Q and g^T H in one pass over g) when it serves g: a CUDA half-precision
    output gradient (or TRITON_INTERPRET=1 for the CPU checks) and not left out by MORA_DIST_NO_KERNEL, else None."""
    return kernel_for("dualmm", g, off="dualmm", half=True, unit_stride=True)


def _tile_build(W0: torch.Tensor):
    """`kernels/build.py`'s tile_add for MoRA sharing's terms when it serves W0 (as `_kernel_build`, and not
    left out by MORA_DIST_NO_KERNEL=tilebuild), else None (the terms join the product)."""
    return kernel_for("build", W0, off="tilebuild", half=True)


def _is_tile_term(plan: Plan, t: Term, mid) -> bool:
    """Q and P both frozen tile maps and mid a matrix (MoRA sharing on a shard holding the whole input):
    the term's dW is M read at (row mod n, column mod n), no product needed."""
    return bool(t.q_tile and plan.p_tiles and plan.p_tiles[t.slot] and mid is not None and mid.dim() == 2)


def _tile_rows_cover(rows: list, n: int) -> bool:
    """Whether `rows` (Terms' rows) are disjoint and cover all n rows of the layer, read from their
    structure (no device work): RowRanges chained from 0 to n (gate + up), or RowBlocks of one stride
    whose blocks chain over it (q + k + v)."""
    if all(isinstance(r, RowRange) for r in rows):
        spans, end = sorted((r.start, r.end) for r in rows), n
    elif all(isinstance(r, RowBlocks) for r in rows) and len({(r.G, r.stride) for r in rows}) == 1:
        spans, end = sorted((r.off, r.off + r.w) for r in rows), rows[0].stride
        if rows[0].G * end != n:
            return False
    else:
        return False
    at = 0
    for a, b in spans:
        if a != at:
            return False
        at = b
    return at == end


def _build(W0: torch.Tensor, plan: Plan, Ps, pairs, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W0 + Q mid P of every factor term, rounded once: MoRA sharing's terms by `_tile_build` (one pass over
    their rows), the others as one product over all rows with a block-sparse [n_out, sum k] Q (on the GPU
    one pass over the weight), or a copy of W0 without terms. `out`: where to write it (a layer's step
    buffer), else a new tensor."""
    W0 = W0.detach()
    tile = _tile_build(W0) if plan.terms else None
    is_tile = [tile is not None and _is_tile_term(plan, t, mid) for t, (mid, _) in zip(plan.terms, pairs)]
    prod = [i for i, f in enumerate(is_tile) if not f]
    tiled = [i for i, f in enumerate(is_tile) if f]
    if tiled and not prod and _tile_rows_cover([plan.terms[i].rows for i in tiled], W0.shape[0]):
        W, src = (torch.empty_like(W0) if out is None else out), W0  # the terms' rows are all of W
    elif not prod:
        W = W0.clone() if out is None else out.copy_(W0)
        src = W
    else:
        terms = [plan.terms[i] for i in prod]
        Rs = [Ps[t.slot] if mid is None else (mid[:, None] * Ps[t.slot] if mid.dim() == 1 else mid @ Ps[t.slot])
              for t, (mid, _) in zip(terms, (pairs[i] for i in prod))]
        Qf = _stacked_q(W0.shape[0], [(t.rows, pairs[i][1]) for t, i in zip(terms, prod)], W0)
        R = torch.cat(Rs) if len(Rs) > 1 else Rs[0]
        kern = _kernel_build(W0, R.shape[0])
        if kern is not None:
            W = kern.addmm(W0, Qf, R, out)
        else:
            W = torch.addmm(W0, Qf, R) if out is None else torch.addmm(W0, Qf, R, out=out)
        src = W
    for i in tiled:
        t, mid = plan.terms[i], pairs[i][0]
        rows = (t.rows.start, t.rows.end - t.rows.start) if isinstance(t.rows, RowRange) else t.rows.pos
        tile.tile_add(src, W, mid, t.q_tile, plan.p_tiles[t.slot], rows)
    return W


@torch.no_grad()
def build_weight(W0: torch.Tensor, plan: Plan, ts, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's effective weight W0 + every adapter's dW (factor terms, then MoRA blocks added
    in place), rounded once to W0's dtype. `ts` as MergedLinear takes them."""
    if not plan.terms and not plan.blocks and out is None:
        return W0.detach()
    Ps, pairs, Ms = _split(plan, ts[:-1] if plan.accs else ts)  # without the anchor
    W = _build(W0, plan, Ps, pairs, out)
    blockdiag.add_blocks_(W, [b.plan for b in plan.blocks], Ms, [b.rot for b in plan.blocks])
    return W


def _split(plan: Plan, ts):
    nf = plan.n_p + 2 * len(plan.terms)
    return ts[:plan.n_p], [ts[plan.n_p + 2 * i:plan.n_p + 2 * i + 2] for i in range(len(plan.terms))], ts[nf:]


def _factor_grads(g, x2, plan: Plan, ts, need) -> list:
    """Gradients of the factor tensors (P..., (mid, Q)...) from the layer's output gradient g and
    input x2, with mid(h) = h mid^T | h * mid | h, Z = mid(H), H = x P^T, g_i = g's rows of term i
    (ALLoRA: g_i diag(c), i.e. Q_e = c Q below):
        E_i = g_i^T H;  dQ = diag(c) E_i mid^T | diag(c) E_i * mid | diag(c) E_i;
        dmid = Q_e^T E_i | sum_rows(Q_e * E_i);  dH = (g_i Q_e) mid | (g_i Q_e) * mid | g_i Q_e;  dP = dH^T x.
    Only skinny GEMMs with K = tokens; terms in interleaved rows (q/k/v) share one GEMM over g. Where the
    Triton kernel serves (`_dual_kernel`, summed ranks <= 16: LoRA r = 8 on o, gate + up, down), g Q_e and E
    of every term come from one pass over g."""
    Ps, pairs, _ = _split(plan, ts)
    n_p, terms = plan.n_p, plan.terms
    need_p = need[:n_p]
    k_p = [p.shape[0] for p in Ps]
    tiles = plan.p_tiles or (None,) * n_p
    if any(tiles):  # frozen tile compress maps: block sums of x; the rest as one GEMM
        gemm = [s for s in range(n_p) if not tiles[s]]
        Hg = dict(zip(gemm, (x2 @ torch.cat([Ps[s] for s in gemm]).t()).split([k_p[s] for s in gemm], 1))) if gemm else {}
        Hs = [Hg[s] if s in Hg else tile_sum(x2, tiles[s], k_p[s], wrap=True) for s in range(n_p)]
    else:
        Hs = (x2 @ (Ps[0] if n_p == 1 else torch.cat(Ps)).t()).split(k_p, 1)
    Qe = [Q if t.c is None else Q * t.c[:, None] for t, (_, Q) in zip(terms, pairs)]
    # Q a frozen tile map (MoRA's group types) and only mid (a matrix) trains: g Q as block sums
    tiled = [bool(t.q_tile and t.c is None and not need[n_p + 2 * i + 1] and mid is not None and mid.dim() == 2
                  and isinstance(t.rows, (RowRange, RowBlocks))) for i, (t, (mid, _)) in enumerate(zip(terms, pairs))]
    need_e = [(need[n_p + 2 * i] or need[n_p + 2 * i + 1]) and not tiled[i] for i in range(len(terms))]
    scat = [i for i, t in enumerate(terms) if not isinstance(t.rows, RowRange) and not tiled[i]]
    dual = _dual_kernel(g)
    wants = lambda ids: ([i for i in ids if need_e[i]], [i for i in ids if need_p[terms[i].slot]])  # noqa: E731
    e_ids, z_ids = wants([i for i in range(len(terms)) if not tiled[i]])
    slots = sorted({terms[i].slot for i in e_ids})
    if not (dual and e_ids and z_ids and dual.serves(sum(Qe[i].shape[1] for i in z_ids), sum(k_p[s] for s in slots))):
        dual = None  # GEMMs over all of g for the interleaved terms; ranges by their slices below
        e_ids, z_ids = wants(scat)
        slots = sorted({terms[i].slot for i in e_ids})
    Hc = (torch.cat([Hs[s] for s in slots], 1) if len(slots) > 1 else Hs[slots[0]]) if slots else None
    Qf = _stacked_q(g.shape[1], [(terms[i].rows, Qe[i]) for i in z_ids], g) if z_ids else None
    if dual:  # g Q_e and E over all of g's rows in one pass over g
        dZ_all, E_all = dual.dual_mm(g, Qf, Hc)
    else:
        E_all = g.t() @ Hc if slots else None
        dZ_all = g @ Qf if z_ids else None
    cols = dict(zip(slots, itertools.accumulate([0] + [k_p[s] for s in slots])))
    E_of = {i: _rows_of(E_all, terms[i].rows)[:, cols[terms[i].slot]:cols[terms[i].slot] + k_p[terms[i].slot]]
            for i in e_ids}
    dZ_of = dict(zip(z_ids, dZ_all.split([Qe[i].shape[1] for i in z_ids], 1))) if z_ids else {}
    grads = [None] * len(ts)
    dH = [None] * n_p
    for i, (t, (mid, Q)) in enumerate(zip(terms, pairs)):
        rng = isinstance(t.rows, RowRange)
        gi = g[:, t.rows.start:t.rows.end] if rng else None
        if tiled[i]:  # dmid = (g Q)^T H, dZ = (g Q) mid, g Q the block sums of the term's rows
            gq = tile_sum(gi, t.q_tile, Q.shape[1]) if rng else tile_sum_groups(
                g, [(t.rows.off + j * t.rows.stride, t.rows.w) for j in range(t.rows.G)], t.q_tile, Q.shape[1])
            if need[n_p + 2 * i]:
                grads[n_p + 2 * i] = gq.t() @ Hs[t.slot]
            if need_p[t.slot]:
                d = gq @ mid
                dH[t.slot] = d if dH[t.slot] is None else dH[t.slot] + d
            continue
        if need_e[i]:
            E = E_of[i] if i in E_of else gi.t() @ Hs[t.slot]
            if need[n_p + 2 * i + 1]:
                dQ = E if mid is None else (E * mid if mid.dim() == 1 else E @ mid.t())
                grads[n_p + 2 * i + 1] = dQ if t.c is None else dQ * t.c[:, None]
            if need[n_p + 2 * i]:
                grads[n_p + 2 * i] = (Qe[i] * E).sum(0) if mid.dim() == 1 else Qe[i].t() @ E
        if need_p[t.slot]:
            dZ = dZ_of[i] if i in dZ_of else gi @ Qe[i]
            d = dZ if mid is None else (dZ * mid if mid.dim() == 1 else dZ @ mid)
            dH[t.slot] = d if dH[t.slot] is None else dH[t.slot] + d
    train = [s for s in range(n_p) if need_p[s]]
    if train:  # dP for every trained P: one GEMM over x
        dP = (torch.cat([dH[s] for s in train], 1) if len(train) > 1 else dH[train[0]]).t() @ x2
        for s, d in zip(train, dP.split([k_p[s] for s in train], 0)):
            grads[s] = d
    return grads


def _block_output_grad(g2: torch.Tensor, blocks) -> torch.Tensor:
    """g2 with ALLoRA block adapters' rows scaled by their c (a copy only when there are any)."""
    if all(b.c is None for b in blocks):
        return g2
    g2 = g2.clone()
    for b in blocks:
        if b.c is not None:
            o = 0  # c is per local adapter row; segments come in that order
            for f0, f1, d0 in b.plan[1]:
                g2[:, d0:d0 + f1 - f0] *= b.c[o:o + f1 - f0].to(g2.dtype)
                o += f1 - f0
    return g2


def _forward(ctx, x2, W0, W, plan: Plan, comm, ts):
    if W is None:
        W = build_weight(W0, plan, ts)
    ctx.plan, ctx.comm = plan, comm
    if comm is None:
        y, x_saved = x2 @ W.t(), x2
    elif comm[0] == "gather":
        y, x_saved = overlap.gather_mm(x2, W.t(), comm[1])
    else:
        y, x_saved = overlap.mm_scatter(x2, W.t(), comm[1]), x2
    ctx.save_for_backward(x_saved, W, *ts)
    return y


def _backward(ctx, g, first: int):
    """(dx, gradients of ts); `first`: index of ts[0] among the Function's inputs."""
    plan, comm = ctx.plan, ctx.comm
    x2, W, *ts = ctx.saved_tensors
    need = ctx.needs_input_grad[first:]
    if plan.accs:  # the anchor off; accumulated tensors' gradients are needed though they require none
        ts = ts[:-1]
        need = [n or a is not None for n, a in zip(need, plan.accs)]
    nf = plan.n_p + 2 * len(plan.terms)
    grads = [None] * len(ts)
    dx = None
    if comm is not None and comm[0] == "scatter":  # row-parallel under SP: g arrives as this rank's rows
        if ctx.needs_input_grad[0]:
            dx, g = overlap.gather_mm(g, W, comm[1])
        else:
            g = overlap.gather(g, comm[1])

    def params():
        if any(need[:nf]):
            grads[:nf] = _factor_grads(g, x2, plan, ts[:nf], need[:nf])
        if plan.blocks and any(need[nf:]):
            grads[nf:] = blockdiag.block_grads(_block_output_grad(g, plan.blocks), x2, [b.plan for b in plan.blocks],
                                               ts[nf:], [b.rot for b in plan.blocks], need[nf:])

    if comm is not None and comm[0] == "gather" and ctx.needs_input_grad[0]:
        # column-parallel under SP: dx reduce-scattered over the sequence, the parameter grads meanwhile
        dx = overlap.mm_scatter(g, W, comm[1], overlap=params)
    else:
        params()
        if comm is None and ctx.needs_input_grad[0]:
            dx = g @ W
    return dx, _accumulate(plan, grads)


def _accumulate(plan: Plan, grads: list) -> list:
    """grads with those of `plan.accs`' tensors added into their buffers (None returned for them and for the
    anchor); grads itself without accs."""
    if not plan.accs:
        return grads
    for i, a in enumerate(plan.accs):
        if a is not None and grads[i] is not None:
            a.add_(grads[i])
            grads[i] = None
    return grads + [None]


class MergedLinear(torch.autograd.Function):
    """y2 = x2 @ W^T, W = W0 + every adapter's dW, for x2 [T, d_in] and the frozen W0 [n_out, d_in].
    `W`: that weight already built for this optimizer step (`AdaptedLinear`'s step buffer), or None
    to build it here."""

    @staticmethod
    def forward(ctx, x2, W0, W, plan: Plan, *ts):
        return _forward(ctx, x2, W0, W, plan, None, ts)

    @staticmethod
    def backward(ctx, g):
        dx, grads = _backward(ctx, g, 4)
        return (dx, None, None, None, *grads)


class MergedLinearSP(torch.autograd.Function):
    """MergedLinear on a TP shard under sequence parallelism with the layer's collective inside,
    overlapped with the GEMMs (`overlap.py`). `comm` = ("gather", group): column-parallel, x2 is this
    rank's rows of the input (all-gathered forward, dx reduce-scattered); ("scatter", group):
    row-parallel, y2 is this rank's rows of the summed output (its gradient all-gathered)."""

    @staticmethod
    def forward(ctx, x2, W0, W, plan: Plan, comm, *ts):
        return _forward(ctx, x2, W0, W, plan, comm, ts)

    @staticmethod
    def backward(ctx, g):
        dx, grads = _backward(ctx, g, 5)
        return (dx, None, None, None, None, *grads)
