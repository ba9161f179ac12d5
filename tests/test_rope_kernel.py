"""The RoPE kernel (mora_dist/kernels/rope.py) behind megatron's `_apply_rotary_pos_emb_bshd`
(models/kernels.rope_dispatch): outputs and input gradients against megatron's own function."""
import os
import subprocess
import sys

import pytest
import torch


def _freqs(s, d, gen, halves_equal=True):
    """[s, 1, 1, d] angles: megatron's layout (cat(f, f)), or independent halves (the general case)."""
    f = torch.rand(s, d // 2, generator=gen, dtype=torch.float32) * 6.0
    f = torch.cat([f, f if halves_equal else torch.rand(s, d // 2, generator=gen) * 6.0], -1)
    return f.view(s, 1, 1, d)


def test_rope_dispatch_matches_megatron(monkeypatch):
    """Kernel cases (contiguous t; a strided split view like megatron's key; mscale; independent halves)
    in float64 to 1e-12 and float32 to 1e-6, forward and backward; the cases it does not serve
    (interleaved, partial rotation) go to the fallback unchanged. Under TRITON_INTERPRET=1
    (test_rope_kernel_interpreted) the kernel serves the first group; without it the CPU takes the fallback."""
    from megatron.core.models.common.embeddings import rope_utils

    from mora_dist.kernels import rope
    from mora_dist.models import kernels

    ref_fn = rope_utils._apply_rotary_pos_emb_bshd
    calls = []
    real = rope.apply
    monkeypatch.setattr(rope, "apply", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    dispatch = kernels.rope_dispatch(ref_fn)
    gen = torch.Generator().manual_seed(0)
    s, b, h, d = 7, 2, 3, 16

    def check(t, freqs, tol, **kw):
        t1 = t.detach().clone().requires_grad_(True)
        t2 = t.detach().clone().requires_grad_(True)
        freqs = freqs.to(t.dtype)  # float64 angles for the float64 checks
        out, want = dispatch(t1, freqs, **kw), ref_fn(t2, freqs, **kw)
        g = torch.randn(want.shape, generator=gen, dtype=t.dtype)
        (out * g).sum().backward()
        (want * g).sum().backward()
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        torch.testing.assert_close(t1.grad, t2.grad, rtol=tol, atol=tol)

    served = [
        (torch.randn(s, b, h, d, generator=gen, dtype=torch.float64), _freqs(s, d, gen), 1e-12, {}),
        (torch.randn(s, b, h, d, generator=gen, dtype=torch.float64), _freqs(s, d, gen, False), 1e-12,
         dict(mscale=0.7)),
        # megatron's key: a view of the fused q/k/v output [s, b, groups, (heads/group + 2) * d]
        (torch.randn(s, b, h, 4 * d, generator=gen, dtype=torch.float64)[..., 2 * d:3 * d], _freqs(s, d, gen),
         1e-12, {}),
        (torch.randn(s, b, h, d, generator=gen, dtype=torch.float32), _freqs(s, d, gen), 1e-6, {}),
    ]
    for t, f, tol, kw in served:
        assert rope.supports(t, f)
        check(t, f, tol, **kw)
    kern = os.environ.get("TRITON_INTERPRET") == "1"
    assert len(calls) == (len(served) if kern else 0)
    t = torch.randn(s, b, h, d, generator=gen, dtype=torch.float64)
    check(t, _freqs(s, d, gen), 1e-12, rotary_interleaved=True)  # interleaved: not the kernel's layout
    assert not rope.supports(t, _freqs(s, d // 2, gen))  # partial rotation (t_pass non-empty)
    check(t, _freqs(s, d // 2, gen), 1e-12)
    assert len(calls) == (len(served) if kern else 0)


@pytest.mark.integration
def test_rope_kernel_interpreted():
    """test_rope_dispatch_matches_megatron with the Triton kernel executed by Triton's interpreter on the
    CPU (TRITON_INTERPRET=1 must be set before triton is imported: a subprocess)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_rope_dispatch_matches_megatron"],
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_kernel_switch_names(monkeypatch):
    """MORA_DIST_NO_KERNEL: the named kernels are left out; a misspelt name is refused, not ignored."""
    from mora_dist.kernels import kernels_off

    monkeypatch.setenv("MORA_DIST_NO_KERNEL", " rope, swiglu,tilesum,fold ")
    assert kernels_off() == {"rope", "swiglu", "tilesum", "fold"}
    monkeypatch.setenv("MORA_DIST_NO_KERNEL", "")
    assert kernels_off() == set()
    monkeypatch.setenv("MORA_DIST_NO_KERNEL", "ropes")
    with pytest.raises(ValueError, match="ropes"):
        kernels_off()
