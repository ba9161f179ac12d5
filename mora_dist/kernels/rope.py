"""Rotary position embedding (megatron's non-interleaved `_apply_rotary_pos_emb_bshd`) as one pass
each way.

Why: the compiled megatron function ran at ~1 TB/s on an H200 at the Llama-3-8B shape (kernel
profile of the graphed LoRA step, results/perf/profiles_2026-11-30.tgz: forward 65 us and backward
101 us a call, 2 calls a layer and micro-batch, ~43 ms of a 2 s step for 41 GB a step), where a pass
that reads t once and writes the result once streams at ~3.5-4 TB/s. Here cos and sin are taken from
[s, d] tables made once a call (megatron computes them per element), and each program rotates
BLOCK_R rows of (token, batch, head) with their two halves in registers.

Arithmetic as the compiled megatron function: cos(freqs) * mscale and sin(freqs) * mscale rounded
to t's dtype, then t * cos + rotate_half(t) * sin in fp32 (fp64 for float64 inputs) and one rounding.
The backward is the transposed rotation: dt1 = g1 cos1 + g2 sin2, dt2 = g2 cos2 - g1 sin1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(t_ptr, cos_ptr, sin_ptr, out_ptr, R, B, H, s_t0, s_t1, s_t2, HALF: tl.constexpr,
                 BACKWARD: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # offsets past 2^31 at long s
    cols = tl.arange(0, BLOCK_D)
    mr, mc = rows < R, cols < HALF
    m = mr[:, None] & mc[None, :]
    h = rows % H
    b = (rows // H) % B
    s = rows // (H * B)
    src = (s * s_t0 + b * s_t1 + h * s_t2)[:, None] + cols[None, :]
    x1 = tl.load(t_ptr + src, mask=m, other=0.0).to(ACC)
    x2 = tl.load(t_ptr + src + HALF, mask=m, other=0.0).to(ACC)
    tab = (s * 2 * HALF)[:, None] + cols[None, :]
    c1 = tl.load(cos_ptr + tab, mask=m, other=0.0).to(ACC)
    c2 = tl.load(cos_ptr + tab + HALF, mask=m, other=0.0).to(ACC)
    s1 = tl.load(sin_ptr + tab, mask=m, other=0.0).to(ACC)
    s2 = tl.load(sin_ptr + tab + HALF, mask=m, other=0.0).to(ACC)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    dst = (rows * 2 * HALF)[:, None] + cols[None, :]
    tl.store(out_ptr + dst, y1.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(out_ptr + dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=m)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The kernel over t [s, b, h, d] (any strides with a unit last one) -> a contiguous [s, b, h, d]."""
    S, B, H, D = t.shape
    if t.stride(3) != 1:
        t = t.contiguous()
    out = torch.empty((S, B, H, D), dtype=t.dtype, device=t.device)
    R = S * B * H
    fp64 = t.dtype == torch.float64
    BLOCK_R = 8 if fp64 else 32
    _rope_kernel[(triton.cdiv(R, BLOCK_R),)](
        t, cos, sin, out, R, B, H, t.stride(0), t.stride(1), t.stride(2), D // 2,
        BACKWARD=backward, ACC=tl.float64 if fp64 else tl.float32, BLOCK_R=BLOCK_R,
        BLOCK_D=triton.next_power_of_2(D // 2), num_warps=4)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, backward=True), None, None


def supports(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether `apply` serves (t, freqs): t [s, b, h, d] with d even and a unit last stride, freqs
    [s, 1, 1, d] (the whole head rotated, one angle set per position, as megatron's GPT model makes it)."""
    return (t.dim() == 4 and freqs.dim() == 4 and t.shape[-1] % 2 == 0 and t.stride(-1) == 1
            and tuple(freqs.shape) == (t.shape[0], 1, 1, t.shape[-1]))


def apply(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """megatron's `_apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, mscale=mscale)` for
    `supports(t, freqs)`; differentiable in t."""
    return _Rope.apply(t, *_tables(freqs, t.dtype, mscale))


def _tables(freqs: torch.Tensor, dtype, mscale: float) -> tuple:
    """(cos, sin) [s, d] of freqs in t's dtype, kept on the freqs tensor: megatron's rotary embedding
    returns one cached freqs for every layer (2 calls a layer), so the tables are made once, not 64
    times a forward (6 small kernels a call at 8B)."""
    key = (dtype, float(mscale), freqs._version)
    cache = getattr(freqs, "_rope_tables", None)
    if cache is None or cache[0] != key:
        f = freqs.reshape(freqs.shape[0], freqs.shape[-1])
        cache = (key, (torch.cos(f) * mscale).to(dtype).contiguous(), (torch.sin(f) * mscale).to(dtype).contiguous())
        freqs._rope_tables = cache
    return cache[1], cache[2]
