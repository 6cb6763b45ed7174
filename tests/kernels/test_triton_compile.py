"""The Triton kernels compile for a real GPU (sm_90, H100/H200) without one: the interpreter
tests run the INTERP branches, this one builds the GPU branches to PTX and a cubin with the
ptxas that ships in the triton wheel, in a subprocess without TRITON_INTERPRET.

Also checked in the PTX: the decode kernels contain no fused multiply-add (the scale
nested_code * nested_absmax + offset must round the product, as blockwise.py does) and
round to bf16 with the hardware's nearest-even conversion (cvt.rn.bf16x2.f32), the
GEMMs use Hopper's wgmma and, from triton 3.9, keep one MMA group in flight (the decoded W
is its register operand, triton_matmul.py), on 16-byte-aligned sizes decode stores are 16-byte vectors,
each thread loads its block's scale once (not once per byte), and seeded dropout reads and
writes 16-byte vectors.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'qlora[dev]' on Linux x86-64)")

CHILD = textwrap.dedent("""
    import collections, json, re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from qlora.kernels import triton_decode as td, triton_dropout as tdo, triton_matmul as tm, triton_rotary as tr
    assert not td.INTERPRET
    target = GPUTarget("cuda", 90, 32)

    def ptx(fn, sig, consts, aligned=(), **options):
        sig = {**sig, **{k: "constexpr" for k in consts}}
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}  # what a launch on aligned tensors specializes
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                              options=options).asm["ptx"]

    ops = lambda text: collections.Counter(re.findall(r"\\b(fma\\.rn\\.f32|wgmma\\.mma_async|"
        r"wgmma\\.wait_group\\.sync\\.aligned \\d+|cvt\\.rn\\.bf16x2\\.f32|[ls][dt]\\.global[\\w.]*)", text))
    out = {}
    for dtype in ("bf16", "fp32"):  # as launched on a GPU: hardware bf16 rounding; full programs and the last one
        sig = dict(data_ptr="*u8", absmax_ptr="*u8", nested_ptr="*fp32", nested_code_ptr="*fp32", offset="fp32",
                   pair_ptr="*i64", out_ptr="*" + dtype, n="i32", nbytes="i32")
        for even in (True, False):
            consts = dict(HALF_BLOCK=32, DQ=True, BYTES=td.DECODE_BYTES, COLS=32, MANUAL_BF16=False, EVEN=even)
            out["decode_" + dtype + ("" if even else "_masked")] = ops(ptx(
                td._decode_kernel, sig, consts, aligned=range(9), num_warps=td.DECODE_WARPS, **td.LAUNCH))
    sig = dict(absmax_ptr="*u8", nested_ptr="*fp32", nested_code_ptr="*fp32", offset="fp32", out_ptr="*fp32", nblocks="i32")
    out["scales"] = ops(ptx(td._scales_kernel, sig, dict(BLOCK=1024), num_warps=4, **td.LAUNCH))
    # bf16 GEMMs only (fp32 ones take several times longer to build), both scale paths:
    # one scale per tile row (forward), one per byte (backward)
    cfg = tm._configs()[0].kwargs
    common = dict(HALF_BLOCK=32, HAS_LORA=True, BLOCK_R=16, INTERP=False, DOT_PRECISION="tf32", **cfg)
    a = "*bf16"
    sig = dict(x_ptr=a, data_ptr="*u8", scale_ptr="*fp32", pair_ptr="*i64", xa_ptr=a, b_ptr=a, bias_ptr=a,
               y_ptr=a, M="i32", N="i32", K="i32", R="i32", scaling="fp32")
    # as launched on torch tensors (16-byte aligned) with M, N, K multiples of 16
    out["fwd_bf16"] = ops(ptx(tm._fwd_kernel.fn, sig, dict(common, HAS_BIAS=True, ROWS_ALIGNED=True), aligned=range(11),
                              num_warps=8, num_stages=3))
    sig = dict(dy_ptr=a, data_ptr="*u8", scale_ptr="*fp32", pair_ptr="*i64", g_ptr=a, a_ptr=a, dx_ptr=a,
               M="i32", N="i32", K="i32", R="i32", scaling="fp32")
    out["bwd_bf16"] = ops(ptx(tm._bwd_kernel.fn, sig, dict(common, ROWS_ALIGNED=False), aligned=range(10), num_warps=8,
                              num_stages=3))
    # seeded dropout, with the argument types its launcher passes (the seed an int64 tensor), n % 16 == 0
    sig = dict(x_ptr="*bf16", out_ptr="*bf16", x2_ptr="*bf16", out2_ptr="*bf16", n="i32", seed_ptr="*i64",
               threshold="i32", scale="fp32", scale2="fp32")
    out["dropout_bf16"] = ops(ptx(tdo._dropout_kernel, sig, dict(PAIR=False, BF16=True, BLOCK=tdo.BLOCK),
                                  aligned=range(5), num_warps=4))
    # rotary, both directions (a Llama head dim of 128; 32 query heads)
    for dtype in ("bf16", "fp32"):
        ints = ("hq", "qsb", "qsh", "qst", "hk", "ksb", "ksh", "kst", "csb", "cst", "tokens")
        sig = {**{n: "*" + dtype for n in ("q_ptr", "qo_ptr", "k_ptr", "ko_ptr", "cos_ptr", "sin_ptr")},
               **dict.fromkeys(ints, "i32")}
        for backward in (False, True):
            out[f"rotary_{dtype}_{'bwd' if backward else 'fwd'}"] = ops(ptx(
                tr._rotary_kernel, sig, dict(HALF=64, BLOCK_H=32, BLOCK_D=64, BACKWARD=backward), aligned=range(6),
                num_warps=4, **td.LAUNCH))
    print(json.dumps(out))
