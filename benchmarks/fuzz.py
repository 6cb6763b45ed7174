"""Fuzz every file reader as a plain loop (no hypothesis, no shrinking): cases tried / held / failed per reader.

    .venv/bin/python benchmarks/fuzz.py [--cases 2000] [--seed 0] [--readers gguf safetensors ...]

Readers: GGUF files, safetensors checkpoints, data rows (JSONL / JSON / CSV), YAML recipes,
adapter directories (loaded onto their base) and pre-quantized bitsandbytes checkpoints (the
output of `qlora quantize`, loaded with load_model). Each strategy and property lives in
tests/fuzz/*_mutations.py, which the hypothesis tests in tests/fuzz run 100 to 250 times each.
Case i of a reader runs its mutation with random.Random(seed + i), so a failure is reproduced
by `--seed S --cases 1 --readers R` with the S it prints. A runner(rng) returns an outcome label
("kind: rejected / equal / changed / read") or raises when the reader breaks its property.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fuzz"))
from adapter_mutations import AdapterCase  # noqa: E402
from bnb_mutations import BnbCase  # noqa: E402
from data_mutations import DataCase, RecipeCase  # noqa: E402
from gguf_mutations import GGUFCase  # noqa: E402
from safetensors_mutations import SafetensorsCase  # noqa: E402

READERS: dict[str, Callable[[Path], Callable[[random.Random], str]]] = {
    "gguf": GGUFCase, "safetensors": SafetensorsCase, "data": DataCase, "yaml": RecipeCase, "adapter": AdapterCase,
    "bnb": BnbCase,
}


def run(name: str, cases: int, seed: int, verbose: bool = False) -> list[tuple[int, str]]:
    """Run `cases` cases of reader `name`; print the outcomes; return the (seed, error) of each failure."""
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[tuple[int, str]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = READERS[name](Path(workdir))
        for i in range(cases):
            try:
                outcomes[runner(random.Random(seed + i))] += 1
            except Exception as e:  # any escape from the property is a finding
                failures.append((seed + i, "".join(traceback.format_exception_only(e)).strip()))
    print(f"{name}: {cases} cases tried, {cases - len(failures)} held, {len(failures)} failed "
          f"({time.perf_counter() - start:.0f} s)")
    by_result = collections.Counter()
    for outcome, n in outcomes.items():
        by_result[outcome.rsplit(": ", 1)[-1]] += n
    print("  " + ", ".join(f"{result} {n}" for result, n in sorted(by_result.items())), flush=True)
    if verbose:
        for outcome, n in sorted(outcomes.items()):
            print(f"    {outcome:<60}{n:>8}")
    for case_seed, error in failures[:20]:
        print(f"  FAIL --seed {case_seed} --cases 1 --readers {name}: {error}")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=2000, help="cases per reader")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case")
    p.add_argument("--readers", nargs="+", default=list(READERS), choices=list(READERS))
    p.add_argument("--verbose", action="store_true", help="outcomes per mutation kind too")
    args = p.parse_args()
    failed = [run(name, args.cases, args.seed, args.verbose) for name in args.readers]
    total = args.cases * len(args.readers)
    print(f"all readers: {total} cases tried, {total - sum(map(len, failed))} held")
    sys.exit(1 if any(failed) else 0)


if __name__ == "__main__":
    main()
