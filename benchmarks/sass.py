"""Static cost of the fused Triton GEMMs on Hopper, without a GPU: the K loop's machine code.

    .venv/bin/python benchmarks/sass.py [--configs all|first]

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

from qlora.quant.kernels import triton_matmul as tm  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MACS_PER_CYCLE = 2048  # dense bf16 MACs per SM and cycle (H100/H200: 989 TFLOPS = 132 SMs x 2048 x 2 x 1.83 GHz)
TYPES = {"data_ptr": "*u8", "scale_ptr": "*fp32", "pair_ptr": "*i64", "code_ptr": "*fp32", "scaling": "fp32"}


def build(kernel, constexprs: dict, warps: int, stages: int):
    """`kernel` compiled for sm_90: pointers 16-byte aligned, integer sizes multiples of 16 (but R)."""
    fn = kernel.fn
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = TYPES.get(name, "*bf16" if name.endswith("_ptr") else "i32")
            if sig[name].startswith("*") or (sig[name] == "i32" and name != "R"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def k_loop(cubin: bytes) -> list[str]:
    """The SASS lines of the longest backward-branching region (the K loop)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        lines = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                               check=True).stdout.splitlines()
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


if __name__ == "__main__":
    main()
