"""Compile MoRA's block-gradient kernels for sm_90a without a GPU (Triton's bundled ptxas) and print
their size: a check that a kernel change builds for the H100/H200, and that a refactor kept the code
of a kernel that was timed (same PTX instruction count as before).

    PYTHONPATH=. .venv/bin/python launch/kernel_aot.py

Rows: kernel, rotation or decouple, rh, paired rotation columns, the tiling `grad_config` gives, PTX
instructions, cubin bytes. 8B shapes: rh 256 (q, o), 202 (k, v), 384 (gate, up, down).
"""
from __future__ import annotations

import os
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mora_dist.kernels import blockdiag as k  # noqa: E402

PTRS = dict(g_ptr="*bf16", x_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", tab_ptr="*i32", part_ptr="*fp32")


def compile_one(fn, scalars: dict, consts: dict, cfg: dict):
    sig = {**PTRS, **scalars, **{c: "constexpr" for c in consts}}
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    return sum(1 for line in c.asm["ptx"].splitlines() if re.match(r"\s+[a-z]", line)), len(c.asm["cubin"])


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90a")
    print("kernel  rot   rh  pair  tiling                   ptx  cubin")
    for rot, rh in [(True, 256), (True, 202), (True, 384), (False, 256), (False, 384)]:
        align = 8 if rh % 8 == 0 else 2
        pair = rot and (rh // 2) % align == 0
        for impl in ("v9", "new"):
            cfg = k.grad_config(rh, 2, pair or not rot, impl=impl)
            if impl == "v9":
                consts = dict(RH=rh, ROT=rot, ALIGN=align, ACC=tl.float32, BI=cfg["BI"], BK=cfg["BK"], BT=cfg["BT"],
                              TB=cfg["TB"], UPP=cfg["UPP"])
                n, size = compile_one(k._grad_kernel_v9, dict(T="i32", sg="i32", sx="i32", n_units="i32", NTB="i32"),
                                      consts, cfg)
            else:
                consts = dict(RH=rh, ROT=rot, PAIR=pair, ALIGN=align, ACC=tl.float32, BI=cfg["BI"], BK=cfg["BK"],
                              BT=cfg["BT"], TP=2048)
                n, size = compile_one(k._grad_kernel, dict(T="i32", sg="i32", sx="i32", NS="i32"), consts, cfg)
            tiling = f"{cfg['BI']}x{cfg['BK']} w{cfg['num_warps']} s{cfg['num_stages']}"
            print(f"{impl:6s} {str(rot):5s} {rh:4d}  {str(pair):5s} {tiling:22s} {n:5d} {size:6d}", flush=True)


if __name__ == "__main__":
    main()
