"""Column-block sums that replace products with MoRA's 0/1 tile maps in the merged path's gradients.

`tile_sum(t, n, width)` = t Q for a tile decompress Q[j, s] = [s == j mod n] (zero columns up to
`width`); with `wrap` = x P^T for the strided compress (x padded to a multiple of n with its own
first columns); with `shift` the block sums of columns that start at flat position `shift` of the
tiling (a TP shard's rows). The GEMMs they replace cost 2 T d n FLOPs (90 GFLOP for a gate
projection at 8B, micro-batch 2 x 4,096); a sum reads t once. On the GPU one Triton pass
(`kernels/tilesum.py`); the torch form serves the CPU.
"""
from __future__ import annotations

import torch

from mora_dist.kernels import kernel_for


def _kernel(t: torch.Tensor):
    return kernel_for("tilesum", t, off="tilesum", unit_stride=True)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The sums' accumulation type: fp32 for half precision, else the input's."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def tile_sum(t: torch.Tensor, n: int, width: int, wrap: bool = False, shift: int = 0) -> torch.Tensor:
    """[T, width] in t's dtype: out[:, p] = sum over t's columns q with (q + shift) mod n == p
    (`wrap`: the columns of t padded to a multiple of n with its first ones, n <= t's columns;
    shift 0), fp32 sums of half-precision input rounded once; zero for p >= n."""
    kern = _kernel(t)
    if kern is not None:
        return kern.tile_sum(t, n, width, wrap, shift)
    return _torch_sum(t, n, width, wrap, shift).to(t.dtype)


def tile_sum_groups(t: torch.Tensor, groups, n: int, width: int) -> torch.Tensor:
    """tile_sum of the columns `groups` = ((column, count), ...) of t taken in that order as one
    flat run (q/k/v rows of the fused qkv layer, one group a query group), rounded once. On the GPU
    equal groups at a fixed stride (the fused layer's, `merged.RowBlocks`) are one kernel launch."""
    kern = _kernel(t)
    c0, w = groups[0]
    gs = groups[1][0] - c0 if len(groups) > 1 else w
    if kern is not None and gs >= w and all(g == (c0 + j * gs, w) for j, g in enumerate(groups)):
        return kern.tile_sum(t[:, c0:], n, width, groups=(len(groups), gs, w))
    out = t.new_zeros(t.shape[0], width, dtype=acc_dtype(t.dtype))
    flat = 0
    for c0, w in groups:  # any other columns (by torch)
        out += _torch_sum(t[:, c0:c0 + w], n, width, False, flat % n)
        flat += w
    return out.to(t.dtype)


def _torch_sum(t: torch.Tensor, n: int, width: int, wrap: bool, shift: int) -> torch.Tensor:
    """tile_sum in the accumulation type, by torch."""
    T, L = t.shape
    acc = acc_dtype(t.dtype)
    if shift:  # a shard's columns from flat position `shift` on: pad to whole blocks (CPU, small)
        nb = -(-(L + shift) // n)
        t = torch.cat([t.new_zeros(T, shift), t, t.new_zeros(T, nb * n - L - shift)], 1)
        L = t.shape[1]
    full = L // n
    out = t.new_zeros(T, width, dtype=acc)
    if full:
        out[:, :n] = t[:, :full * n].unflatten(1, (full, n)).sum(1, dtype=acc)
    rem = L - full * n
    if rem:
        out[:, :rem] += t[:, full * n:]
        if wrap:
            out[:, rem:n] += t[:, :n - rem]
    return out
