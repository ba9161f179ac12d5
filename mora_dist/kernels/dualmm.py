"""Both skinny products of one matrix in a single pass: (M A, M^T B) for M [N, D], A [D, ka], B [N, kb].

Why: a LoRA term's gradients need g Q (for P's) and g^T H (for Q's) from the same output gradient
g [tokens, n_out]; as two cuBLAS GEMMs each streams all of g from memory (g of linear_fc1 is 470 MB a
micro-batch at the 8B shape). Here each program loads a [BM, BD] tile of M once and feeds it to both
dot products. M A is reduced over D inside a program's D range, M^T B over N across row blocks: fp32
partials per D range / row block, summed by torch in a fixed order (deterministic, as cuBLAS; fp32
atomics were 0.01-0.04 ms faster a layer at 8B and would make the last bits depend on timing),
rounded once. Timed per layer in `launch/bench_factor_grads.py` (docs/performance.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest padded rank it serves: at 8B the q/k/v layer (three r = 8 terms, padded to 32) ran 0.077 ms
# against cuBLAS's 0.057 (H200, CUDA-graph replay); at 16 it wins (o / down 0.037 vs 0.042, gate + up
# 0.198 vs 0.229).
MAX_K = 16


def config(D: int):
    """(BM, BD, num_warps, num_stages) for M's width D: wide tiles for gate + up's 28,672 columns."""
    return (256, 64, 8, 3) if D >= 16384 else (128, 64, 4, 3)


@triton.jit
def _dual_kernel(m_ptr, a_ptr, b_ptr, pa_ptr, pb_ptr, N, D, KA, KB, s_m, s_a, s_b, D_PER: tl.constexpr,
                 BM: tl.constexpr, BD: tl.constexpr, KAP: tl.constexpr, KBP: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr):
    pm, pd = tl.program_id(0), tl.program_id(1)
    rows = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    mr = rows < N
    ka, kb = tl.arange(0, KAP), tl.arange(0, KBP)
    Bt = tl.load(b_ptr + rows[:, None] * s_b + kb[None, :], mask=mr[:, None] & (kb < KB)[None, :], other=0.0)
    acc_a = tl.zeros((BM, KAP), dtype=ACC)
    for d0 in range(0, D_PER, BD):  # this program's D range (the last one cut by the mask)
        cols = pd * D_PER + d0 + tl.arange(0, BD)
        mc = cols < D
        Mt = tl.load(m_ptr + rows[:, None] * s_m + cols[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
        At = tl.load(a_ptr + cols[:, None] * s_a + ka[None, :], mask=mc[:, None] & (ka < KA)[None, :], other=0.0)
        acc_a = tl.dot(Mt, At, acc_a, out_dtype=ACC, input_precision=PREC)
        pb = tl.dot(tl.trans(Mt), Bt, out_dtype=ACC, input_precision=PREC)
        tl.store(pb_ptr + (pm * D + cols[:, None]) * KB + kb[None, :], pb, mask=mc[:, None] & (kb < KB)[None, :])
    tl.store(pa_ptr + (pd * N + rows[:, None]) * KA + ka[None, :], acc_a, mask=mr[:, None] & (ka < KA)[None, :])


def _pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def serves(ka: int, kb: int) -> bool:
    """Whether the pass beats the two GEMMs for these widths (MAX_K)."""
    return max(_pad(ka), _pad(kb)) <= MAX_K


def dual_mm(M: torch.Tensor, A: torch.Tensor, B: torch.Tensor, cfg=None):
    """(M @ A, M.t() @ B) in M's dtype (fp32 sums of half-precision input, fp64 for float64, one rounding).
    M [N, D] with unit column stride (a column slice of g serves); A [D, ka], B [N, kb]; `cfg`: (BM, BD,
    num_warps, num_stages) instead of `config(D)` (the microbench, the tests)."""
    N, D = M.shape
    assert M.stride(1) == 1 and A.shape[0] == D and B.shape[0] == N
    A, B = A.contiguous(), B.contiguous()
    BM, BD, warps, stages = cfg or config(D)
    ka, kb = A.shape[1], B.shape[1]
    acc = torch.float64 if M.dtype == torch.float64 else torch.float32
    n_m = triton.cdiv(N, BM)
    # enough programs for every SM a few times over; each D range a whole number of BD tiles
    n_d = max(1, min(triton.cdiv(D, BD), triton.cdiv(4 * _sms(M), n_m)))
    d_per = triton.cdiv(triton.cdiv(D, n_d), BD) * BD
    n_d = triton.cdiv(D, d_per)
    pa = torch.empty(n_d, N, ka, dtype=acc, device=M.device)
    pb = torch.empty(n_m, D, kb, dtype=acc, device=M.device)
    prec = "ieee" if M.dtype in (torch.float32, torch.float64) else "tf32"
    _dual_kernel[(n_m, n_d)](M, A, B, pa, pb, N, D, ka, kb, M.stride(0), A.stride(0), B.stride(0), D_PER=d_per,
                             BM=BM, BD=BD, KAP=_pad(ka), KBP=_pad(kb), ACC=tl.float64 if acc == torch.float64 else tl.float32,
                             PREC=prec, num_warps=warps, num_stages=stages)
    return pa.sum(0).to(M.dtype), pb.sum(0).to(M.dtype)


def _sms(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 4  # the interpreter: a few D ranges, so the partial sums over ranges are exercised
