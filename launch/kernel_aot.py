"""Compile MoRA's block-gradient kernels, the SwiGLU backward, the block sums, the factor gradients' pass over g and the RoPE kernel for sm_90a without a GPU (Triton's bundled ptxas) and print their size: a check that a kernel
change builds for the H100/H200, and that a refactor kept the code of a kernel that was timed (same
PTX instruction count as before). RoPE rows: forward / backward at head dim 128, bf16.

    PYTHONPATH=. .venv/bin/python launch/kernel_aot.py

Block-gradient rows: kernel, rotation or decouple, rh, paired rotation columns, the tiling
`grad_config` gives, PTX instructions, cubin bytes. 8B shapes: rh 256 (q, o), 202 (k, v), 384
(gate, up, down). SwiGLU backward (kernels/swiglu.py) and RoPE rows: PTX instructions, cubin bytes,
and registers / stack bytes a thread (cuobjdump -res-usage; stack > 0: spills).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mora_dist.kernels import blockdiag as k  # noqa: E402
from mora_dist.kernels import rope  # noqa: E402

PTRS = dict(g_ptr="*bf16", x_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", tab_ptr="*i32", part_ptr="*fp32")


def compile_one(fn, scalars: dict, consts: dict, cfg: dict, ptrs: dict = PTRS, regs: bool = False, div16=()):
    """div16: arguments known to be multiples of 16 (pointers: 16-byte aligned), as Triton's JIT
    specializes them at launch (tt.divisibility): what lets it vectorize loads and stores."""
    sig = {**ptrs, **scalars, **{c: "constexpr" for c in consts}}
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    out = sum(1 for line in c.asm["ptx"].splitlines() if re.match(r"\s+[a-z]", line)), len(c.asm["cubin"])
    return out + resources(c.asm["cubin"]) if regs else out


def resources(cubin: bytes):
    """(registers, stack bytes) a thread, from the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return (int(m[1]), int(m[2])) if m else ("?", "?")


def rope_rows():
    """The RoPE kernel (kernels/rope.py) at head dim 128, bf16: forward and backward."""
    print("rope    pass      ptx  cubin  regs  stack")
    ptrs = dict(t_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", out_ptr="*bf16")
    scalars = {a: "i32" for a in ("R", "B", "H", "s_t0", "s_t1", "s_t2")}
    for bwd in (False, True):
        n, size, reg, stack = compile_one(rope._rope_kernel, scalars, dict(HALF=64, BACKWARD=bwd, ACC=tl.float32,
                                          BLOCK_R=32, BLOCK_D=64), dict(num_warps=4, num_stages=1), ptrs, regs=True,
                                          div16=(*ptrs, "s_t0", "s_t1", "s_t2"))
        print(f"rope    {'backward' if bwd else 'forward':8s} {n:5d} {size:6d}  {reg:4} {stack:6}", flush=True)


def swiglu_back_rows():
    """The SwiGLU backward kernel (kernels/swiglu.py) at its tiling, bf16, aligned 8B-shape strides."""
    from mora_dist.kernels import swiglu

    ptrs = dict(y_ptr="*bf16", d_ptr="*bf16", g_ptr="*bf16")
    n, size, reg, stack = compile_one(
        swiglu._swiglu_back_kernel, {a: "i32" for a in ("T", "F", "s_y", "s_d", "s_g")},
        dict(ACC=tl.float32, RND=False, BT=swiglu.BLOCK_T, BF=swiglu.BLOCK_F),
        dict(num_warps=swiglu.NUM_WARPS, num_stages=1), ptrs, regs=True, div16=(*ptrs, "F", "s_y", "s_d", "s_g"))
    print(f"swiglu_back {swiglu.BLOCK_T}x{swiglu.BLOCK_F} w{swiglu.NUM_WARPS}  ptx {n}  cubin {size}  regs {reg}  "
          f"stack {stack}", flush=True)


def tile_sum_rows():
    """The block-sum kernel (kernels/tilesum.py) at its tiling, bf16, aligned strides: plain (the block
    types' fold of g, 4 tiles at 8B), wrapped (sharing's compress of x) and adding into fp32 (q/k/v groups)."""
    from mora_dist.kernels import tilesum

    for name, wrap, add, nb in (("fold", False, False, 4), ("wrap", True, False, 16), ("groups", False, True, 3)):
        ptrs = dict(src_ptr="*bf16", out_ptr="*fp32" if add else "*bf16")
        n, size, reg, stack = compile_one(
            tilesum._tile_sum_kernel, {a: "i32" for a in ("T", "L", "n", "width", "shift", "s_src", "s_out")},
            dict(NB=nb, WRAP=wrap, ADD=add, ALIGN=8, ACC=tl.float32, BT=tilesum.BT, BP=tilesum.BP, U=4),
            dict(num_warps=tilesum.NUM_WARPS, num_stages=3), ptrs, regs=True,
            div16=(*ptrs, "L", "n", "width", "s_src", "s_out"))
        print(f"tile_sum {name:6s} {tilesum.BT}x{tilesum.BP} w{tilesum.NUM_WARPS}  ptx {n}  cubin {size}  regs {reg}  "
              f"stack {stack}", flush=True)


def dual_mm_rows(configs=None):
    """The factor gradients' one pass over g (kernels/dualmm.py), bf16, aligned strides, k = 16 (fc1's two
    LoRA terms at r = 8): its two tilings, or each of `configs` (launch/bench_factor_grads.CONFIGS)."""
    from mora_dist.kernels import dualmm

    ptrs = dict(m_ptr="*bf16", a_ptr="*bf16", b_ptr="*bf16", pa_ptr="*fp32", pb_ptr="*fp32")
    for bm, bd, warps, stages in configs or [dualmm.config(28672), dualmm.config(4096)]:
        n, size, reg, stack = compile_one(
            dualmm._dual_kernel, {a: "i32" for a in ("N", "D", "KA", "KB", "s_m", "s_a", "s_b")},
            dict(D_PER=1728, BM=bm, BD=bd, KAP=16, KBP=16, ACC=tl.float32, PREC="tf32"),
            dict(num_warps=warps, num_stages=stages), ptrs, regs=True, div16=(*ptrs, "D", "s_m", "s_a", "s_b"))
        print(f"dual_mm {bm}x{bd} w{warps} s{stages} ptx {n}  cubin {size}  "
              f"regs {reg}  stack {stack}", flush=True)


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
    swiglu_back_rows()
    tile_sum_rows()
    dual_mm_rows()
    rope_rows()


if __name__ == "__main__":
    main()
