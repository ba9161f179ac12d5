"""SwiGLU fused with the MLP adapters' skinny products (mora_dist/kernels/swiglu_grads.py) against
float64 torch references built from megatron's own swiglu / swiglu_back formulas. The kernels are
Triton only: on a CPU they run under TRITON_INTERPRET=1, which must be set before triton is
imported, so test_swiglu_kernels_interpreted runs this module in a subprocess; in-process the
kernel checks are collected only on a GPU or under the interpreter (no skips in a plain CPU run)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as Fn

D = torch.float64
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# the kernel checks are collected on a GPU or under the interpreter (test_swiglu_kernels_interpreted's
# subprocess), not in a plain CPU run (the bottom of this module)
KERNELS = DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
# (T, F, r_gate, r_up, r_down): token and column counts that cut every block and range
SHAPES = [(100, 80, 8, 3, 5), (64, 48, 4, 4, 4), (77, 56, 3, 7, 8)]
# tilings: the GPU default's sub-tiles in one program (ranges cut to 128 x 128: the interpreter runs
# masked sub-tiles past T and F too), and small tiles: several token / column ranges (partial slots
# summed after), several sub-tiles a range, the last ones partial
CFGS = [dict(TP=128, FP=128), dict(BT=16, BF=16, TP=32, FP=32, num_warps=4, num_stages=1),
        dict(BT=16, BF=32, TP=48, FP=64, num_warps=4, num_stages=1)]
IDS = ["one-program", "small", "mixed"]
CASES = [pytest.param(*sh, c, id=f"{'-'.join(map(str, sh))}-{i}") for sh in SHAPES for c, i in zip(CFGS, IDS)
         if i != "one-program" or sh == SHAPES[0]]


def _megatron():
    """megatron's swiglu and swiglu_back as written (the fused path's functions, without their
    torch.compile wrapper: plain torch ops, here in float64)."""
    from megatron.core.fusions import fused_bias_swiglu as m
    raw = lambda f: getattr(f, "_torchdynamo_orig_callable", f)  # noqa: E731
    return raw(m.swiglu), raw(m.swiglu_back)


def _inputs(T, F, ranks, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *sh, s=1.0: (torch.randn(*sh, generator=gen, dtype=D) * s).to(dtype).to(DEV)  # noqa: E731
    ra, rb, rc = ranks
    return dict(y=rnd(T, 2 * F, s=2.0), dact=rnd(T, F), Hg=rnd(T, ra), Qg=rnd(F, ra, s=0.3), Hu=rnd(T, rb),
                Qu=rnd(F, rb, s=0.3), Zd=rnd(T, rc), Pd=rnd(rc, F, s=0.3))


def _reference(t):
    """float64 outputs from the inputs' values: megatron's formulas, then the products."""
    swiglu, swiglu_back = _megatron()
    t = {k: v.double() for k, v in t.items()}
    F = t["y"].shape[1] // 2
    act = swiglu(t["y"])
    g = swiglu_back(t["dact"], t["y"])
    gg, gu = g[:, :F], g[:, F:]
    return dict(act=act, H=act @ t["Pd"].t(), g=g, Eg=gg.t() @ t["Hg"], Eu=gu.t() @ t["Hu"], Zg=gg @ t["Qg"],
                Zu=gu @ t["Qu"], dP=t["Zd"].t() @ act)


def test_megatron_swiglu_back_is_the_derivative():
    """The reference's backward (megatron's swiglu_back) is d/dy of its swiglu: float64 autograd."""
    swiglu, swiglu_back = _megatron()
    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(37, 2 * 29, generator=gen, dtype=D) * 3).requires_grad_(True)
    dact = torch.randn(37, 29, generator=gen, dtype=D)
    (swiglu(y) * dact).sum().backward()
    torch.testing.assert_close(swiglu_back(dact, y.detach()), y.grad, rtol=1e-13, atol=1e-13)
    yr = y.detach()
    torch.testing.assert_close(swiglu(yr), Fn.silu(yr[:, :29]) * yr[:, 29:], rtol=0, atol=0)


def _check_float64(T, F, ra, rb, rc, cfg):
    """Every output of the three calls in float64 (fp64 dots) against the float64 reference; the
    backward with all products and with subsets (None operands give None and leave g unchanged)."""
    from mora_dist.kernels.swiglu_grads import swiglu_backward_lora, swiglu_down_dp, swiglu_forward_lora

    t = _inputs(T, F, (ra, rb, rc), D, T + F)
    want = _reference(t)
    close = lambda a, b: torch.testing.assert_close(a.cpu(), b, rtol=1e-11, atol=1e-11)  # noqa: E731
    act, H = swiglu_forward_lora(t["y"], t["Pd"], cfg=cfg)
    assert act.dtype == D and H.dtype == D
    close(act, want["act"])
    close(H, want["H"])
    act2, none = swiglu_forward_lora(t["y"], cfg=cfg)
    assert none is None and torch.equal(act2, act)
    got = swiglu_backward_lora(t["y"], t["dact"], t["Hg"], t["Qg"], t["Hu"], t["Qu"], t["Zd"], cfg=cfg)
    for v, k in zip(got, ("g", "Eg", "Eu", "Zg", "Zu", "dP")):
        assert v.shape == want[k].shape, k
        close(v, want[k])
    for keep in (("Hg", "Qu"), ("Zd",), ("Qg", "Hu", "Zd"), ()):
        sub = swiglu_backward_lora(t["y"], t["dact"], *(t[k] if k in keep else None
                                                       for k in ("Hg", "Qg", "Hu", "Qu", "Zd")), cfg=cfg)
        assert torch.equal(sub[0], got[0])
        for v, k, op in zip(sub[1:], ("Eg", "Eu", "Zg", "Zu", "dP"), ("Hg", "Hu", "Qg", "Qu", "Zd")):
            assert (v is None) == (op not in keep), op
            if v is not None:
                close(v, want[k])
    close(swiglu_down_dp(t["y"], t["Zd"], cfg=cfg), want["dP"])


def _check_bfloat16(cfg):
    """bf16 inputs (the model's dtype) against float64 from the same bf16 values. g and act: one
    rounding of the fp32 value to bf16, so |err| <= 2^-8 |ref| (+ 1e-30 where ref is 0). The
    products, fp32, are taken from those rounded values (the tensors the unfused path stores and
    its GEMMs read): against float64 products of the kernel's own g / act, max |err| <= 1e-5 max |ref|
    (fp32 accumulation); against the exact float64 products <= 1e-2 max |ref| (bf16 rounding of g
    and act; measured ~2e-3)."""
    from mora_dist.kernels.swiglu_grads import swiglu_backward_lora, swiglu_forward_lora

    T, F = 100, 80
    t = _inputs(T, F, (8, 3, 5), torch.bfloat16, 7)
    want = _reference(t)
    d = {k: v.double().cpu() for k, v in t.items()}
    act, H = swiglu_forward_lora(t["y"], t["Pd"], cfg=cfg)
    g, Eg, Eu, Zg, Zu, dP = swiglu_backward_lora(t["y"], t["dact"], t["Hg"], t["Qg"], t["Hu"], t["Qu"], t["Zd"],
                                                 cfg=cfg)
    assert act.dtype == g.dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in (H, Eg, Eu, Zg, Zu, dP))
    for got, k in ((act, "act"), (g, "g")):
        torch.testing.assert_close(got.double().cpu(), want[k], rtol=2 ** -8, atol=1e-30)
    a, gd = act.double().cpu(), g.double().cpu()
    own = dict(H=a @ d["Pd"].t(), Eg=gd[:, :F].t() @ d["Hg"], Eu=gd[:, F:].t() @ d["Hu"], Zg=gd[:, :F] @ d["Qg"],
               Zu=gd[:, F:] @ d["Qu"], dP=d["Zd"].t() @ a)
    for got, k in ((H, "H"), (Eg, "Eg"), (Eu, "Eu"), (Zg, "Zg"), (Zu, "Zu"), (dP, "dP")):
        got = got.double().cpu()
        assert (got - own[k]).abs().max() <= 1e-5 * own[k].abs().max(), k
        assert (got - want[k]).abs().max() <= 1e-2 * want[k].abs().max(), k


@pytest.mark.integration
def test_swiglu_kernels_interpreted():
    """This module's kernel tests on the CPU, executed by Triton's interpreter (a subprocess:
    TRITON_INTERPRET=1 must be set before triton is imported); all must run, none skip."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "not interpreted"],
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    n = 1 + len(CASES) + 2
    assert r.returncode == 0 and f"{n} passed" in r.stdout and "skipped" not in r.stdout, \
        r.stdout[-3000:] + r.stderr[-2000:]


if KERNELS:
    test_float64 = pytest.mark.parametrize("T,F,ra,rb,rc,cfg", CASES)(_check_float64)
    test_bfloat16 = pytest.mark.parametrize("cfg", CFGS[:2], ids=IDS[:2])(_check_bfloat16)
