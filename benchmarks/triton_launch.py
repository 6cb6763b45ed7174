"""Host cost of qlora's Python around each Triton launch (decode and dropout), measured on the CPU.

    .venv/bin/python benchmarks/triton_launch.py [--against REV] [--calls 20000]

A training step launches a 4-bit decode and a seeded dropout per adapted layer and pass (924 a
step for the 1.1B Llama with checkpointing); on a GPU the host time of each launch is qlora's
Python around it plus Triton's own launch. This measures the first part without a GPU: the
devices Triton serves are set to include the CPU and Triton's `JITFunction.run` is replaced by
a no-op, so a call runs everything qlora does (dispatch, checks, arguments, the device context)
up to the launch. Printed per call, in microseconds: `kernels.decode_4bit` (what Linear4bit's
decode calls: a layer's weight into its workspace), `kernels.seeded_dropout` (LoRA dropout of a
128 x 2048 bf16 input with a seed tensor), and the floor: the bare `kernel[grid](...)` call with
the same arguments. `--against REV` runs the same measurement on another revision (a temporary
git worktree) in the same run, side by side.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
import triton.runtime.jit as jit
import qlora, qlora.kernels as K
from qlora.kernels import triton_decode, triton_dropout
torch.set_num_threads(1)
jit.JITFunction.run = lambda self, *a, **k: None  # everything up to the launch, no launch
K.TRITON_DEVICE_TYPES.add("cpu")
calls = int(sys.argv[1])
qt = qlora.Linear4bit.from_linear(torch.nn.Linear(2048, 2048)).weight
out = torch.empty(qt.numel(), dtype=torch.bfloat16)
x = torch.randn(128, 2048, dtype=torch.bfloat16)
dropped, seed = torch.empty_like(x), torch.tensor(7)
args = (qt.data, qt.absmax, qt.nested_absmax, qt.nested_code, float(qt.nested_offset), triton_decode.code_pairs(qt.code),
        out, qt.numel(), qt.numel() // 2)
options = dict(HALF_BLOCK=32, DQ=True, BYTES=2048, COLS=32, MANUAL_BF16=False, EVEN=True, num_warps=8,
               **triton_decode.LAUNCH)

def per_call(fn):
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best

print(json.dumps({
    "decode": per_call(lambda: K.decode_4bit(qt, out)),
    "dropout": per_call(lambda: K.seeded_dropout(x, dropped, 3277, 1 / 0.95, seed)),
    "floor": per_call(lambda: triton_decode._decode_kernel[(256,)](*args, **options)),
}))
"""


def measure(tree: Path, calls: int) -> dict[str, float]:
    env = {"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(calls)], env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(f"the measurement failed in {tree}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="another git revision, measured in the same run")
    ap.add_argument("--calls", type=int, default=20000)
    a = ap.parse_args()
    rows = [("this tree", ROOT)]
    with tempfile.TemporaryDirectory() as tmp:
        if a.against:
            other = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(other), a.against], check=True)
            rows.append((a.against, other))
        try:
            results = [(name, measure(tree, a.calls)) for name, tree in rows]
        finally:
            if a.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=True)
    print("qlora's Python around one Triton launch, us per call (best of 5 x --calls; Triton's run a no-op)")
    print(f"{'tree':<14} {'decode':>8} {'dropout':>8} {'floor':>8} {'decode/floor':>13} {'dropout/floor':>14}")
    for name, r in results:
        print(f"{name:<14} {r['decode']:8.2f} {r['dropout']:8.2f} {r['floor']:8.2f} {r['decode'] / r['floor']:12.1f}x "
              f"{r['dropout'] / r['floor']:13.1f}x")


if __name__ == "__main__":
    main()
