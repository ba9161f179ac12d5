"""train.cuda_graph under parallel.vpp on 2 GPUs (torchrun --nproc_per_node=2): PP=2 x VPP=2, the same
random-init model trained eagerly and with the whole-schedule graph (two eager steps, capture at the
third, replays after), both from the same RNG state. Prints both loss lists and the largest relative
difference as JSON (rank 0). 2026-11-30 on an nvidia-h200-x2: 0.0 for LoRA and MoRA over 7 steps, which
is what lifted the config's refusal of train.cuda_graph with parallel.vpp."""
import json
import os
import sys
import tempfile

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests")]


def main():
    import pathlib

    import torch.distributed as dist

    from mora_dist.parallel.state import destroy_distributed, init_distributed
    import torch

    from mora_dist.training.cuda_graph import graph_safe_rng
    from mora_dist.training.loop import Trainer
    from train_utils import tiny_config

    init_distributed(pp=2, vpp=2)
    # one directory for every rank: megatron's dataset builder writes its index cache on rank 0 only
    tmp = pathlib.Path(tempfile.gettempdir()) / "vpp_graph_check"
    tmp.mkdir(exist_ok=True)
    out = {}
    for method in ("lora", "mora"):
        for graph in (False, True):
            for r in range(dist.get_world_size()):  # in turn: tiny_config (re)writes the shared data files
                if dist.get_rank() == r:
                    cfg = tiny_config(tmp, **{"parallel.pp": 2, "parallel.vpp": 2, "model.num_layers": 4,
                                              "train.steps": 7, "train.compile": False, "adapter.method": method,
                                              "adapter.r": 4})
                dist.barrier()
            cfg.train.cuda_graph = graph  # the eager and graphed runs differ only here
            torch.manual_seed(cfg.model.seed)  # both runs from the same RNG state: the graphed Trainer switches
            graph_safe_rng(cfg.model.seed)     # megatron's tracker to its graph-safe form, so the eager one does too
            t = Trainer(cfg)
            out[f"{method}_{'graph' if graph else 'eager'}"] = [t.train_step()["loss"] for _ in range(cfg.train.steps)]
            t.close()
        e, g = out[f"{method}_eager"], out[f"{method}_graph"]
        out[f"{method}_max_rel_diff"] = max(abs(a - b) / abs(a) for a, b in zip(e, g))
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
