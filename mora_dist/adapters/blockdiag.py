"""MoRA's block types (rotation, decouple) on an unsharded layer as strided batched GEMMs.

A block type's update is block-diagonal: chunk c of the padded input x' (x'[p] = x[p mod d_in],
chunks of rh) maps to rows [c rh, (c+1) rh) of a flat output by W_c = M R_c, and adapter output
row j reads flat[j mod L] (L = n_used rh; truncated, or tiled when L < d_out). The naive code
copies x into a [chunks, T, rh] batch, runs bmm, copies back to row order, tiles and adds: 4-6
passes over the activations per adapter and direction, which made MoRA rotation 66% slower than
LoRA on the 1.1B model (docs/performance.md). Here the activations are not copied:

- `superblocks` of S = g rh (g chunks, g = 8 / gcd(rh, 8)) make every batch start 16-byte aligned
  in bf16, so cuBLAS keeps its fast kernels (rh = 180 gives S = 360; the g x g block-diagonal
  S x S matrix costs g times the minimal FLOPs, which are small next to the base GEMM);
- the input is read through a strided view x[:, a:a + n S].view(T, n, S).transpose(0, 1), and the
  result is accumulated in place (`baddbmm_`) through the same kind of view of the layer's output
  columns: a batch stride of S and a row stride of the layer width need no copy;
- an adapter's rows may be split over the output (q/k/v: one block per query group in the fused
  qkv layer) and tiled: every contiguous piece is its own set of GEMMs, superblocks inside it
  batched, the partial chunks at its ends as small dense GEMMs (only these read a wrapped copy);
- all block adapters of a layer run in one autograd Function, so the backward builds one dx.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch


class Geometry(NamedTuple):
    rh: int
    g: int  # chunks per superblock
    d_in: int
    d_out: int
    n_used: int  # chunks that reach an output row

    @property
    def S(self) -> int:
        return self.g * self.rh

    @property
    def L(self) -> int:
        return self.n_used * self.rh


def geometry(rh: int, d_in: int, d_out: int) -> Geometry:
    n = -(-d_in // rh)
    n_used = n if d_out >= n * rh else -(-d_out // rh)
    return Geometry(rh, 8 // math.gcd(rh, 8), d_in, d_out, n_used)


@lru_cache(maxsize=None)
def operations(geo: Geometry, segments: tuple) -> tuple:
    """The GEMMs that write adapter rows [f0, f1) to output columns [d0, ...) for each segment
    (f0, f1, d0): ("sb", i0, i1, col) = superblocks [i0, i1) into columns [col, col + (i1-i0) S);
    ("small", h0, h1, col) = flat rows [h0, h1) (partial chunks) into [col, col + h1 - h0)."""
    S, L, rh = geo.S, geo.L, geo.rh
    ops = []
    for f0, f1, d0 in segments:
        j = f0
        while j < f1:  # pieces that stay inside one tile of L rows
            k = j // L
            end = min(f1, (k + 1) * L)
            p0, p1, col = j - k * L, end - k * L, d0 + j - f0
            i0, i1 = -(-p0 // S), min(p1 // S, geo.d_in // S)
            if i1 > i0:
                if p0 < i0 * S:
                    ops.append(("small", p0, i0 * S, col))
                ops.append(("sb", i0, i1, col + i0 * S - p0))
                if i1 * S < p1:
                    ops.append(("small", i1 * S, p1, col + i1 * S - p0))
            else:
                ops.append(("small", p0, p1, col))
            j = end
    return tuple(ops)


def _superblocks(Wc: torch.Tensor, geo: Geometry, n: int) -> torch.Tensor:
    """[n, S, S] block-diagonal matrices of chunks [i g, (i+1) g)."""
    rh, g = geo.rh, geo.g
    if g == 1:
        return Wc[:n]
    W = Wc.new_zeros(n, geo.S, geo.S)
    for j in range(g):
        W[:, j * rh:(j + 1) * rh, j * rh:(j + 1) * rh] = Wc[j:n * g:g]
    return W


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


class BlockDiagAdd(torch.autograd.Function):
    """out2 = out.view(-1, n): out2[:, cols] += blockdiag(W_c) x' for every adapter, in place.

    `plans`: one (geometry, segments) per adapter, segments = ((f0, f1, d0), ...) placing adapter
    rows [f0, f1) at output columns d0...; `Wcs`: each adapter's [n_used, rh, rh] chunk matrices."""

    @staticmethod
    def forward(ctx, out, x2, plans, *Wcs):
        o2 = out.view(-1, out.shape[-1])
        cache = {}
        for (geo, segs), Wc in zip(plans, Wcs):
            ops = operations(geo, segs)
            n = _n_sb(ops)
            Wsb = _superblocks(Wc, geo, n) if n else None
            for op in ops:
                if op[0] == "sb":
                    _, i0, i1, col = op
                    _sb_view(o2, col, i1 - i0, geo.S).baddbmm_(_sb_view(x2, i0 * geo.S, i1 - i0, geo.S),
                                                             Wsb[i0:i1].transpose(1, 2))
                else:
                    _, h0, h1, col = op
                    W, c0, c1 = _small_weight(Wc, geo.rh, h0, h1)
                    o2[:, col:col + h1 - h0].addmm_(_window(x2, c0 * geo.rh, c1 * geo.rh, geo.d_in, cache), W.t())
        ctx.mark_dirty(out)
        ctx.plans = plans
        ctx.save_for_backward(x2, *Wcs)
        return out

    @staticmethod
    def backward(ctx, g):
        x2, *Wcs = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        need_x = ctx.needs_input_grad[1]
        d_in = x2.shape[1]
        dx = x2.new_zeros(x2.shape[0], d_in) if need_x else None  # one contiguous dx for the layer
        dWcs = []
        cache = {}
        for i, ((geo, segs), Wc) in enumerate(zip(ctx.plans, Wcs)):
            need_w = ctx.needs_input_grad[3 + i]
            ops = operations(geo, segs)
            n, S, rh = _n_sb(ops), geo.S, geo.rh
            Wsb = _superblocks(Wc, geo, n) if n else None
            dWsb = Wc.new_zeros(n, S, S) if (need_w and n) else None
            dWc = torch.zeros_like(Wc) if need_w else None
            for op in ops:
                if op[0] == "sb":
                    _, i0, i1, col = op
                    gsb = _sb_view(g2, col, i1 - i0, S)
                    if need_x:
                        _sb_view(dx, i0 * S, i1 - i0, S).baddbmm_(gsb, Wsb[i0:i1])
                    if need_w:
                        dWsb[i0:i1].baddbmm_(gsb.transpose(1, 2), _sb_view(x2, i0 * S, i1 - i0, S))
                    continue
                _, h0, h1, col = op
                W, c0, c1 = _small_weight(Wc, rh, h0, h1)
                a, b = c0 * rh, c1 * rh
                gt = g2[:, col:col + h1 - h0]
                if need_x:
                    if b <= d_in:
                        dx[:, a:b].addmm_(gt, W)
                    else:  # wrapped input columns fold back onto x
                        dxt = gt @ W
                        p = a
                        while p < b:
                            q = min(b, (p // d_in + 1) * d_in)
                            dx[:, p % d_in:p % d_in + q - p] += dxt[:, p - a:q - a]
                            p = q
                if need_w:
                    dW = gt.t() @ _window(x2, a, b, d_in, cache)  # [h1 - h0, b - a]
                    for k in range(c0, c1):
                        r0, r1 = max(h0, k * rh), min(h1, (k + 1) * rh)
                        dWc[k, r0 - k * rh:r1 - k * rh] += dW[r0 - h0:r1 - h0, (k - c0) * rh:(k - c0 + 1) * rh]
            if dWsb is not None:
                for j in range(geo.g):
                    dWc[j:n * geo.g:geo.g] += dWsb[:, j * rh:(j + 1) * rh, j * rh:(j + 1) * rh]
            dWcs.append(dWc)
        return (g, dx, None, *dWcs)
