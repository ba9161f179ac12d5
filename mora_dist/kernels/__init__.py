"""Triton kernels (GPU; the CPU tests run them under TRITON_INTERPRET=1). The lowest layer: imports
only torch and triton; callers (adapters/blockdiag.py, parallel/merged.py,
models/kernels.py) dispatch to them and keep a torch (or megatron) form for the CPU. This package's own module imports no triton, so callers can ask
`runs_on` before importing a kernel."""
import importlib
import os


def interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t) -> bool:
    """Whether the kernels can run on tensor t: a CUDA tensor, or any tensor under the interpreter."""
    return t.is_cuda or interpreted()


# Hand-written kernels (and kernel-shaped rewrites) a process can leave out for an A/B in the step:
# rope, swiglu (models/kernels.py), tilesum (adapters/tiles.py: torch's block sums), fold (MoRA block
# types' g folded over their row tiles, adapters/blockdiag.py), dualmm (a factor adapter's g Q and g^T H in
# one pass over g, parallel/merged.py: two GEMMs without it), tilebuild (MoRA sharing's weight build as a
# read of M per weight, kernels/build.tile_add: the product with the tile maps without it).
KERNEL_NAMES = ("rope", "swiglu", "tilesum", "fold", "dualmm", "tilebuild")


def kernels_off() -> set:
    """The names MORA_DIST_NO_KERNEL (comma list) leaves out; an unknown name is an error."""
    off = {n.strip() for n in os.environ.get("MORA_DIST_NO_KERNEL", "").split(",") if n.strip()}
    bad = off - set(KERNEL_NAMES)
    if bad:
        raise ValueError(f"MORA_DIST_NO_KERNEL: unknown kernel(s) {sorted(bad)}; known: {', '.join(KERNEL_NAMES)}")
    return off


def kernel_for(module: str, t, off: str = "", half: bool = False, unit_stride: bool = False):
    """The kernel module `mora_dist.kernels.<module>` when it may run on tensor t, else None (the caller's
    torch form): t on CUDA (`half`: in bf16/fp16 too) or any t under the interpreter, t's last dimension
    contiguous where `unit_stride`, `off` not named in MORA_DIST_NO_KERNEL, and Triton importable. The
    one dispatch rule of the callers (adapters/, parallel/merged.py)."""
    half_ok = not half or str(t.dtype) in ("torch.bfloat16", "torch.float16")
    if not ((t.is_cuda and half_ok) or interpreted()):
        return None
    if (unit_stride and t.stride(-1) != 1) or (off and off in kernels_off()):
        return None
    try:
        return importlib.import_module(f"mora_dist.kernels.{module}")
    except ImportError:
        return None
