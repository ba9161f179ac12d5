"""Both skinny products of a layer's output gradient in one read of it: E = g^T H and D = g Q.

Why: a LoRA-like factor term needs E = g^T H (its Q's gradient, H = x P^T) and D = g Q (the way back to
its P), two GEMMs with K = tokens and K = d_out that each stream all of g [T, N] from memory (cuBLAS
runs them at ~4 TB/s, but g is read twice: at the 8B shape ~90 GB a step). Here each program keeps a
BN-column block of g's features and walks its share of the tokens: every BT x BN tile of g is loaded
once and feeds both tensor-core products, E's rows of the block accumulated in registers, D's partial
sums over the block added into an fp32 D with atomics (the only cross-program traffic: T x K x 4
bytes per column block, ~1/8 of g at BN = 256, K = 16).

Results in fp32 (accumulated from g's stored values); the caller rounds. D's atomics make its last bits
depend on the order programs finish: MORA_DIST_NO_KERNEL=skinny (merged.py) runs the two GEMMs instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mora_dist.kernels import interpreted

# (BT, BN, warps, stages, GB): GB puts g as the second operand of both products (M = K rows, g from shared
# memory) instead of the first (M = BN / BT rows, tensor-core instructions that want M >= 64).
TILES = (64, 256, 8, 1, False)
MAX_K = 64


@triton.jit
def _skinny_kernel(g_ptr, h_ptr, q_ptr, e_ptr, d_ptr, T, N, s_gt, s_gn, ITERS: tl.constexpr, BT: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, GB: tl.constexpr):
    """H [T, BK] and Q [N, BK] zero-padded to BK columns; E [N, BK] and D [T, BK] fp32 zeros (accumulated)."""
    on = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = tl.arange(0, BK)
    mn = on < N
    t0 = tl.program_id(1) * (ITERS * BT)  # a program's tokens: ITERS whole tiles, disjoint from the others'
    if GB:
        qT = tl.load(q_ptr + on[None, :] * BK + ok[:, None], mask=mn[None, :], other=0.0)  # [BK, BN]
        eT = tl.zeros((BK, BN), dtype=e_ptr.dtype.element_ty)
        for i in range(ITERS):
            ot = (t0 + i * BT + tl.arange(0, BT)).to(tl.int64)
            mt = ot < T
            g = tl.load(g_ptr + ot[:, None] * s_gt + on[None, :] * s_gn, mask=mt[:, None] & mn[None, :], other=0.0)
            hT = tl.load(h_ptr + ot[None, :] * BK + ok[:, None], mask=mt[None, :], other=0.0)  # [BK, BT]
            eT += tl.dot(hT, g)
            tl.atomic_add(d_ptr + ot[None, :] * BK + ok[:, None], tl.dot(qT, tl.trans(g)), mask=mt[None, :])
        ep = e_ptr + on[None, :] * BK + ok[:, None]
        if SPLIT:
            tl.atomic_add(ep, eT, mask=mn[None, :])
        else:
            tl.store(ep, eT, mask=mn[None, :])
    else:
        q = tl.load(q_ptr + on[:, None] * BK + ok[None, :], mask=mn[:, None], other=0.0)  # [BN, BK]
        e = tl.zeros((BN, BK), dtype=e_ptr.dtype.element_ty)
        for i in range(ITERS):
            ot = (t0 + i * BT + tl.arange(0, BT)).to(tl.int64)
            mt = ot < T
            g = tl.load(g_ptr + ot[:, None] * s_gt + on[None, :] * s_gn, mask=mt[:, None] & mn[None, :], other=0.0)
            h = tl.load(h_ptr + ot[:, None] * BK + ok[None, :], mask=mt[:, None], other=0.0)
            e += tl.dot(tl.trans(g), h)
            tl.atomic_add(d_ptr + ot[:, None] * BK + ok[None, :], tl.dot(g, q), mask=mt[:, None])
        ep = e_ptr + on[:, None] * BK + ok[None, :]
        if SPLIT:
            tl.atomic_add(ep, e, mask=mn[:, None])
        else:
            tl.store(ep, e, mask=mn[:, None])


def _programs() -> int:
    """About two programs per SM (4 under the interpreter, so the CPU tests cover the token split)."""
    if interpreted() or not torch.cuda.is_available():
        return 4
    return 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def supports(g: torch.Tensor, K: int) -> bool:
    """Whether the kernel serves this g (2-D, half precision on CUDA; any float under the interpreter) at K."""
    half = g.dtype in (torch.bfloat16, torch.float16)
    return g.dim() == 2 and 0 < K <= MAX_K and ((g.is_cuda and half) or (interpreted() and g.is_floating_point()))


def both_products(g: torch.Tensor, H: torch.Tensor, Q: torch.Tensor, tiles=None):
    """(E = g^T H [N, K], D = g Q [T, K]) in fp32 (float64 for float64 g: the interpreter's checks), for g [T, N]
    (any strides), H [T, K], Q [N, K] in g's dtype. `tiles`: TILES's form, for the benches."""
    T, N = g.shape
    K = H.shape[1]
    assert H.shape == (T, K) and Q.shape == (N, K) and supports(g, K)
    bt, bn, warps, stages, gb = tiles or TILES
    bk = max(16, triton.next_power_of_2(K))
    if interpreted() and g.dtype in (torch.bfloat16, torch.float16):  # its dot reads half precision as raw
        g = g.float()  # bits: the same values in fp32 (their products are exact)
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    Hp, Qp = g.new_zeros(T, bk), g.new_zeros(N, bk)  # zero columns up to BK: unmasked, aligned rows
    Hp[:, :K], Qp[:, :K] = H, Q
    E = g.new_zeros(N, bk, dtype=acc)
    D = g.new_zeros(T, bk, dtype=acc)
    nb = triton.cdiv(N, bn)
    split = max(1, min(triton.cdiv(_programs(), nb), triton.cdiv(T, bt)))
    t_per = triton.cdiv(triton.cdiv(T, split), bt) * bt
    split = triton.cdiv(T, t_per)
    _skinny_kernel[(nb, split)](g, Hp, Qp, E, D, T, N, g.stride(0), g.stride(1), ITERS=t_per // bt, BT=bt, BN=bn,
                                BK=bk, SPLIT=split > 1, GB=gb, num_warps=warps, num_stages=stages)
    return E[:, :K], D[:, :K]
