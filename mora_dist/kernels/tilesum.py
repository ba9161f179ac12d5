"""Column-block sums of an activation matrix in one pass (`adapters/tiles.tile_sum` dispatches).

out[t, p] = sum_k src[t, k n + p - shift] over the columns inside [0, L) (WRAP: x'[q] = src[q mod L],
the strided-compress padding, shift 0), fp32 accumulation (fp64 for float64), one rounding, zero
for p in [n, width). Why: MoRA's tile maps (sharing's compress / decompress) and the tiled rows of its
block types (rotation / decouple rows read the flat output mod L) need g or x summed over column
blocks; torch does it as a reduction into an fp32 buffer plus copies, casts and adds for partial
blocks (~5 kernels, the fp32 intermediate written and read back), this reads src once and writes the
sum once. Every load is contiguous in p: the wrap is a second masked load, not an index modulo.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BT, BP, NUM_WARPS = 16, 256, 4
# Column blocks a loop step; None: all of them when there are <= 4 (the block types' fold of g, 4 blocks at 8B:
# 0.093 -> 0.078 ms at 4), else 1 (sharing's g Q over 38 blocks: 0.107 ms at 1, 0.133 at 4); H200,
# `launch/bench_rotgrad.py --tilesum` (results/perf/s9_call4/tilesum.txt), which sets it to time 1 / 2 / 4.
UNROLL = None


@triton.jit
def _tile_sum_kernel(src_ptr, out_ptr, T, L, n, width, shift, gs, s_src, s_out, G: tl.constexpr, NB: tl.constexpr,
                     WRAP: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
                     U: tl.constexpr):
    ot = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    op = tl.program_id(1) * BP + tl.arange(0, BP)
    mt = (ot < T)[:, None]
    mp = op < n
    row = src_ptr + ot[:, None] * s_src
    acc = tl.zeros((BT, BP), dtype=ACC)
    for gi in range(G):  # groups of L columns gs apart, one flat run: group gi starts at flat shift + gi L
        sh = (shift + gi * L) % n
        for k0 in range(0, NB, U):
            for j in tl.static_range(U):  # U blocks' loads in flight at once (the loop is latency-bound, not pipelined)
                k = k0 + j
                # block k's first column (ALIGN divides it: masks cut only at vector boundaries, loads vectorise)
                c = tl.multiple_of(gi * gs + k * n - sh, ALIGN)
                q = k * n - sh + op
                ok = mp & (q >= 0) & (q < L)
                acc += tl.load(row + (c + op)[None, :], mask=mt & ok[None, :], other=0.0).to(ACC)
                if WRAP:  # columns past L read src's first ones (one group, shift 0)
                    ow = mp & (q >= L) & (k < NB)
                    acc += tl.load(row + (q - L)[None, :], mask=mt & ow[None, :], other=0.0).to(ACC)
    po = out_ptr + ot[:, None] * s_out + op[None, :]
    mo = mt & (op < width)[None, :]
    tl.store(po, acc.to(out_ptr.dtype.element_ty), mask=mo)


def tile_sum(src: torch.Tensor, n: int, width: int, wrap: bool = False, shift: int = 0,
             groups: tuple = (1, 0, None)) -> torch.Tensor:
    """[T, width] in src's dtype: see the module docstring. src: [T, L] with unit column stride.
    `groups` = (G, gs, w): src's columns g gs + [0, w) for g < G taken in that order as one flat run (q/k/v
    rows of the fused qkv layer, a query group each) in one launch; (1, 0, None): all of src's columns."""
    T, Ls = src.shape
    G, gs, L = groups
    L = Ls if L is None else L
    assert src.stride(1) == 1 and n <= width and not (wrap and (shift or G > 1)) and (not wrap or n <= L)
    assert (G - 1) * gs + L <= Ls and (G == 1 or gs >= L)
    out = torch.empty(T, width, dtype=src.dtype, device=src.device)
    nb = triton.cdiv(L + (shift if G == 1 else n - 1), n)  # blocks a group touches (its shift < n)
    acc = tl.float64 if src.dtype == torch.float64 else tl.float32
    align = math.gcd(8, n, shift, L if wrap or G > 1 else 0, gs, src.stride(0), out.stride(0))
    grid = (triton.cdiv(T, BT), triton.cdiv(width, BP))
    _tile_sum_kernel[grid](src, out, T, L, n, width, shift, gs, src.stride(0), out.stride(0), G=G, NB=nb, WRAP=wrap,
                           ALIGN=align, ACC=acc, BT=BT, BP=BP, U=min(UNROLL or (nb if nb <= 4 else 1), nb),
                           num_warps=NUM_WARPS)
    return out
