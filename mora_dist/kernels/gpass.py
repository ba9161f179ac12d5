"""E = g^T H and Z = g Q in one pass over g: the factor-gradient products of the merged path.

Why: `parallel/merged.py::_factor_grads` needs, for a LoRA-type term whose P trains, both E = g^T H
([n, k], Q's and mid's gradients) and g Q ([T, k2], through dH to P's gradient) from the same rows of
the layer's output gradient g [T, n]. As two GEMMs (K or N = the rank, 8..64) each streams all of g
from HBM; at the Llama-3-8B shape those skinny GEMMs were ~70 ms of LoRA's +90 ms a step over the
frozen base (H200, 4 micro-batches of 2 x 4,096 tokens; docs/performance.md, 8B section). Here each
program loads a tile of g once and feeds it to both dots.

Tiling (deterministic: no atomics): program (j, s) owns g's column block j (BN columns) and token
split s (TS = NIT x BT tokens, walked BT at a time). E's rows of the block stay in registers over
the split (E partial per split: [n_split, n, k] fp32, summed after); Z's tile of each BT tokens is
complete over the block's columns only (Z partial per column block: [n_blocks, T, k2] fp32, summed
after). Those partials cost 2 * 4 * (k / TS + k2 / BN) bytes, written and read back, per byte of g
(BN = 512, k2 = 8: ~6%), against a second full read of g. fp32 accumulation (fp64 for float64
inputs, the CPU checks), one rounding to g's dtype at the end, as the GEMMs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_SMS: dict = {}


def config(N: int, T: int, kp: int, device, BN: int = 0, BT: int = 0, per_sm: int = 2,
           num_warps: int = 8, num_stages: int = 3) -> dict:
    """The tiling for g [T, N] with accumulators kp wide (k and k2 padded to a power of two >= 16):
    BN, BT, NIT (token blocks a program walks: a power of two, so varying T compiles few variants)
    and launch options. BN: as wide as the registers allow (E's [BN, kp] fp32 accumulator and Q's
    [BN, kp] tile live across the loop), for long contiguous row segments of g and few Z partials;
    BT: 32 KiB bf16 tiles; NIT: about `per_sm` programs per SM. Picked from the bandwidth argument
    above, not yet timed on a GPU (`launch/bench.py --gpass` times these defaults against
    alternatives given here)."""
    BN = BN or (512 if kp <= 32 else 256)
    BT = BT or 16384 // BN
    if device.type == "cuda":
        if device not in _SMS:
            _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        target = per_sm * _SMS[device]
    else:
        target = 4
    per = triton.cdiv(triton.cdiv(T, BT), triton.cdiv(target, triton.cdiv(N, BN)))
    return dict(BN=BN, BT=BT, NIT=triton.next_power_of_2(max(1, per)), num_warps=num_warps, num_stages=num_stages)


@triton.jit
def _gpass_kernel(g_ptr, h_ptr, q_ptr, e_ptr, z_ptr, T, N, K, K2, sg, sh, sq, ACC: tl.constexpr,
                  BN: tl.constexpr, BT: tl.constexpr, NIT: tl.constexpr, KP: tl.constexpr, K2P: tl.constexpr):
    j = tl.program_id(0)  # column block of g
    s = tl.program_id(1)  # token split
    on = j * BN + tl.arange(0, BN)
    ok = tl.arange(0, KP)
    ok2 = tl.arange(0, K2P)
    mn, mk, mk2 = on < N, ok < K, ok2 < K2
    q = tl.load(q_ptr + on[:, None] * sq + ok2[None, :], mask=mn[:, None] & mk2[None, :], other=0.0)
    e = tl.zeros((BN, KP), dtype=ACC)
    for it in range(NIT):  # a compile-time count (a power of two): the loop pipelines; past T all masked
        ot = s * (NIT * BT) + it * BT + tl.arange(0, BT)
        mt = ot < T
        a = tl.load(g_ptr + ot[:, None].to(tl.int64) * sg + on[None, :], mask=mt[:, None] & mn[None, :], other=0.0)
        h = tl.load(h_ptr + ot[:, None] * sh + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        e = tl.dot(tl.trans(a), h, e, out_dtype=ACC)
        z = tl.dot(a, q, out_dtype=ACC)  # this column block's share of Z's rows ot
        zp = z_ptr + (j * T + ot[:, None]).to(tl.int64) * K2 + ok2[None, :]
        tl.store(zp, z, mask=mt[:, None] & mk2[None, :])
    ep = e_ptr + (s * N + on[:, None]).to(tl.int64) * K + ok[None, :]
    tl.store(ep, e, mask=mn[:, None] & mk[None, :])


def gpass(g: torch.Tensor, H: torch.Tensor, Q: torch.Tensor, cfg: dict | None = None):
    """(g^T H [N, k], g Q [T, k2]) in g's dtype for g [T, N], H [T, k], Q [N, k2], reading g once.
    `cfg`: a tiling other than `config`'s (the tests' small tiles, the bench's sweep)."""
    T, N = g.shape
    K, K2 = H.shape[1], Q.shape[1]
    if g.numel() == 0:
        return g.new_zeros(N, K), g.new_zeros(T, K2)
    g, H, Q = (t if t.stride(1) == 1 else t.contiguous() for t in (g, H, Q))
    kp, k2p = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(K2))
    cfg = cfg or config(N, T, max(kp, k2p), g.device)
    BN, BT, NIT = cfg["BN"], cfg["BT"], cfg["NIT"]
    split, nb = triton.cdiv(T, NIT * BT), triton.cdiv(N, BN)
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    e_part = torch.empty(split, N, K, device=g.device, dtype=acc)
    z_part = torch.empty(nb, T, K2, device=g.device, dtype=acc)
    _gpass_kernel[(nb, split)](g, H, Q, e_part, z_part, T, N, K, K2, g.stride(0), H.stride(0), Q.stride(0),
                               ACC=tl.float64 if acc == torch.float64 else tl.float32, BN=BN, BT=BT, NIT=NIT,
                               KP=kp, K2P=k2p, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return e_part.sum(0).to(g.dtype), z_part.sum(0).to(g.dtype)
