"""qlora on a busy machine: a training run alone and beside a fixed CPU load, as a ratio.

    flock /tmp/qlora-bench.lock .venv/bin/python benchmarks/busy.py [--config qlora/assets/demo_tiny.yaml]
        [--max-steps N] [--repeats 1] [--spincount N ...]

Runs `qlora train --config CONFIG` (default: the tiny demo, demo generations included, as a user
runs it) in a fresh process, once alone and once while another process runs a 2-thread PyTorch
matmul loop (torch's defaults, like any other job) on the same cores; the ratio loaded/alone
is the slowdown. A fair share is about 2x on 2 cores (3 busy threads where there were 2 or
fewer). Two setups side by side, interleaved: qlora as it ships (OpenMP workers wait passively,
qlora/threads.py) and libgomp's default wait policy (QLORA_OMP_PASSIVE=0: the workers spin
after every parallel region); `--spincount N` adds a setup with GOMP_SPINCOUNT=N (spin N
iterations, then sleep: qlora leaves an explicit GOMP_SPINCOUNT alone). Other jobs on the
machine load it too: the load average is printed before and after; read the ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = """
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a @ a
"""
SETUPS = {"qlora (passive OpenMP wait)": {}, "libgomp default (spinning wait)": {"QLORA_OMP_PASSIVE": "0"}}


def run_once(config: str, max_steps: int | None, env: dict[str, str], loaded: bool) -> float:
    """Wall seconds of one `qlora train` in a fresh process (beside the load when `loaded`)."""
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if loaded else None
    out = Path(tempfile.mkdtemp(prefix="qlora-busy-"))
    try:
        if load is not None:
            time.sleep(2)  # the load is running before the run starts
        cmd = [sys.executable, "-m", "qlora", "train", "--config", config, "--output", str(out)]
        if max_steps is not None:
            cmd += ["--max-steps", str(max_steps)]
        t = time.perf_counter()
        done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if done.returncode:
            raise SystemExit(f"qlora train failed:\n{done.stderr[-3000:]}")
        return seconds
    finally:
        if load is not None:
            load.kill()
            load.wait()
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="qlora/assets/demo_tiny.yaml", help="recipe to train (default: the tiny demo)")
    ap.add_argument("--max-steps", type=int, help="stop after N steps (default: the recipe's whole run)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each case (the median is shown)")
    ap.add_argument("--spincount", type=int, nargs="*", default=[], help="also run with GOMP_SPINCOUNT=N")
    args = ap.parse_args()
    for n in args.spincount:
        SETUPS[f"GOMP_SPINCOUNT={n}"] = {"GOMP_SPINCOUNT": str(n)}
    print(f"{os.cpu_count()} CPUs; load average before: {' '.join(open('/proc/loadavg').read().split()[:3])}; "
          f"{args.config}" + (f", {args.max_steps} steps" if args.max_steps else ""), flush=True)
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for loaded in (False, True):
            for name, env in SETUPS.items():
                seconds = run_once(args.config, args.max_steps, env, loaded)
                times.setdefault((name, loaded), []).append(seconds)
                print(f"  {name}, {'beside the load' if loaded else 'alone'}: {seconds:.1f} s", flush=True)
    print(f"load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"\n{'setup':<34}{'alone s':>9}{'loaded s':>10}{'ratio':>8}")
    for name in SETUPS:
        alone, loaded = (sorted(times[name, x])[len(times[name, x]) // 2] for x in (False, True))
        print(f"{name:<34}{alone:>9.1f}{loaded:>10.1f}{loaded / alone:>7.1f}x")


if __name__ == "__main__":
    main()
