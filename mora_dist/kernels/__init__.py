"""Triton kernels (GPU; the CPU tests run them under TRITON_INTERPRET=1). The lowest layer: imports
only torch and triton; callers (adapters/blockdiag.py, parallel/merged.py,
models/kernels.py) dispatch to them and keep a torch (or megatron) form for the CPU. This package's own module imports no triton, so callers can ask
`runs_on` before importing a kernel."""
import os


def interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t) -> bool:
    """Whether the kernels can run on tensor t: a CUDA tensor, or any tensor under the interpreter."""
    return t.is_cuda or interpreted()
