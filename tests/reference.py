"""Independent dense float64 references for every adapter's update dW (d_out x d_in).

Written from the papers / the MoRA authors' operator descriptions with explicit loops over
indices, sharing no code with `mora_dist`, so that a wrong index map in the library cannot be
reproduced here by construction.
"""
import math

import torch

D = torch.float64


def lora_dw(A, B, scale):
    return scale * B.to(D) @ A.to(D)


def vera_dw(A, B, d, b):
    return torch.diag(b.to(D)) @ B.to(D) @ torch.diag(d.to(D)) @ A.to(D)


def _sizes(d, rh):
    """Authors' contiguous grouping: m groups of d//rh + 1 first, then groups of d//rh."""
    nr = d // rh
    m = d - rh * nr
    return [nr + 1] * m + [nr] * (rh - m)


def _comp_matrix(kind, d_in, rh):
    C = torch.zeros(rh, d_in, dtype=D)
    if kind == "strided":  # x' = [x, x[:pad]] (cyclic), z_i = sum_c x'[c*rh + i]
        L = math.ceil(d_in / rh) * rh
        for p in range(L):
            C[p % rh, p % d_in] += 1
    elif kind == "contiguous":
        k = 0
        for g, size in enumerate(_sizes(d_in, rh)):
            for _ in range(size):
                C[g, k] = 1
                k += 1
        assert k == d_in
    elif kind == "truncation":
        for i in range(min(rh, d_in)):
            C[i, i] = 1
    return C


def _dec_matrix(kind, d_out, rh):
    Dm = torch.zeros(d_out, rh, dtype=D)
    if kind == "tile":
        for j in range(d_out):
            Dm[j, j % rh] = 1
    elif kind == "interleave":
        j = 0
        for g, size in enumerate(_sizes(d_out, rh)):
            for _ in range(size):
                Dm[j, g] = 1
                j += 1
        assert j == d_out
    elif kind == "truncation":
        for j in range(min(rh, d_out)):
            Dm[j, j] = 1
    return Dm


def _rotation(rh, c):
    """R_c: x -> x*cos + rotate_half(x)*sin, RoPE at position c."""
    h = rh // 2
    R = torch.zeros(rh, rh, dtype=D)
    for i in range(rh):
        theta = c * 10000 ** (-2 * (i % h) / rh)
        R[i, i] += math.cos(theta)
        # rotate_half(x)_i = -x_{i+h} (i < h), x_{i-h} (i >= h)
        if i < h:
            R[i, i + h] += -math.sin(theta)
        else:
            R[i, i - h] += math.sin(theta)
    return R


def mora_dw(M, d_in, d_out, mora_type):
    M = M.to(D)
    rh = M.shape[0]
    group = {1: ("strided", "tile"), 2: ("contiguous", "interleave"), 3: ("contiguous", "tile"),
             4: ("strided", "interleave"), "truncation": ("truncation", "truncation")}
    if mora_type in group:
        comp, dec = group[mora_type]
        return _dec_matrix(dec, d_out, rh) @ M @ _comp_matrix(comp, d_in, rh)
    # block types: blockdiag(M R_c) over the padded input, then rows j mod n*rh
    n = math.ceil(d_in / rh)
    L = n * rh
    blocks = torch.zeros(L, L, dtype=D)
    for c in range(n):
        R = _rotation(rh, c) if mora_type == 6 else torch.eye(rh, dtype=D)
        blocks[c * rh:(c + 1) * rh, c * rh:(c + 1) * rh] = M @ R
    pad_map = torch.zeros(L, d_in, dtype=D)  # x' = P x
    for p in range(L):
        pad_map[p, p % d_in] = 1
    rows = torch.zeros(d_out, L, dtype=D)
    for j in range(d_out):
        rows[j, j % L] = 1
    return rows @ blocks @ pad_map
