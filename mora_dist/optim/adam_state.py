"""One per-parameter view of the Adam state (moments, step count, fp32 master) whichever optimizer
holds it: torch AdamW (whole tensors keyed by the parameter) or megatron's DistributedOptimizer
(flat ranges of each parameter sharded over DP). Checkpoints (canonical layout, so a checkpoint
written with one optimizer resumes with the other) and ReLoRA restarts (pruning / deleting the
adapters' state) read and write it here; training/optimizer.py builds the optimizers."""
from __future__ import annotations

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_state(opt):
    """The per-parameter Adam state view of `opt`: torch AdamW's, or the one an optimizer wrapper
    provides (`training.optimizer.DistributedAdam.adam_state`)."""
    return opt.adam_state() if hasattr(opt, "adam_state") else TorchAdamState(opt)


class TorchAdamState:
    """torch AdamW: the state is keyed by the parameter and holds it whole."""

    def __init__(self, opt):
        self.opt = opt

    def _step(self, p, value: float) -> torch.Tensor:
        group = next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))
        if group.get("fused") or group.get("capturable"):  # fused/capturable AdamW keeps the count on the device
            return torch.tensor(value, dtype=torch.float32, device=p.device)
        return torch.tensor(value, dtype=torch.float32)

    def _state(self, p) -> dict:
        st = self.opt.state.get(p)
        if not st:  # before the first step: materialise the state to load into / save
            st = self.opt.state[p] = {"step": self._step(p, 0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
        return st

    def full(self, p, main: bool = False) -> dict:
        """{exp_avg, exp_avg_sq: tensors like p (the state itself), step: float, main: None}."""
        st = self._state(p)
        return {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"], "step": float(st["step"]), "main": None}

    def load(self, p, moments: dict, step: float, main=None) -> None:
        st = self._state(p)
        for m in MOMENTS:
            st[m].copy_(moments[m])
        st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)

    def local(self, p, key: str):
        st = self.opt.state.get(p)
        return st[key] if st else None

    def gathered(self, p, key: str):
        return self.opt.state[p][key]

    def has(self, p) -> bool:
        return bool(self.opt.state.get(p))

    def delete(self, p) -> None:
        self.opt.state.pop(p, None)


class DistributedAdamState:
    """megatron's DistributedOptimizer: each DP rank holds the Adam state of a flat range of each
    parameter (its share of the grad buffer), keyed by the shard (for a bf16 parameter, its fp32
    master shard). `full` / `gathered` are collective over DP (every rank, same parameters, same order)."""

    def __init__(self, chained):
        from megatron.core import parallel_state as ps

        self.parts = [o for o in chained.chained_optimizers if not getattr(o, "is_stub_optimizer", True)]
        self.group = self.parts[0].data_parallel_group if self.parts else ps.get_data_parallel_group()

    def _where(self, p):
        """(inner torch optimizer, range of p's flat elements this rank holds, shard) or None."""
        for o in self.parts:
            if p in o.model_param_gbuf_map:
                rng = o._get_model_param_range_map(p)["param"]
                gi, k = o.model_param_group_index_map[p]
                return o.optimizer, rng, o.optimizer.param_groups[gi]["params"][k]
        return None

    def full(self, p, main: bool = False) -> dict:
        """p's whole (TP-local) Adam moments, step count and, with `main`, fp32 master, gathered over DP."""
        n, keys = p.numel(), MOMENTS + (("main",) if main else ())
        buf = torch.zeros(len(keys) * n + 2, dtype=torch.float32, device=p.device)
        where = self._where(p)
        if where is not None:
            opt, rng, shard = where
            st = opt.state.get(shard) or {}
            for i, k in enumerate(keys):
                src = shard.detach() if k == "main" else st.get(k)
                if src is not None:
                    buf[i * n + rng.start:i * n + rng.end] = src.view(-1)
            if "step" in st:  # the same count on every rank holding a range of p: averaged back below
                buf[-2], buf[-1] = float(st["step"]), 1.0
        dist.all_reduce(buf, group=self.group)
        out = {k: buf[i * n:(i + 1) * n].view(p.shape) for i, k in enumerate(keys)}
        out["step"] = float(round(buf[-2].item() / buf[-1].item())) if buf[-1].item() else 0.0
        out.setdefault("main", None)
        return out

    def load(self, p, moments: dict, step: float, main=None) -> None:
        """Write this rank's range of p's moments (and fp32 master, for a non-fp32 p) and the step count."""
        where = self._where(p)
        if where is None:
            return
        opt, rng, shard = where
        st = opt.state[shard]
        for m in MOMENTS:
            part = moments[m].reshape(-1)[rng.start:rng.end].to(shard.dtype)
            if m in st:
                st[m].copy_(part)
            else:
                st[m] = part.clone()
        st["step"] = torch.tensor(float(step), dtype=torch.float32)  # torch AdamW (non-fused) keeps it on the host
        if main is not None and p.dtype != torch.float32:  # fp32 parameters are their own master (shard is a view)
            shard.copy_(main.reshape(-1)[rng.start:rng.end])

    def local(self, p, key: str):
        where = self._where(p)
        if where is None:
            return None
        opt, _, shard = where
        st = opt.state.get(shard)
        return st[key].view(-1) if st else None

    def gathered(self, p, key: str):
        return self.full(p)[key]

    def has(self, p) -> bool:
        return True  # rank-independent (collectives follow); an absent range gathers as zeros

    def delete(self, p) -> None:
        where = self._where(p)
        if where is not None:
            where[0].state.pop(where[2], None)
