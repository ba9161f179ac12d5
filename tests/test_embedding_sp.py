"""The frozen word embedding under TP + SP (mora_dist/models/embedding.py): each rank's lookup of its
sequence block from the replicated table equals megatron's vocab-parallel lookup + reduce-scatter."""
import pytest
import torch

from dist import run_ranks


def _case(rank):
    from megatron.core.tensor_parallel import layers as tp_layers

    from mora_dist.models import LlamaSpec, build_model

    spec = LlamaSpec(vocab_size=48, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = build_model(spec, sequence_parallel=True, attention="local")
    we = model.embedding.word_embeddings
    tokens = torch.randint(0, 48, (3, 16), generator=torch.Generator().manual_seed(5))
    megatron = lambda: type(we).forward(we, tokens)  # noqa: E731  (the class's: vocab-parallel + reduce-scatter)
    rs, scatters = tp_layers.reduce_scatter_to_sequence_parallel_region, []
    tp_layers.reduce_scatter_to_sequence_parallel_region = lambda *a, **k: (scatters.append(1), rs(*a, **k))[1]
    out = {}
    try:
        we.weight.requires_grad_(False)
        got = we(tokens)
        out["frozen_scatters"] = len(scatters)
        want = megatron()
        out["frozen_shape"] = tuple(got.shape) == (8, 3, 32) and got.is_contiguous()
        out["frozen_equal"] = torch.equal(got, want)
        with torch.no_grad():
            we.weight.mul_(2.0)  # the table changes (a load or restart): the replica follows
        out["after_write_equal"] = torch.equal(we(tokens), megatron())
        n = len(scatters)
        we.weight.requires_grad_(True)  # a trained table: megatron's path, its gradient reaches the shard
        trained = we(tokens)
        out["trained_scatters"] = len(scatters) - n
        trained.sum().backward()
        out["trained_grad"] = we.weight.grad is not None and bool(we.weight.grad.abs().sum() > 0)
        out["trained_equal"] = torch.equal(trained.detach(), want * 2)
    finally:
        tp_layers.reduce_scatter_to_sequence_parallel_region = rs
    return out


@pytest.mark.integration
def test_frozen_embedding_replicated_under_sp():
    for r in run_ranks(_case, 2, tp=2):
        assert r == dict(frozen_scatters=0, frozen_shape=True, frozen_equal=True, after_write_equal=True,
                         trained_scatters=1, trained_grad=True, trained_equal=True), r
