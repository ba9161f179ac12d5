"""The chunked vocab-parallel output layer + cross entropy (mora_dist/models/loss.py) against the
plain computation: full float64 logits x W^T and torch's cross entropy. Loss, gradient of the
hidden states and (when it trains) of the output weight, at TP=1 (several chunks) and TP=2/4 with
and without sequence parallelism (gloo ranks), and through a whole GPTModel against megatron's
own output layer + loss."""
import pytest
import torch
import torch.nn.functional as F

from dist import run_ranks

S, B, H, V = 12, 3, 16, 40


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, S), generator=g)
    gl = torch.rand(B, S, generator=g, dtype=torch.float64)  # per-token upstream gradient (a loss mask, weights)
    return x, W, labels, gl


def _reference(x, W, labels, gl):
    x = x.clone().requires_grad_(True)
    W = W.clone().requires_grad_(True)
    logits = torch.einsum("sbh,vh->bsv", x, W)
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, S)
    (loss * gl).sum().backward()
    return loss.detach(), x.grad, W.grad


@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("chunk", [V, 5 * V, 1 << 20])  # 1 token, 5 tokens (uneven last chunk), one chunk
def test_tp1_matches_plain_float64(train_w, chunk):
    from mora_dist.models.loss import linear_cross_entropy

    x0, W0, labels, gl = _data()
    loss_r, gx_r, gw_r = _reference(x0, W0, labels, gl)
    x = x0.clone().requires_grad_(True)
    W = W0.clone().requires_grad_(train_w)
    loss = linear_cross_entropy(x, W, labels, chunk_elems=chunk)
    (loss * gl).sum().backward()
    assert loss.shape == (B, S)
    torch.testing.assert_close(loss.double(), loss_r, rtol=1e-6, atol=1e-6)  # the loss is accumulated in fp32
    torch.testing.assert_close(x.grad, gx_r, rtol=1e-12, atol=1e-12)
    if train_w:
        torch.testing.assert_close(W.grad, gw_r, rtol=1e-12, atol=1e-12)


def test_micro_batch_one_transposed_view():
    """At b = 1 the hidden states may be a transposed [s, 1, h] view (stride s*h on the batch dim)."""
    from mora_dist.models.loss import linear_cross_entropy

    x0, W0, labels, gl = _data(1)
    x0, labels, gl = x0[:, :1], labels[:1], gl[:1]
    loss_r = F.cross_entropy(x0[:, 0] @ W0.t(), labels[0], reduction="none")
    bsh = x0.transpose(0, 1).contiguous().requires_grad_(True)  # [1, s, h]
    view = bsh.transpose(0, 1).contiguous()  # megatron's [b s h] -> [s b h]: a no-op at b = 1
    assert view.stride(1) == S * H
    loss = linear_cross_entropy(view, W0, labels, chunk_elems=3 * V)
    (loss * gl).sum().backward()
    torch.testing.assert_close(loss[0].double(), loss_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bsh.grad[0], (torch.softmax(x0[:, 0] @ W0.t(), -1)
                                             - F.one_hot(labels[0], V)) * gl[0][:, None] @ W0)


def _tp_case(rank, sp, train_w, fwd_reduce=True):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mora_dist.models.loss import linear_cross_entropy

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    x0, W0, labels, gl = _data(2)
    vs = slice(r * V // tp, (r + 1) * V // tp)
    ss = slice(r * S // tp, (r + 1) * S // tp)
    x = (x0[ss] if sp else x0).clone().requires_grad_(True)
    W = W0[vs].clone().requires_grad_(train_w)
    from megatron.core.tensor_parallel import mappings

    gather = mappings.gather_from_sequence_parallel_region
    if sp and not train_w and fwd_reduce:  # frozen W under SP: the loss's own gather and reduce, not megatron's
        def refuse(*a, **k):
            raise AssertionError("frozen W under SP went through megatron's gather/reduce-scatter")
        mappings.gather_from_sequence_parallel_region = refuse
    try:
        loss = linear_cross_entropy(x, W, labels, tp_group=ps.get_tensor_model_parallel_group(),
                                    sequence_parallel=sp, sp_forward_reduce=fwd_reduce, chunk_elems=7 * V // tp)
    finally:
        mappings.gather_from_sequence_parallel_region = gather
    (loss * gl).sum().backward()
    loss_r, gx_r, gw_r = _reference(x0, W0, labels, gl)
    out = dict(loss=(loss.double() - loss_r).abs().max().item(),
               xgrad=(x.grad - (gx_r[ss] if sp else gx_r)).abs().max().item())
    if train_w:
        out["wgrad"] = (W.grad - gw_r[vs]).abs().max().item()
    dist.barrier()
    return out


@pytest.mark.integration
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_plain(tp):
    res = run_ranks(_tp_all, tp, tp=tp)
    bad = [f"rank {i} {case} {k}={v:.1e}" for i, r in enumerate(res) for case, d in r.items()
           for k, v in d.items() if not v < (1e-6 if k == "loss" else 1e-12)]
    assert not bad, bad


def _tp_all(rank):
    cases = {(sp, w): _tp_case(rank, sp, w) for sp in (False, True) for w in (False, True)}
    cases[(True, False, "mapping")] = _tp_case(rank, True, False, fwd_reduce=False)  # parallel.overlap_sp_loss=false
    return cases


def _model_case(rank):
    """A tiny GPTModel (fp32): our loss vs megatron's logits + torch cross entropy, and all grads."""
    from megatron.core import parallel_state as ps

    from mora_dist.models import LlamaSpec, build_model

    spec = LlamaSpec(vocab_size=48, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=64, max_position_embeddings=16)
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for sp in ([False, True] if tp > 1 else [False]):
        torch.manual_seed(0)
        model = build_model(spec, sequence_parallel=sp, attention="local")
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, 48, (2, 16), generator=g)
        pos = torch.arange(16).unsqueeze(0).expand(2, -1)
        loss = model(tokens, pos, None, labels=tokens)
        loss.mean().backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        logits = model(tokens, pos, None)  # plain: megatron's output layer, gathered logits
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
        logits = gather_from_tensor_model_parallel_region(logits) if tp > 1 else logits
        ref = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                              reduction="none").view(2, 16)
        ref.float().mean().backward()
        out[sp] = dict(loss=(loss.double() - ref).abs().max().item(),
                       grads=max((ours[n] - p.grad).abs().max().item() for n, p in model.named_parameters()))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("tp", [1, 2])
def test_model_loss_matches_megatron_output_layer(tp):
    res = run_ranks(_model_case, tp, tp=tp)
    for r in res:
        for sp, d in r.items():
            assert d["loss"] < 1e-5 and d["grads"] < 1e-5, (sp, d)
