"""Static cost of the Triton kernels on Hopper, without a GPU: their sm_90 machine code.

    .venv/bin/python benchmarks/sass.py [--configs all|first] [--manual-bf16]

Builds triton_matmul's forward and backward kernels for sm_90 (every autotune config; bf16,
LoRA on, aligned tensors and sizes, as launched in training) with the ptxas and nvdisasm that
ship in the triton wheel, finds the K loop in the SASS and prints per loop iteration:
instructions per warp, the tensor-core work (HGMMA), shared-memory stores, and the deepest
`WARPGROUP.DEPBAR` wait (0: every MMA group is waited for before the next tile decodes;
1: one stays in flight). Then a first-order estimate: issue cycles (instructions x warps / 4
schedulers) against tensor-core cycles (the tile's MACs / 2048 bf16 MACs per SM-cycle,
H100/H200 dense), summed when the loop waits for every group, the larger of the two when
one stays in flight. It ignores memory latency and bandwidth: a lead, not a timing
(benchmarks/gpu.py times the kernels on a device).
Then the decode kernel (NF4 + DQ -> bf16, full programs) at the launches gpu.py sweeps:
instructions per thread and per decoded weight, against the issue budget of a weight
every 4 x 32 / (HBM bytes per SM-cycle / 2.53 bytes moved per weight) instruction slots
(H200: 4.8 TB/s over 132 SMs at 1.83 GHz, about 16).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qlora.kernels import triton_decode as td  # noqa: E402
from qlora.kernels import triton_matmul as tm  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MACS_PER_CYCLE = 2048  # dense bf16 MACs per SM and cycle (H100/H200: 989 TFLOPS = 132 SMs x 2048 x 2 x 1.83 GHz)
HBM_BYTES_PER_SM_CYCLE = 4.8e12 / 132 / 1.83e9
TYPES = {"data_ptr": "*u8", "absmax_ptr": "*u8", "scale_ptr": "*fp32", "nested_ptr": "*fp32", "nested_code_ptr": "*fp32",
         "pair_ptr": "*i64", "code_ptr": "*fp32", "scaling": "fp32", "offset": "fp32"}


def build(kernel, constexprs: dict, warps: int, stages: int, **options):
    """`kernel` compiled for sm_90: pointers 16-byte aligned, integer sizes multiples of 16 (but R)."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = TYPES.get(name, "*bf16" if name.endswith("_ptr") else "i32")
            if sig[name].startswith("*") or (sig[name] == "i32" and name != "R"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages, **options})


def sass(cubin: bytes) -> list[str]:
    """The instruction lines of `cubin`, disassembled."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        lines = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    return [line for line in lines if re.search(r"/\*[0-9a-f]+\*/\s", line) or re.match(r"^\.L_x_\d+:", line)]


def k_loop(cubin: bytes) -> list[str]:
    """The SASS lines of the longest backward-branching region (the K loop)."""
    lines = sass(cubin)
    best: list[str] = []
    for i, line in enumerate(lines):
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            end = next((j for j in range(i + 1, len(lines)) if f"BRA `({label.group(1)})" in lines[j]), None)
            if end is not None and end - i > len(best):
                best = lines[i:end + 1]
    return [line for line in best if re.search(r"/\*[0-9a-f]+\*/\s", line)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", choices=["all", "first"], default="all")
    ap.add_argument("--manual-bf16", action="store_true",
                    help="decode with the integer bf16 rounding (as the GPU launch did before 2026-11-28 late)")
    args = ap.parse_args()
    configs = tm._configs()[: 1 if args.configs == "first" else None]
    print(f"{'BLOCK_M x N x K':<16}{'warps':>6}{'stages':>7}  {'kernel':<6}{'instr/warp':>11}{'HGMMA':>7}{'STS':>5}"
          f"{'wait':>6}{'issue cyc':>11}{'MMA cyc':>9}{'estimate':>10}")
    for config in configs:
        block = config.kwargs
        for name, kernel in (("fwd", tm._fwd_kernel), ("bwd", tm._bwd_kernel)):
            constexprs = dict(block, HALF_BLOCK=32, ROWS_ALIGNED=True, HAS_LORA=True, BLOCK_R=16, INTERP=False,
                              DOT_PRECISION="tf32")
            if "HAS_BIAS" in kernel.fn.arg_names:
                constexprs["HAS_BIAS"] = False
            loop = k_loop(build(kernel, constexprs, config.num_warps, config.num_stages).asm["cubin"])
            ops = Counter(re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line).group(1) for line in loop)
            waits = [int(w, 16) for w in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", "\n".join(loop))]
            issue = len(loop) * config.num_warps / 4
            mma = block["BLOCK_M"] * block["BLOCK_N"] * block["BLOCK_K"] / MACS_PER_CYCLE
            in_flight = min(waits, default=0) >= 1
            estimate = max(issue, mma) if in_flight else issue + mma
            print(f"{block['BLOCK_M']:>4} x{block['BLOCK_N']:>4} x{block['BLOCK_K']:>4}{config.num_warps:>6}"
                  f"{config.num_stages:>7}  {name:<6}{len(loop):>11}{ops['HGMMA']:>7}{ops['STS']:>5}"
                  f"{min(waits, default=0):>6}{issue:>11.0f}{mma:>9.0f}{estimate / mma:>9.2f}x")

    budget = 4 * 32 / (HBM_BYTES_PER_SM_CYCLE / 2.53)
    print(f"\ndecode NF4 + DQ -> bf16 (default launch {td.DECODE_BYTES} bytes x {td.DECODE_WARPS} warps); budget at the "
          f"H200's memory bandwidth: {budget:.1f} instructions per weight")
    print(f"{'bytes x warps':<15}{'instr/thread':>13}{'weights/thread':>15}{'instr/weight':>13}{'shared':>8}")
    constexprs = dict(HALF_BLOCK=32, DQ=True, COLS=32, MANUAL_BF16=args.manual_bf16)
    if "EVEN" in td._decode_kernel.arg_names:
        constexprs["EVEN"] = True
    for nbytes, warps in ((512, 4), (1024, 8), (2048, 8), (2048, 16), (4096, 8), (8192, 16)):
        code = sass(build(td._decode_kernel, dict(constexprs, BYTES=nbytes), warps, 1, **td.LAUNCH).asm["cubin"])
        count = sum(1 for line in code if not line.startswith(".L"))
        weights = 2 * nbytes / (32 * warps)
        shared = sum(1 for line in code if re.search(r"\b(STS|LDS)", line))
        print(f"{nbytes:>6} x {warps:<6}{count:>13}{weights:>15.0f}{count / weights:>13.1f}{shared:>8}")
    import importlib.util  # the kernel timed on the H200 (0.74 of copy bandwidth), kept in benchmarks/gpu.py

    spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).with_name("gpu.py"))
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    code = sass(build(gpu._decode_before_kernel, dict(HALF_BLOCK=32, BYTES=2048), 8, 1, **td.LAUNCH).asm["cubin"])
    count = sum(1 for line in code if not line.startswith(".L"))
    print(f"the kernel timed on the H200, 2048 x 8: {count} instructions per thread, {count / 16:.1f} per weight")


if __name__ == "__main__":
    main()
