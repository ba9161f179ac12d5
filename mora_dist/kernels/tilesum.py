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
def _tile_sum_kernel(src_ptr, out_ptr, T, L, n, width, shift, s_src, s_out, NB: tl.constexpr, WRAP: tl.constexpr,
                     ADD: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
                     U: tl.constexpr):
    ot = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    op = tl.program_id(1) * BP + tl.arange(0, BP)
    mt = (ot < T)[:, None]
    mp = op < n
    row = src_ptr + ot[:, None] * s_src
    acc = tl.zeros((BT, BP), dtype=ACC)
    for k0 in range(0, NB, U):
        for j in tl.static_range(U):  # U blocks' loads in flight at once (the loop is latency-bound, not pipelined)
            k = k0 + j
            # block k's first column (ALIGN divides it: masks cut only at vector boundaries, loads vectorise)
            q = tl.multiple_of(k * n - shift, ALIGN) + op
            ok = mp & (q >= 0) & (q < L)
            acc += tl.load(row + q[None, :], mask=mt & ok[None, :], other=0.0).to(ACC)
            if WRAP:  # columns past L read src's first ones (shift is 0 here)
                ow = mp & (q >= L) & (k < NB)
                acc += tl.load(row + (q - L)[None, :], mask=mt & ow[None, :], other=0.0).to(ACC)
    po = out_ptr + ot[:, None] * s_out + op[None, :]
    mo = mt & (op < width)[None, :]
    if ADD:  # into an accumulator of ACC's type (several column groups summed, one rounding at the end)
        acc += tl.load(po, mask=mo, other=0.0)
    tl.store(po, acc.to(out_ptr.dtype.element_ty), mask=mo)


def tile_sum(src: torch.Tensor, n: int, width: int, wrap: bool = False, shift: int = 0, out=None) -> torch.Tensor:
    """[T, width] in src's dtype: see the module docstring. src: [T, L] with unit column stride.
    `out`: a contiguous [T, width] accumulator of the accumulation type to add the sums into (returned)."""
    T, L = src.shape
    assert src.stride(1) == 1 and n <= width and not (wrap and shift) and (not wrap or n <= L)
    add = out is not None
    if add:
        assert out.shape == (T, width) and out.is_contiguous()
    else:
        out = torch.empty(T, width, dtype=src.dtype, device=src.device)
    nb = triton.cdiv(L + shift, n)
    acc = tl.float64 if src.dtype == torch.float64 else tl.float32
    align = math.gcd(8, n, shift, L if wrap else 0, src.stride(0), out.stride(0))
    grid = (triton.cdiv(T, BT), triton.cdiv(width, BP))
    _tile_sum_kernel[grid](src, out, T, L, n, width, shift, src.stride(0), out.stride(0), NB=nb, WRAP=wrap, ADD=add, ALIGN=align, ACC=acc,
                           BT=BT, BP=BP, U=min(UNROLL or (nb if nb <= 4 else 1), nb),
                           num_warps=NUM_WARPS)
    return out
