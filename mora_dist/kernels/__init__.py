"""Triton kernels (GPU; the CPU tests run them under TRITON_INTERPRET=1). The lowest layer: imports
only torch and triton; callers (adapters/blockdiag.py, parallel/merged.py) dispatch to them and
keep a torch form for the CPU."""
