"""MoRA (Jiang et al. 2024, arXiv 2405.12130): a square trainable M in R^{rh x rh}, zero at start,
y = W0 x + f_decomp(M f_comp(x)), no alpha scaling. rh = int(sqrt((d_in + d_out) r) + 0.5) gives
the parameter count of LoRA rank r on the same layer.

Operators, checked against the authors' `_apply_mora` (github kongds/MoRA, peft-mora
src/peft/tuners/lora/layer.py, read 2026-11-24), numbered by their `mora_type`:
- group types 1-4 compress x into rh group sums and decompress by reading group outputs:
  compress "strided" (1, 4): pad x to a multiple of rh with its own first entries
  (x'[p] = x[p mod d_in]; the authors' `cat([x, x[:pad]])`) and sum x'[c*rh + i] over c;
  compress "contiguous" (2, 3): no padding, m = d_in - rh*floor(d_in/rh) groups of ceil(d_in/rh)
  entries, then groups of floor(d_in/rh);
  decompress "tile" (1, 3): out_j = y[j mod rh]; "interleave" (2, 4): the contiguous grouping of
  d_out rows (repeat_interleave). 1 = sharing (paper Eq. 6).
- block types: cut x' into n = ceil(d_in/rh) chunks, chunk c -> M R_c x'_c, flatten the n*rh
  outputs and read out_j = flat[j mod n*rh] (first d_out, tiled when n*rh < d_out).
  6 = rotation (paper Eq. 9): R_c rotates like RoPE at position c with inv_freq_i = 10000^(-2i/rh):
  x_c*cos + rotate_half(x_c)*sin, rotate_half(v) = [-v[rh/2:], v[:rh/2]] (rh must be even);
  "decouple": R_c = I (paper's ablation).
- "truncation" (ablation): f_comp(x) = x[:rh], f_decomp(y) = [y; 0].
Generalisations where the authors' code fails: when pad > d_in, x'[p] = x[p mod d_in]; rotation
with an odd rh (e.g. 181 for a 2048x2048 layer at r=8) uses rh - 1.

All operators are written as index maps of the *global* layer, so any shard (a slice of input
columns, any set of output rows) is served by the same code: column-parallel ranks compute
M f_comp(x) once (replicated, rh values per token) and read their rows; row-parallel ranks
compress only their input columns into partial group sums (block types: their chunks), which the
layer's reduction adds up. The merged-weight path serves every shard of every type (`factors`;
`block_operator`, whose row-shard geometry cuts the chunks at the shard's input columns).
`delta_weight` applies the same operators to the identity, as the authors' `get_delta_weight` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mora_dist.adapters import blockdiag
from mora_dist.adapters.base import Adapter, Factors, MethodConfig, Shard, register, to_rows

ROTATION = 6  # the authors' number for the rotation operator
# adapter.mora_type (names or the authors' numbers) -> the operator type used everywhere below
MORA_TYPES = {"sharing": 1, "type1": 1, "type2": 2, "type3": 3, "type4": 4, "rotation": ROTATION,
              "decouple": "decouple", "truncation": "truncation", 1: 1, 2: 2, 3: 3, 4: 4, ROTATION: ROTATION}
GROUP_TYPES = {1: ("strided", "tile"), 2: ("contiguous", "interleave"), 3: ("contiguous", "tile"),
               4: ("strided", "interleave")}
# ReMoRA's type schedules at restarts (`restarts.mora_types`): the paper's Appendix B alternates two
# groupings (1 -> 2 -> 1); the authors' released ResetReloraCallback cycles all four (1 -> 2 -> 3 -> 4 -> 1)
PAPER_CYCLE = (1, 2)
RELEASED_CYCLE = (1, 2, 3, 4)


def cycle_of(types) -> tuple:
    """`restarts.mora_types` (names or numbers) as operator types; ValueError for anything but distinct
    grouping types 1-4."""
    out = tuple(MORA_TYPES.get(t) if isinstance(t, (int, str)) and not isinstance(t, bool) else None for t in types)
    if not out or any(t not in GROUP_TYPES for t in out) or len(set(out)) != len(out):
        raise ValueError(f"restarts.mora_types must be distinct grouping types 1-4 (e.g. [1, 2]), got {list(types)!r}")
    return out


def cycled_type(t, n: int, cycle: tuple = PAPER_CYCLE):
    """The operator type `n` restarts after `t` on `cycle` (types outside the cycle stay)."""
    return cycle[(cycle.index(t) + n) % len(cycle)] if t in cycle else t


def mora_rank(d_in: int, d_out: int, r: int) -> int:
    """Side of M giving LoRA rank r's parameter count (authors' rounding)."""
    return int(math.sqrt((d_in + d_out) * r) + 0.5)


def contiguous_groups(d: int, rh: int) -> torch.Tensor:
    """Group of each of d entries split into rh contiguous groups, the larger groups first."""
    nr = d // rh
    m = d - rh * nr  # groups of nr + 1
    idx = torch.arange(d)
    big = m * (nr + 1)
    if nr == 0:
        return idx
    return torch.where(idx < big, idx // (nr + 1), m + (idx - big).clamp(min=0) // nr)


@dataclass
class MoRAConfig(MethodConfig):
    method: str = "mora"
    mora_type: object = "sharing"  # sharing|rotation|decouple|truncation|type1..type4 or the authors' numbers

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.mora_type, bool) or self.mora_type not in MORA_TYPES:
            raise ValueError(f"adapter.mora_type: unknown MoRA type {self.mora_type!r}; "
                             f"choose one of {sorted(map(str, MORA_TYPES))}")

    @classmethod
    def canonical_value(cls, key: str, value):
        return MORA_TYPES.get(value, value) if key == "mora_type" else value


@register("mora", MoRAConfig)
class MoRA(Adapter):
    layout = {"M": None}

    def on_restart(self, generator: torch.Generator, cycle_types: tuple) -> None:
        """ReMoRA: M back to zero and the next grouping on the `cycle_types` schedule (empty: keep the type)."""
        self.reset_parameters(generator)
        if self.type in cycle_types:
            self.set_type(cycled_type(self.type, 1, cycle_types))

    def after_restarts(self, n: int, cycle_types: tuple) -> None:
        if self.type in cycle_types:
            self.set_type(cycled_type(self.type, n, cycle_types))

    def __init__(self, cfg: MoRAConfig, shard: Shard, seed: int = 0, rh: int | None = None):
        super().__init__(cfg, shard)
        if rh is None:
            rh = mora_rank(shard.d_in, shard.d_out, cfg.r)
            if MORA_TYPES[cfg.mora_type] == ROTATION and rh % 2:
                rh -= 1  # rotation pairs entries (rh/2 frequencies); the authors' code fails on odd rh
        self.rh = rh
        self.M = nn.Parameter(torch.zeros(self.rh, self.rh))
        self.set_type(cfg.mora_type)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        self.M.zero_()

    def set_type(self, mora_type) -> None:
        """(Re)build the index maps for an operator type (ReMoRA switches type at restarts)."""
        t = MORA_TYPES[mora_type]
        if t == ROTATION and self.rh % 2:
            raise ValueError(f"MoRA rotation needs an even rh, got rh={self.rh} "
                             f"(d_in={self.shard.d_in}, d_out={self.shard.d_out}, r={self.cfg.r})")
        self.type = t
        self._q_tile = self._p_tile = None
        s, rh = self.shard, self.rh
        cols = torch.arange(s.in_start, s.in_end)
        if t in GROUP_TYPES:
            comp, dec = GROUP_TYPES[t]
            if comp == "strided":
                src, grp = self._padded_positions(cols)
                grp = grp % rh
                if s.in_start == 0 and s.in_end == s.d_in and rh <= s.d_in:
                    self._p_tile = rh  # slot s sums input columns i = s mod rh (Factors.p_tile)
            else:
                src, grp = cols - s.in_start, contiguous_groups(s.d_in, rh)[cols]
            rows = s.out_rows % rh if dec == "tile" else contiguous_groups(s.d_out, rh)[s.out_rows]
            r0 = int(s.out_rows[0]) if len(s.out_rows) else 0
            if dec == "tile" and r0 % rh == 0 and torch.equal(s.out_rows, torch.arange(r0, r0 + len(s.out_rows))):
                self._q_tile = rh  # decompress = local row k reads slot k mod rh (Factors.q_tile)
        elif t == "truncation":
            keep = cols < rh
            src, grp = (cols - s.in_start)[keep], cols[keep]
            rows = torch.where(s.out_rows < rh, s.out_rows, torch.full_like(s.out_rows, rh))  # rh: zero slot
        else:  # block types: positions in the padded input / flat output
            n = -(-s.d_in // rh)
            src, grp = self._padded_positions(cols)
            rows = s.out_rows % (n * rh)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, rh, 2, dtype=torch.float64) / rh))
            ang = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq).repeat(1, 2)
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)
            self.n_chunks = n
        for name, val in (("src", src), ("grp", grp), ("rows", rows)):
            self.register_buffer(name, val.to(self.M.device), persistent=False)
        self._maps_cache = {}

    def _padded_positions(self, cols):
        """(local column, position in x') pairs: x'[p] = x[p mod d_in] for p < ceil(d_in/rh)*rh."""
        s, L = self.shard, -(-self.shard.d_in // self.rh) * self.rh
        srcs, poss = [], []
        for k in range(-(-L // s.d_in)):
            p = cols + k * s.d_in
            keep = p < L
            srcs.append((cols - s.in_start)[keep])
            poss.append(p[keep])
        return torch.cat(srcs), torch.cat(poss)

    # --- operators -------------------------------------------------------------------------
    def _scatter(self, x, size):
        """Sum the local input columns into `size` slots (group sums or padded positions)."""
        out = x.new_zeros(*x.shape[:-1], size)
        return out.index_add_(-1, self.grp, x.index_select(-1, self.src))

    def _rotate(self, xc):
        if self.type != ROTATION:
            return xc
        h = self.rh // 2
        rot = torch.cat((-xc[..., h:], xc[..., :h]), dim=-1)
        return xc * self.cos.to(xc.dtype) + rot * self.sin.to(xc.dtype)

    def _read_rows(self, y):
        if self.type == "truncation":
            y = torch.cat((y, y.new_zeros(*y.shape[:-1], 1)), dim=-1)
        return y.index_select(-1, self.rows)

    # --- unsharded (TP=1) fast path: the index maps as skinny GEMMs --------------------------
    @property
    def rh_pad(self) -> int:
        """rh rounded up to 8: bf16 GEMM operands of width rh (181, 136, 248...) are not 16-byte
        aligned and cuBLAS falls back to slow sm75 `align1` kernels (22 ms a step of MoRA sharing on
        the 1.1B model, H100). Zero rows/columns pad every factor; results are unchanged."""
        return -(-self.rh // 8) * 8

    def _maps(self, dtype, device):
        """Dense 0/1 compress C [rh_pad, local_in] and decompress D [rows, rh_pad] of the group
        types, built once per dtype/device from the index maps (exact in bf16: small counts)."""
        key = (dtype, device)
        if key not in self._maps_cache:
            C = torch.zeros(self.rh_pad, self.shard.local_in, dtype=torch.float64)
            C.index_put_((self.grp.cpu(), self.src.cpu()), torch.ones(len(self.src), dtype=torch.float64),
                         accumulate=True)
            rows = self.rows.cpu()
            D = torch.zeros(len(rows), self.rh_pad + 1, dtype=torch.float64)
            D[torch.arange(len(rows)), torch.where(rows == self.rh, self.rh_pad, rows)] = 1.0  # rh: zero slot
            self._maps_cache = {key: (C.to(device=device, dtype=dtype), D[:, :self.rh_pad].to(device=device, dtype=dtype))}
        return self._maps_cache[key]

    def factors(self, dtype, cast: bool = True):
        """Group types: P = compress (0/1), mid = M, Q = decompress (0/1), padded to rh_pad;
        block types: None."""
        if not self.fast or not (self.type in GROUP_TYPES or self.type == "truncation"):
            return None
        C, D = self._maps(dtype, self.M.device)
        comp = "truncation" if self.type == "truncation" else GROUP_TYPES[self.type][0]
        key = ("mora", comp, self.rh, self.shard.d_in, self.shard.in_start, self.shard.in_end, self.M.device)
        p = self.rh_pad - self.rh
        M = self.merged_param("M")
        mid = torch.nn.functional.pad(M, (0, p, 0, p)) if p else M
        return Factors(P=C, mid=mid.to(dtype) if cast else mid, Q=D, p_key=key, q_tile=self._q_tile, p_tile=self._p_tile)

    def block_operator(self):
        """Block types on any shard: (geometry, M, rotation tables (cos, sin) [n_used, rh] in M's
        dtype, or None for decouple) for the merged-weight path (`blockdiag`: W_c = M R_c, placed at
        the shard's global adapter rows); None for the other types. A row-parallel shard's geometry
        carries its input columns (`Geometry.cols`): its update is the global one's columns there,
        chunk pieces cut at the shard's edges (chunks crossing shards, the wrapped last chunk, and
        shards holding no used chunk are all served), and its M gradient is a partial that
        `merged_param` sums over TP, as for a column shard."""
        if not self.fast or self.type in GROUP_TYPES or self.type == "truncation":
            return None
        s = self.shard
        geo = blockdiag.geometry(self.rh, s.d_in, s.d_out, (s.in_start, s.in_end) if s.mode == "row" else None)
        M = self.merged_param("M")
        if self.type != ROTATION:
            return geo, M, None
        key = (self.M.dtype, self.M.device, geo.n_used)
        if key not in self._maps_cache:  # made once (outside CUDA graph capture: the warm-up does it)
            self._maps_cache[key] = tuple(t[:geo.n_used].to(self.M.dtype).contiguous() for t in (self.cos, self.sin))
        return geo, M, self._maps_cache[key]

    def forward(self, x):
        if self.unsharded:
            fac = self.factors(x.dtype)
            if fac is not None:
                return ((x @ fac.P.t()) @ fac.mid.t()) @ fac.Q.t()
        if self.type in GROUP_TYPES or self.type == "truncation":
            M = self.param("M", x, after_comm=False)
            y = to_rows(self._scatter(x, self.rh) @ M.t(), self.shard)
            return self._read_rows(y)
        # block types: the chunks are as wide as the input, so column ranks gather the input itself
        M = self.param("M", x, after_comm=True)
        return self._blocks(to_rows(x, self.shard), M)

    def _blocks(self, x, M):
        xp = self._scatter(x, self.n_chunks * self.rh)
        y = self._rotate(xp.unflatten(-1, (self.n_chunks, self.rh))) @ M.t()
        return self._read_rows(y.flatten(-2))

    def delta_weight(self):
        eye = torch.eye(self.shard.local_in, dtype=self.M.dtype, device=self.M.device)
        if self.type in GROUP_TYPES or self.type == "truncation":
            return self._read_rows(self._scatter(eye, self.rh) @ self.M.t()).t()
        return self._blocks(eye, self.M).t()
