"""megatron's SwiGLU backward `swiglu_back(g, y)` as one elementwise pass.

Why: the compiled megatron formula (a `cat` of two halves) streamed at ~2.8 TB/s in isolation and
~2.2 TB/s inside the 8B step (0.41-0.54 ms a layer and micro-batch for 1.17 GB), where a pass that
reads y and the incoming gradient once and writes the result once streams at ~3.5-4 TB/s. Each
program takes a BLOCK_T x BLOCK_F tile of tokens x features, both halves of y in registers.

Arithmetic as the compiled formula: fp32 (fp64 for float64 inputs) from the stored values, s = sigmoid(y1),
dy1 = d s (1 + y1 (1 - s)) y2, dy2 = d y1 s, one rounding to y's dtype each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mora_dist.kernels import interpreted

BLOCK_T, BLOCK_F, NUM_WARPS = 4, 1024, 8


@triton.jit
def _round(x, DT: tl.constexpr, BITS: tl.constexpr):
    """x rounded to DT, to nearest even; BITS: by integer ops, fp32 to bf16 (the interpreter's cast
    truncates, triton 3.6; NaN / inf not handled, as the tests need none)."""
    if BITS:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _swiglu_back_kernel(y_ptr, d_ptr, g_ptr, T, F, s_y, s_d, s_g, ACC: tl.constexpr, RND: tl.constexpr,
                        BT: tl.constexpr, BF: tl.constexpr):
    ot = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    of = tl.program_id(1) * BF + tl.arange(0, BF)
    m = (ot < T)[:, None] & (of < F)[None, :]
    yp = y_ptr + ot[:, None] * s_y + of[None, :]
    y1 = tl.load(yp, mask=m, other=0.0).to(ACC)
    y2 = tl.load(yp + F, mask=m, other=0.0).to(ACC)
    d = tl.load(d_ptr + ot[:, None] * s_d + of[None, :], mask=m, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-y1))
    gp = g_ptr + ot[:, None] * s_g + of[None, :]
    dt = g_ptr.dtype.element_ty
    tl.store(gp, _round(d * s * (1.0 + y1 * (1.0 - s)) * y2, dt, RND), mask=m)
    tl.store(gp + F, _round(d * (y1 * s), dt, RND), mask=m)


def swiglu_back(dact: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g = [dL/dy1 | dL/dy2] [T, 2F] in y's dtype from dact = dL/d(silu(y1) y2) [T, F] and y = [y1 | y2]
    [T, 2F] (megatron's argument order); both with unit last stride."""
    T, F = dact.shape
    assert y.dim() == 2 and y.shape == (T, 2 * F) and y.stride(1) == 1 and dact.stride(1) == 1
    g = torch.empty(T, 2 * F, dtype=y.dtype, device=y.device)
    acc = tl.float64 if y.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(F, BLOCK_F))
    _swiglu_back_kernel[grid](y, dact, g, T, F, y.stride(0), dact.stride(0), g.stride(0), ACC=acc,
                              RND=interpreted() and y.dtype == torch.bfloat16, BT=BLOCK_T, BF=BLOCK_F,
                              num_warps=NUM_WARPS)
    return g
