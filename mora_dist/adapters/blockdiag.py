"""MoRA's block types (rotation, decouple) on an unsharded layer as strided batched GEMMs.

A block type's update is block-diagonal: chunk c of the padded input x' (x'[p] = x[p mod d_in],
chunks of rh) maps to output rows [c rh, (c+1) rh) of a flat vector by W_c = M R_c, and output
row j reads flat[j mod L] (L = n_used rh; truncated, or tiled when L < d_out). The naive code
copies x into a [chunks, T, rh] batch, runs bmm, copies back to row order and tiles: 4-6 passes
over the activations per adapter and direction, which made MoRA rotation 66% slower than LoRA on
the 1.1B model (docs/performance.md). Here nothing is copied in the common case:

- `superblocks` of S = g rh (g chunks, g = 8 / gcd(rh, 8)) make every batch start 16-byte aligned
  in bf16, so cuBLAS keeps its fast kernels (rh = 180 gives S = 360; the g x g block-diagonal
  S x S matrix costs g times the minimal FLOPs, which are small next to the base GEMM);
- the input is read through a strided view x[:, :n S].view(T, n, S).transpose(0, 1), and the
  output is accumulated in place through the same view of the destination rows (`baddbmm_`
  accepts a batch stride of S and a row stride of the layer width without copying);
- each tile of the output is one more GEMM on the same inputs (cheaper than copying the result);
- only the last, partial superblock of a tile (wrapped input, cut rows) takes a small copy.
The backward mirrors it: dx and the S x S weight gradients from strided batched GEMMs on the
output gradient, then the diagonal blocks give each chunk's dW_c.
"""
from __future__ import annotations

import math
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

    def tiles(self):
        """(first output row, rows, full superblocks read straight from x, tail input end in x')."""
        S, L, rh = self.S, self.L, self.rh
        for row0 in range(0, self.d_out, L):
            w = min(L, self.d_out - row0)
            nfull = min(w // S, self.d_in // S)
            yield row0, w, nfull, min(L, -(-w // rh) * rh)


def geometry(rh: int, d_in: int, d_out: int) -> Geometry:
    n = -(-d_in // rh)
    n_used = n if d_out >= n * rh else -(-d_out // rh)
    return Geometry(rh, 8 // math.gcd(rh, 8), d_in, d_out, n_used)


def _padded(x2: torch.Tensor, a: int, b: int, d_in: int, cache: dict) -> torch.Tensor:
    """x'[:, a:b] with x'[p] = x[p mod d_in] (a copy only when it wraps, made once per call)."""
    if b <= d_in:
        return x2[:, a:b]
    if (a, b) not in cache:
        cache[(a, b)] = x2.index_select(1, torch.arange(a, b, device=x2.device) % d_in)
    return cache[(a, b)]


def _superblocks(Wc: torch.Tensor, geo: Geometry, n: int) -> torch.Tensor:
    """[n, S, S] block-diagonal matrices of chunks [i g, (i+1) g)."""
    rh, g = geo.rh, geo.g
    if g == 1:
        return Wc[:n]
    W = Wc.new_zeros(n, geo.S, geo.S)
    for j in range(g):
        W[:, j * rh:(j + 1) * rh, j * rh:(j + 1) * rh] = Wc[j:n * g:g]
    return W


def _blockdiag(Wc: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    return torch.block_diag(*Wc[c0:c1]) if c1 - c0 > 1 else Wc[c0]


def _sb_view(t: torch.Tensor, col0: int, n: int, S: int) -> torch.Tensor:
    """Columns [col0, col0 + n S) of a 2-D tensor as a [n, T, S] strided batch (no copy)."""
    return t[:, col0:col0 + n * S].view(t.shape[0], n, S).transpose(0, 1)


class BlockDiagAdd(torch.autograd.Function):
    """dst += blockdiag(W_c) x' (cut/tiled to d_out rows), in place; dst is `rows(out)` (a 2-D view
    of `out` with unit column stride) or, when `rows` is None, `out` itself."""

    @staticmethod
    def forward(ctx, out, x2, Wc, geo: Geometry, rows):
        dst = out if rows is None else rows(out)
        S = geo.S
        n_max = max(nf for _, _, nf, _ in geo.tiles())
        Wsb = _superblocks(Wc, geo, n_max) if n_max else None
        cache = {}
        for row0, w, nfull, in_end in geo.tiles():
            if nfull:
                _sb_view(dst, row0, nfull, S).baddbmm_(_sb_view(x2, 0, nfull, S), Wsb[:nfull].transpose(1, 2))
            c0 = nfull * S
            if c0 < w:
                xt = _padded(x2, c0, in_end, geo.d_in, cache)
                Wt = _blockdiag(Wc, c0 // geo.rh, in_end // geo.rh)[: w - c0]
                dst[:, row0 + c0:row0 + w].addmm_(xt, Wt.t())
        ctx.mark_dirty(out)
        ctx.geo, ctx.rows = geo, rows
        ctx.save_for_backward(x2, Wc)
        return out

    @staticmethod
    def backward(ctx, g):
        x2, Wc = ctx.saved_tensors
        geo, S, rh = ctx.geo, ctx.geo.S, ctx.geo.rh
        gd = g if ctx.rows is None else ctx.rows(g)
        if gd.stride(-1) != 1:
            gd = gd.contiguous()
        need_x, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n_max = max(nf for _, _, nf, _ in geo.tiles())
        Wsb = _superblocks(Wc, geo, n_max) if n_max else None
        dx = x2.new_zeros(x2.shape[0], geo.d_in) if need_x else None  # contiguous: autograd adds it vectorised
        dWsb = Wc.new_zeros(n_max, S, S) if (need_w and n_max) else None
        dWc = torch.zeros_like(Wc) if need_w else None
        cache = {}
        for row0, w, nfull, in_end in geo.tiles():
            if nfull:
                gsb = _sb_view(gd, row0, nfull, S)
                if need_x:
                    _sb_view(dx, 0, nfull, S).baddbmm_(gsb, Wsb[:nfull])
                if need_w:
                    dWsb[:nfull].baddbmm_(gsb.transpose(1, 2), _sb_view(x2, 0, nfull, S))
            c0 = nfull * S
            if c0 < w:
                xt = _padded(x2, c0, in_end, geo.d_in, cache)
                k0, k1 = c0 // rh, in_end // rh
                gt = gd[:, row0 + c0:row0 + w]
                Wt = _blockdiag(Wc, k0, k1)[: w - c0]
                if need_x:
                    if in_end <= geo.d_in:
                        dx[:, c0:in_end].addmm_(gt, Wt)
                    else:  # wrapped input columns fold back onto x
                        dxt = gt @ Wt
                        a = c0
                        while a < in_end:
                            b = min(in_end, (a // geo.d_in + 1) * geo.d_in)
                            dx[:, a % geo.d_in:a % geo.d_in + b - a] += dxt[:, a - c0:b - c0]
                            a = b
                if need_w:
                    dWt = gt.t() @ xt  # [w - c0, in_end - c0]
                    for k in range(k0, k1):
                        r0 = (k - k0) * rh
                        if r0 < w - c0:
                            blk = dWt[r0:r0 + rh, r0:r0 + rh]
                            dWc[k, :blk.shape[0]] += blk
        if need_w and dWsb is not None:
            for j in range(geo.g):
                dWc[j:n_max * geo.g:geo.g] += dWsb[:, j * rh:(j + 1) * rh, j * rh:(j + 1) * rh]
        return g, dx, dWc, None, None
