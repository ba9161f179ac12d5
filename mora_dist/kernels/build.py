"""W = W0 + Q R in one pass over the weight: the merged-weight build of factor adapters.

Why: torch's out-of-place addmm first copies W0 into the output, then runs the GEMM with beta = 1,
which reads that copy back: four passes over the adapted weights. At the Llama-3-8B shape (7B
adapted weights, 14 GB in bf16) that was ~17 ms per build on an H200 (a 6.7 ms copy and an 11 ms
GEMM; docs/performance.md, 8B section). Here each program reads its tile of W0 once, adds the
tile's Q R (K = the layer's summed ranks, a few dozen: a short dot) and writes W once: two passes.
fp32 accumulation, one rounding to W's dtype, as addmm. `tile_add`: the same pass for MoRA sharing, whose
Q and P are tile maps, so its dW is M itself read at (row mod rh, column mod rh): no product at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _addmm_kernel(w0_ptr, q_ptr, r_ptr, out_ptr, N, D, K, s_w0, s_q, s_r, s_out,
                  NK: tl.constexpr, ACC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    nd = tl.cdiv(D, BD)
    on = (pid // nd) * BN + tl.arange(0, BN)
    od = (pid % nd) * BD + tl.arange(0, BD)
    mn, md = on < N, od < D
    acc = tl.zeros((BN, BD), dtype=ACC)
    for kb in range(NK):  # K blocks (a compile-time count: K is a layer's summed ranks)
        ok = kb * BK + tl.arange(0, BK)
        mk = ok < K
        q = tl.load(q_ptr + on[:, None] * s_q + ok[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        r = tl.load(r_ptr + ok[:, None] * s_r + od[None, :], mask=mk[:, None] & md[None, :], other=0.0)
        acc = tl.dot(q, r, acc, out_dtype=ACC)
    m = mn[:, None] & md[None, :]
    w0 = tl.load(w0_ptr + on[:, None] * s_w0 + od[None, :], mask=m, other=0.0).to(ACC)
    tl.store(out_ptr + on[:, None] * s_out + od[None, :], (w0 + acc).to(out_ptr.dtype.element_ty), mask=m)


def addmm(W0: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = W0 + Q @ R for W0 [N, D], Q [N, K], R [K, D] (row-major rows; `out` may be W0 itself)."""
    N, D = W0.shape
    K = Q.shape[1]
    Q, R = Q.contiguous(), R.contiguous()
    out = torch.empty_like(W0) if out is None else out
    assert W0.stride(1) == 1 and out.stride(1) == 1 and out.shape == W0.shape
    fp64 = W0.dtype == torch.float64
    BN, BD = (16, 32) if fp64 else (64, 128)
    BK = 16 if fp64 else max(16, min(64, triton.next_power_of_2(K)))
    grid = (triton.cdiv(N, BN) * triton.cdiv(D, BD),)
    _addmm_kernel[grid](W0, Q, R, out, N, D, K, W0.stride(0), Q.stride(0), R.stride(0), out.stride(0),
                        NK=triton.cdiv(K, BK), ACC=tl.float64 if fp64 else tl.float32, BN=BN, BD=BD, BK=BK, num_warps=4)
    return out


# tile_add's tile: rows x columns a program (bf16: 32 KB of W0 read and written a program)
TILE_BR, TILE_BD, TILE_WARPS = 32, 256, 8


@triton.jit
def _tile_add_kernel(src_ptr, out_ptr, m_ptr, rows_ptr, R, D, row0, nq, np_, pad, s_src, s_out, s_m,
                     INDEXED: tl.constexpr, WRAP: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr,
                     BD: tl.constexpr):
    k = tl.program_id(0) * BR + tl.arange(0, BR)  # the term's rows
    i = tl.program_id(1) * BD + tl.arange(0, BD)  # input columns
    mk, mi = k < R, i < D
    if INDEXED:
        r = tl.load(rows_ptr + k, mask=mk, other=0).to(tl.int64)
    else:
        r = (row0 + k).to(tl.int64)
    m = mk[:, None] & mi[None, :]
    mrow = m_ptr + (k % nq)[:, None] * s_m  # M's row of each term row (a few hundred KB: cache-resident)
    w = tl.load(src_ptr + r[:, None] * s_src + i[None, :], mask=m, other=0.0).to(ACC)
    w += tl.load(mrow + (i % np_)[None, :], mask=m, other=0.0).to(ACC)
    if WRAP:  # the first `pad` columns also fill the padded input's last block (x'[p] = x[p mod D])
        if tl.program_id(1) * BD < pad:
            w += tl.load(mrow + ((i + D) % np_)[None, :], mask=m & (i < pad)[None, :], other=0.0).to(ACC)
    tl.store(out_ptr + r[:, None] * s_out + i[None, :], w.to(out_ptr.dtype.element_ty), mask=m)


def tile_add(src: torch.Tensor, out: torch.Tensor, M: torch.Tensor, nq: int, np_: int, rows) -> torch.Tensor:
    """out[rows[k], i] = src[rows[k], i] + M[k mod nq, i mod np_] (+ M[k mod nq, (i + D) mod np_] for
    i < pad = ceil(D / np_) np_ - D): a MoRA sharing term's W0 + Q M P with Q, P its tile maps
    (`Factors.q_tile`, `p_tile`) in one pass over its rows, where a K = rh product costs 2 rh FLOPs a
    weight (cuBLAS's addmm at 8B: 1.5-2.2 TB/s, docs/performance.md). `rows`: (first, count) for
    consecutive layer rows, or a tensor of them (q/k/v in the fused qkv layer). fp32 sum, one rounding."""
    D = src.shape[1]
    assert src.stride(1) == 1 and out.stride(1) == 1 and out.shape == src.shape and M.stride(1) == 1
    assert nq <= M.shape[0] and np_ <= M.shape[1] and np_ <= D
    indexed = isinstance(rows, torch.Tensor)
    R = len(rows) if indexed else rows[1]
    pad = -(-D // np_) * np_ - D
    fp64 = src.dtype == torch.float64
    BR, BD = (16, 32) if fp64 else (TILE_BR, TILE_BD)
    grid = (triton.cdiv(R, BR), triton.cdiv(D, BD))
    _tile_add_kernel[grid](src, out, M, rows if indexed else src, R, D, 0 if indexed else rows[0], nq, np_, pad,
                           src.stride(0), out.stride(0), M.stride(0), INDEXED=indexed, WRAP=pad > 0,
                           ACC=tl.float64 if fp64 else tl.float32, BR=BR, BD=BD, num_warps=4 if fp64 else TILE_WARPS)
    return out
