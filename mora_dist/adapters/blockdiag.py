"""MoRA's block types (rotation, decouple) on any shard of a layer, for the merged-weight path
(`mora_dist/parallel/merged.py`): a column shard's segments start at its global adapter rows, its
input is the whole (gathered) x; a row-parallel shard (`Geometry.cols`) holds every output row and
input columns [a, b) of the global d_in, and its update is the global one's columns [a, b).

A block type's update is block-diagonal: chunk c of the padded input x' (x'[p] = x[p mod d_in],
chunks of rh) maps to rows [c rh, (c+1) rh) of a flat output by W_c = M R_c (R_c: RoPE-like
rotation at position c, `chunk_mats`; identity for decouple), and adapter output row j reads
flat[j mod L] (L = n_used rh; truncated, or tiled when L < d_out). An adapter's rows may also be
split over the layer's output (q/k/v: one piece per query group in the fused qkv layer). Two
operations serve the merged path, taking M and the rotation tables (cos, sin):

- `add_blocks_`: W[rows] += the update, in place on the layer's effective weight;
- `block_grads`: d loss / d M = sum_c dW_c R_c^T, with dW_c the block-diagonal part of g^T x'
  (never the dense g^T x).

On the GPU each is one Triton launch per adapter (`mora_dist.kernels.blockdiag`, driven by `items`).
A row-parallel shard's items are the global ones with their chunk columns [k0, k1) cut to the
shard's input columns (chunks may cross shard boundaries, the wrapped last chunk included); a chunk
with no column there gives no item, and a shard with no item has dW = 0 and a zero partial dM. Its
M gradient is that partial, summed over TP by the caller (`Adapter.merged_param`, as for any
replicated parameter). The torch forms (CPU, and rh > d_in) of a row shard loop over the same items
(one small add / GEMM each); those of other shards follow `operations`: the add puts the chunk
matrices on strided diagonal-block views of W, partial chunks at a piece's ends as small dense adds,
wrapped input columns folded back by index; the gradient runs strided batched GEMMs over
`superblocks` of S = g rh (g chunks, g = 8 / gcd(rh, 8): every batch starts 16-byte aligned in
bf16) read through views, the partial chunks as small dense GEMMs, then `chunk_mats_grad`.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from mora_dist.adapters.tiles import tile_sum
from mora_dist.kernels import kernel_for, kernels_off


class Geometry(NamedTuple):
    rh: int
    g: int  # chunks per superblock
    d_in: int
    d_out: int
    n_used: int  # chunks that reach an output row
    # a row-parallel shard's input columns (a, b) of the global d_in (its W and x hold only these,
    # from local column 0), or None: the whole input
    cols: Optional[tuple] = None

    @property
    def S(self) -> int:
        return self.g * self.rh

    @property
    def L(self) -> int:
        return self.n_used * self.rh


def geometry(rh: int, d_in: int, d_out: int, cols: Optional[tuple] = None) -> Geometry:
    """`cols`: a row-parallel shard's input columns (a, b) (None or (0, d_in): the whole input)."""
    n = -(-d_in // rh)
    n_used = n if d_out >= n * rh else -(-d_out // rh)
    cols = None if cols is None or tuple(cols) == (0, d_in) else (int(cols[0]), int(cols[1]))
    return Geometry(rh, 8 // math.gcd(rh, 8), d_in, d_out, n_used, cols)


def _tile_pieces(geo: Geometry, segments: tuple):
    """(p0, p1, row) for every piece of the segments that stays inside one tile of L adapter rows:
    flat rows [p0, p1) of the tile, placed from layer row `row` on."""
    L = geo.L
    for f0, f1, d0 in segments:
        j = f0
        while j < f1:
            end = min(f1, (j // L + 1) * L)
            yield j % L, j % L + end - j, d0 + j - f0
            j = end


@lru_cache(maxsize=None)
def operations(geo: Geometry, segments: tuple) -> tuple:
    """The pieces placing adapter rows [f0, f1) at layer output rows [d0, ...) for each segment
    (f0, f1, d0) of a geometry over the whole input (not a row shard's, `cols`):
    ("sb", i0, i1, row) = superblocks [i0, i1) at rows [row, row + (i1-i0) S);
    ("small", h0, h1, row) = flat rows [h0, h1) (partial chunks) at rows [row, row + h1 - h0)."""
    S = geo.S
    ops = []
    for p0, p1, row in _tile_pieces(geo, segments):
        i0, i1 = -(-p0 // S), min(p1 // S, geo.d_in // S)
        if i1 > i0:
            if p0 < i0 * S:
                ops.append(("small", p0, i0 * S, row))
            ops.append(("sb", i0, i1, row + i0 * S - p0))
            if i1 * S < p1:
                ops.append(("small", i1 * S, p1, row + i1 * S - p0))
        else:
            ops.append(("small", p0, p1, row))
    return tuple(ops)


@lru_cache(maxsize=None)
def items(geo: Geometry, segments: tuple) -> tuple:
    """Work items of the Triton kernels: (layer row of chunk row 0, chunk c, valid chunk rows
    [i0, i1), chunk columns [k0, k1), x column of chunk column 0) for every (piece of a segment
    inside one tile of L rows, chunk) pair; a chunk that wraps past d_in is two items (columns
    before and after the wrap), so every item reads x at contiguous columns. A row shard (`geo.cols`
    = (a, b)): each column piece cut to global columns [a, b), x columns counted from a (the
    shard's local ones; x column of chunk column 0 may be negative, as after a wrap), pieces with
    no column there dropped."""
    rh, d_in = geo.rh, geo.d_in
    a, b = geo.cols or (0, d_in)
    out = []
    for p0, p1, row in _tile_pieces(geo, segments):
        base = row - p0  # layer row of flat row 0 of this tile
        for c in range(p0 // rh, -(-p1 // rh)):
            rows = (base + c * rh, c, max(p0, c * rh) - c * rh, min(p1, (c + 1) * rh) - c * rh)
            k = 0
            while k < rh:  # column pieces between wraps of x' (x'[p] = x[p mod d_in])
                p = c * rh + k
                k1 = min(rh, k + d_in - p % d_in)
                x0 = c * rh - (p // d_in) * d_in  # global x column of chunk column 0 on this side of the wrap
                lo, hi = max(k, a - x0), min(k1, b - x0)
                if lo < hi:
                    out.append(rows + (lo, hi, x0 - a))
                k = k1
    return tuple(out)


def chunk_mats(M: torch.Tensor, n: int, rot) -> torch.Tensor:
    """W_c = M R_c for chunks c < n, [n, rh, rh]; rot = (cos, sin) [n, rh] or None (R_c = I).
    (R_c v)[k] = v[k] cos_c[k] + rotate_half(v)[k] sin_c[k], rotate_half(v) = [-v[h:], v[:h]], so
    W_c[:, k] = M[:, k] cos_c[k] + s(k) M[:, k^h] sin_c[k] with k^h = k +- h and s = +1 below h, -1 above
    (cos and sin repeat with period h)."""
    if rot is None:
        return M.expand(n, -1, -1)
    cos, sin = (t[:, None, :] for t in rot)
    h = M.shape[1] // 2
    S = M * sin
    return M * cos + torch.cat((S[..., h:], -S[..., :h]), dim=-1)


def chunk_mats_grad(dWc: torch.Tensor, rot) -> torch.Tensor:
    """d loss / d M from the chunk matrices' gradients (the adjoint of `chunk_mats`):
    dM[:, j] = sum_c dW_c[:, j] cos_c[j] + s'(j) dW_c[:, j^h] sin_c[j], s' = -1 below h, +1 above."""
    if rot is None:
        return dWc.sum(0)
    cos, sin = (t[:, None, :] for t in rot)
    h = dWc.shape[-1] // 2
    B = (dWc * sin).sum(0)
    return (dWc * cos).sum(0) + torch.cat((-B[:, h:], B[:, :h]), dim=-1)


def _kernels(t: torch.Tensor, geo: Geometry):
    """The Triton kernels (weight add, M gradient) when they serve this call (a CUDA tensor, or
    TRITON_INTERPRET=1 for CPU checks; rh <= d_in), else None (the torch forms below)."""
    return None if geo.rh > geo.d_in else kernel_for("blockdiag", t)


def _small_weight(Wc: torch.Tensor, rh: int, h0: int, h1: int):
    """Rows [h0, h1) of blockdiag(W_c) over the chunks they touch: (matrix, first chunk, last + 1)."""
    c0, c1 = h0 // rh, -(-h1 // rh)
    W = torch.block_diag(*Wc[c0:c1]) if c1 - c0 > 1 else Wc[c0]
    return W[h0 - c0 * rh:h1 - c0 * rh], c0, c1


def _window(x2: torch.Tensor, a: int, b: int, d_in: int, cache: dict) -> torch.Tensor:
    """x'[:, a:b] with x'[p] = x[p mod d_in] (a copy only when it wraps, made once per call)."""
    if b <= d_in:
        return x2[:, a:b]
    if (a, b) not in cache:
        cache[(a, b)] = x2.index_select(1, torch.arange(a, b, device=x2.device) % d_in)
    return cache[(a, b)]


def _sb_view(t: torch.Tensor, col0: int, n: int, S: int) -> torch.Tensor:
    """Columns [col0, col0 + n S) of a 2-D tensor as a [n, T, S] strided batch (no copy)."""
    return t[:, col0:col0 + n * S].view(t.shape[0], n, S).transpose(0, 1)


def _n_sb(ops) -> int:
    return max((op[2] for op in ops if op[0] == "sb"), default=0)


def _diag_blocks(W: torch.Tensor, row0: int, col0: int, n: int, rh: int) -> torch.Tensor:
    """The n diagonal rh x rh blocks of a contiguous 2-D W from (row0, col0) on, as a [n, rh, rh]
    strided view (block c at rows row0 + c rh, columns col0 + c rh)."""
    d = W.shape[1]
    return W.as_strided((n, rh, rh), (rh * d + rh, d, 1), W.storage_offset() + row0 * d + col0)


@torch.no_grad()
def add_blocks_(W: torch.Tensor, plans, Ms, rots) -> None:
    """W[:, ...] += every adapter's block-diagonal update, in place, each rounded once to W's dtype.

    W: the layer's [n_out, d_in] weight (contiguous); `plans`: one (geometry, segments) per adapter,
    segments = ((f0, f1, d0), ...) placing adapter rows [f0, f1) at layer rows d0...; `Ms`: each
    adapter's M (fp32 master precision); `rots`: each adapter's (cos, sin) [n_used, rh] in M's
    dtype, or None (decouple). A row shard's geometry (`cols`): W is its [n_out, b - a] shard."""
    d_in = W.shape[1]
    for (geo, segs), M, rot in zip(plans, Ms, rots):
        if geo.cols is not None and not items(geo, segs):
            continue  # a row shard that holds no used chunk: dW = 0 here
        kern = _kernels(W, geo)
        if kern is not None:
            kern.add_blocks_(W, M, rot, items(geo, segs), geo.rh)
            continue
        Wc = chunk_mats(M, geo.n_used, rot)
        if geo.cols is not None:  # a row shard: each item's piece (rounded once each while rh <= d_in)
            for row0, c, i0, i1, k0, k1, x0 in items(geo, segs):
                W[row0 + i0:row0 + i1, x0 + k0:x0 + k1].add_(Wc[c, i0:i1, k0:k1])
            continue
        rh, g = geo.rh, geo.g
        for op in operations(geo, segs):
            if op[0] == "sb":
                _, i0, i1, row = op
                _diag_blocks(W, row, i0 * geo.S, (i1 - i0) * g, rh).add_(Wc[i0 * g:i1 * g])
                continue
            _, h0, h1, row = op
            Ws, c0, c1 = _small_weight(Wc, rh, h0, h1)
            a, b = c0 * rh, c1 * rh
            if b <= d_in:
                W[row:row + h1 - h0, a:b].add_(Ws)
            else:  # wrapped input columns fold back onto x's (x'[p] = x[p mod d_in])
                cols = torch.arange(a, b, device=W.device) % d_in
                W[row:row + h1 - h0].add_(Ws.new_zeros(h1 - h0, d_in).index_add_(1, cols, Ws))


# An adapter whose rows read the flat output at least this many times over (gate / up: 14,336 rows over
# L = 4,224 at 8B, 3.4x) has its output gradient summed over those tiles first (`folded`).
FOLD_MIN = 1.5


def folded(geo: Geometry, segments: tuple):
    """(geometry, segments, shift) of the folded problem, or None. Rows j of an adapter read flat[j mod L],
    so dM only sees g through gf[:, p] = sum of g's columns of the adapter rows j = p mod L: one pass over
    g (`tiles.tile_sum`) and then the block products over L rows instead of d_out (FLOPs / 3.4 at the 8B
    gate / up, x read once a chunk instead of once a tile). For one segment (f0, f1, d0) of a geometry over
    the whole input; gf is rounded once to g's dtype (as sharing's block sums; at the 8B gate / up 1.8e-3 of
    dM's largest entry against an fp32 sum, `launch/bench_rotgrad.py`, far inside bf16 training's ~2e-2 of
    `bench.py --check`), the products stay exact. Measured at 8B (H200): gate / up 0.193 / 0.191 -> 0.178 /
    0.156 ms a layer and micro-batch, the rotation step 14.6 ms shorter (docs/performance.md)."""
    if geo.cols is not None or len(segments) != 1 or segments[0][1] - segments[0][0] < FOLD_MIN * geo.L:
        return None
    if "fold" in kernels_off():  # the A/B switch (MORA_DIST_NO_KERNEL=fold)
        return None
    return geometry(geo.rh, geo.d_in, geo.L), ((0, geo.L, 0),), segments[0][0] % geo.L


def block_grads(g2: torch.Tensor, x2: torch.Tensor, plans, Ms, rots, needs) -> list:
    """d loss / d M for every adapter whose `needs` is true (else None), in M's dtype, from the
    layer's output gradient g2 [T, n_out] and input x2 [T, d_in]: dW_c = for each piece of an
    adapter's rows, g[:, piece]^T x'[:, chunk columns], summed over the tiles that read the same
    chunk; dM = `chunk_mats_grad`(dW_c). A row shard (`geo.cols`; x2 its [T, b - a] input): the
    partial dM of its columns (zeros where it holds no used chunk), for the caller's sum over TP."""
    d_in = x2.shape[1]
    out, cache = [], {}
    for (geo, segs), M, rot, need in zip(plans, Ms, rots, needs):
        if not need:
            out.append(None)
            continue
        if geo.cols is not None and not items(geo, segs):
            out.append(M.new_zeros(geo.rh, geo.rh))  # a tensor, not None: every rank joins the TP sum
            continue
        g = g2
        kern = _kernels(g2, geo)
        # v9 (rh <= 256) keeps the unfolded items: its fixed token blocks would leave the folded problem
        # 72 programs on 132 SMs at the 1.1B gate / up (rotation -4% in the step, H200, 2026-12-01)
        fold = folded(geo, segs) if kern is None or kern.grad_impl(geo.rh) == "new" else None
        if fold is not None:
            f0, f1, d0 = segs[0]
            geo, segs, shift = fold
            g = tile_sum(g2[:, d0:d0 + f1 - f0], geo.L, geo.L, shift=shift)
        if kern is not None:
            out.append(kern.block_grad(g, x2, rot, items(geo, segs), geo.rh, M.dtype))
            continue
        if geo.cols is not None:  # a row shard: each item's g^T x' piece into its chunk's dW_c
            dWc = M.new_zeros(geo.n_used, geo.rh, geo.rh)
            for row0, c, i0, i1, k0, k1, x0 in items(geo, segs):
                dWc[c, i0:i1, k0:k1] += g[:, row0 + i0:row0 + i1].t() @ x2[:, x0 + k0:x0 + k1]
            out.append(chunk_mats_grad(dWc, rot))
            continue
        ops = operations(geo, segs)
        n, S, rh = _n_sb(ops), geo.S, geo.rh
        # superblock products accumulate in the activations' dtype inside the GEMM (a tile that
        # reads a chunk twice adds once more, rounded once); W_c's fp32 gradient sums the rest
        dWsb = g.new_zeros(n, S, S) if n else None
        dWc = M.new_zeros(geo.n_used, rh, rh)
        for op in ops:
            if op[0] == "sb":
                _, i0, i1, row = op
                dWsb[i0:i1].baddbmm_(_sb_view(g, row, i1 - i0, S).transpose(1, 2), _sb_view(x2, i0 * S, i1 - i0, S))
                continue
            _, h0, h1, row = op
            c0, c1 = h0 // rh, -(-h1 // rh)
            dW = g[:, row:row + h1 - h0].t() @ _window(x2, c0 * rh, c1 * rh, d_in, cache)  # [h1 - h0, (c1-c0) rh]
            for k in range(c0, c1):
                r0, r1 = max(h0, k * rh), min(h1, (k + 1) * rh)
                dWc[k, r0 - k * rh:r1 - k * rh] += dW[r0 - h0:r1 - h0, (k - c0) * rh:(k - c0 + 1) * rh]
        if dWsb is not None:
            for j in range(geo.g):
                dWc[j:n * geo.g:geo.g] += dWsb[:, j * rh:(j + 1) * rh, j * rh:(j + 1) * rh]
        out.append(chunk_mats_grad(dWc, rot))
    return out
