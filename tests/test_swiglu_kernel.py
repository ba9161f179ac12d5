"""The SwiGLU backward kernel (mora_dist/kernels/swiglu.py) and its dispatch in megatron's fused SwiGLU
against megatron's own swiglu_back formula. Triton only: on a CPU the kernel checks run under
TRITON_INTERPRET=1 (set before triton is imported) in test_swiglu_back_interpreted's subprocess;
in-process they are collected only on a GPU or under the interpreter (no skips in a plain CPU run)."""
import os
import subprocess
import sys

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
KERNELS = DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
# (T, F): one tile; tokens and features that cut the 4 x 1024 tile; several feature tiles
SHAPES = [(4, 64), (37, 29), (9, 1100)]


def _megatron(name: str):
    """megatron's fused_bias_swiglu.<name> as written (without its torch.compile wrapper: plain torch ops)."""
    from megatron.core.fusions import fused_bias_swiglu as m
    f = getattr(m, name)
    return getattr(f, "_torchdynamo_orig_callable", f)


def _megatron_back():
    return _megatron("swiglu_back")


def _inputs(T, F, dtype, seed, y_stride=None):
    gen = torch.Generator().manual_seed(seed)
    y = (torch.randn(T, y_stride or 2 * F, generator=gen, dtype=torch.float64) * 2).to(dtype).to(DEV)
    dact = torch.randn(T, F, generator=gen, dtype=torch.float64).to(dtype).to(DEV)
    return y[:, :2 * F], dact


def test_megatron_swiglu_back_is_the_derivative():
    """The reference (megatron's swiglu_back) is d/dy of its swiglu: float64 autograd."""
    swiglu = _megatron("swiglu")
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(13, 2 * 11, generator=gen, dtype=torch.float64, requires_grad=True)
    dact = torch.randn(13, 11, generator=gen, dtype=torch.float64)
    swiglu(y).backward(dact)
    torch.testing.assert_close(_megatron_back()(dact, y.detach()), y.grad, rtol=1e-13, atol=1e-13)


def _check_float64(T, F):
    """float64: equal to megatron's formula to rounding (1e-13), also with y a strided view."""
    from mora_dist.kernels.swiglu import swiglu_back

    for stride in (None, 2 * F + 7):
        y, dact = _inputs(T, F, torch.float64, T + F, stride)
        torch.testing.assert_close(swiglu_back(dact, y), _megatron_back()(dact, y), rtol=1e-13, atol=1e-13)


def _check_bfloat16(T, F):
    """bf16 (the model's dtype): the fp32 value from the stored bf16 inputs rounded once, so against float64
    from the same values |err| <= 2^-8 |ref|, and equal dtype."""
    from mora_dist.kernels.swiglu import swiglu_back

    y, dact = _inputs(T, F, torch.bfloat16, 5)
    g = swiglu_back(dact, y)
    assert g.dtype == torch.bfloat16 and g.shape == (T, 2 * F)
    want = _megatron_back()(dact.double(), y.double())
    torch.testing.assert_close(g.double(), want, rtol=2 ** -8, atol=1e-30)


@pytest.mark.integration
def test_swiglu_back_interpreted():
    """This module's kernel checks on the CPU under Triton's interpreter; all must run, none skip."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "not interpreted and not derivative"],
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    n = 2 * len(SHAPES) + 1
    assert r.returncode == 0 and f"{n} passed" in r.stdout and "skipped" not in r.stdout, \
        r.stdout[-3000:] + r.stderr[-2000:]


def test_swiglu_back_dispatch_matches_megatron(monkeypatch):
    """models/kernels.swiglu_back_dispatch in megatron's fused SwiGLU (the model's MLP activation):
    SwiGLUFunction's input gradient equals megatron's own swiglu_back in float64 (1e-12); the kernel
    serves the 2-D case on a GPU or under the interpreter, a 3-D call and a plain CPU run take the fallback."""
    from megatron.core.fusions import fused_bias_swiglu as fbs

    from mora_dist.kernels import swiglu
    from mora_dist.models import kernels as mk

    calls = []
    real = swiglu.swiglu_back
    monkeypatch.setattr(swiglu, "swiglu_back", lambda *a: (calls.append(1), real(*a))[1])
    own = fbs.swiglu_back
    monkeypatch.setattr(fbs, "swiglu_back", mk.swiglu_back_dispatch(own))
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(37, 2 * 29, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    g = torch.randn(37, 29, generator=gen, dtype=torch.float64).to(DEV)
    fbs.bias_swiglu_impl(y, None).backward(g)
    torch.testing.assert_close(y.grad, own(g, y.detach()), rtol=1e-12, atol=1e-12)
    assert len(calls) == (1 if KERNELS else 0)
    y3 = y.detach().view(1, 37, 58)
    torch.testing.assert_close(fbs.swiglu_back(g.view(1, 37, 29), y3), own(g.view(1, 37, 29), y3), rtol=0, atol=0)
    assert len(calls) == (1 if KERNELS else 0)


if KERNELS:
    test_float64 = pytest.mark.parametrize("T,F", SHAPES)(_check_float64)
    test_bfloat16 = pytest.mark.parametrize("T,F", SHAPES)(_check_bfloat16)
