"""Fuzz the file readers as a plain loop (no hypothesis, no shrinking): cases tried / held / failed per reader.

    .venv/bin/python benchmarks/fuzz.py [--cases 2000] [--seed 0] [--readers gguf]

Case i of a reader runs its mutation strategy with random.Random(seed + i), so a failure is
reproduced by `--seed S --cases 1` with the S it prints. A reader is registered in READERS as a
function of a scratch directory returning the case runner: runner(rng) returns an outcome label
or raises when the reader breaks its property (see tests/fuzz/gguf_mutations.py for GGUF's).
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fuzz"))
from gguf_mutations import GGUFCase  # noqa: E402

READERS: dict[str, Callable[[Path], Callable[[random.Random], str]]] = {"gguf": GGUFCase}


def run(name: str, cases: int, seed: int) -> list[tuple[int, str]]:
    """Run `cases` cases of reader `name`; print the outcomes; return the (seed, error) of each failure."""
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[tuple[int, str]] = []
    with tempfile.TemporaryDirectory() as workdir:
        runner = READERS[name](Path(workdir))
        for i in range(cases):
            try:
                outcomes[runner(random.Random(seed + i))] += 1
            except Exception as e:  # any escape from the property is a finding
                failures.append((seed + i, "".join(traceback.format_exception_only(e)).strip()))
    print(f"{name}: {cases} cases tried, {cases - len(failures)} held, {len(failures)} failed")
    for outcome, n in sorted(outcomes.items()):
        print(f"  {outcome:<32}{n:>8}")
    for case_seed, error in failures[:20]:
        print(f"  FAIL --seed {case_seed} --cases 1 --readers {name}: {error}")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=2000, help="cases per reader")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case")
    p.add_argument("--readers", nargs="+", default=list(READERS), choices=list(READERS))
    args = p.parse_args()
    failed = [run(name, args.cases, args.seed) for name in args.readers]
    sys.exit(1 if any(failed) else 0)


if __name__ == "__main__":
    main()
