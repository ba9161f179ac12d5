"""The multi-process harness itself: ranks, parallel groups, collectives and error reporting."""
import pytest
import torch

from dist import run_ranks

pytestmark = pytest.mark.integration  # multi-process / subprocess: outside the fast unit subset


def _groups(rank):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return dict(
        tp_rank=ps.get_tensor_model_parallel_rank(), tp=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp=ps.get_data_parallel_world_size(), tp_sum=t.item(),
    )


def _fails(rank):
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    return rank


def test_tp2_pp2_groups():
    out = run_ranks(_groups, 4, tp=2, pp=2)
    assert [o["tp_rank"] for o in out] == [0, 1, 0, 1]
    assert [o["pp_rank"] for o in out] == [0, 0, 1, 1]
    assert all(o["tp"] == 2 and o["dp"] == 1 for o in out)
    assert [o["tp_sum"] for o in out] == [3.0, 3.0, 7.0, 7.0]


def test_rank_failure_reports_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1.*planted failure on rank 1"):
        run_ranks(_fails, 2)