""")


def test_triton_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no NVIDIA backend here ({e})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the old default (and it silences triton 3.9's notice about it)
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("decode_bf16", "decode_fp32", "decode_bf16_masked", "decode_fp32_masked", "scales"):
        assert ops[name].get("fma.rn.f32", 0) == 0, (name, ops[name])
    for name in ("decode_bf16", "decode_fp32", "decode_bf16_masked", "decode_fp32_masked"):
        assert ops[name].get("st.global.v4.b32", 0) > 0, (name, ops[name])
        # a thread's bytes lie in one block: one load of its block's 8-bit scale code, not one per byte
        byte_loads = sum(n for op, n in ops[name].items() if re.fullmatch(r"ld\.global\S*\.[bus]8", op))
        assert byte_loads == 1, (name, ops[name])
    assert ops["decode_bf16"].get("cvt.rn.bf16x2.f32", 0) > 0, ops["decode_bf16"]  # round to nearest even in hardware
    import triton

    for name in ("fwd_bf16", "bwd_bf16"):
        assert ops[name].get("wgmma.mma_async", 0) > 0, ops
        # the decoded W is wgmma's register operand: from triton 3.9 one MMA group stays in flight while the
        # next tile decodes (3.6, the H200 image's, waits for each group either way: benchmarks/sass.py)
        if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9):
            assert ops[name].get("wgmma.wait_group.sync.aligned 1", 0) > 0, ops
    # dropout: one pass, 16-byte vector loads and stores
    assert ops["dropout_bf16"].get("ld.global.v4.b32", 0) > 0 and ops["dropout_bf16"].get("st.global.v4.b32", 0) > 0
    # rotary: each product rounded before its sum, as torch's ops round them: no contraction into an FMA
    rot = [f"rotary_{d}_{w}" for d in ("bf16", "fp32") for w in ("fwd", "bwd")]
    for name in rot:
        assert ops[name].get("fma.rn.f32", 0) == 0 and any(op.startswith("st.global") for op in ops[name]), ops[name]
    assert set(ops) == {"decode_bf16", "decode_fp32", "decode_bf16_masked", "decode_fp32_masked", "scales", "fwd_bf16",
                        "bwd_bf16", "dropout_bf16", *rot}
