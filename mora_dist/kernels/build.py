"""W = W0 + Q R in one pass over the weight: the merged-weight build of factor adapters.

Why: torch's out-of-place addmm first copies W0 into the output, then runs the GEMM with beta = 1,
which reads that copy back: four passes over the adapted weights. At the Llama-3-8B shape (7B
adapted weights, 14 GB in bf16) that was ~17 ms per build on an H200 (a 6.7 ms copy and an 11 ms
GEMM; docs/performance.md, 8B section). Here each program reads its tile of W0 once, adds the
tile's Q R (K = the layer's summed ranks, a few dozen: a short dot) and writes W once: two passes.
fp32 accumulation, one rounding to W's dtype, as addmm.
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
