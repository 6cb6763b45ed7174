"""Measure the demo model's numbers for docs/tutorial.md, and re-render the tutorial.

    OMP_NUM_THREADS=1 python scripts/tutorial_numbers.py --measure   # ~2 min: perplexities + 2 fine-tunes
    python scripts/tutorial_numbers.py                                # re-render docs/tutorial.md (a few s)
    python scripts/tutorial_numbers.py --check                        # exit 1 if the tutorial is stale

--measure writes docs/tutorial_numbers.json: the shipped tiny Llama's held-out perplexity
(all whole 256-token windows of its held-out stdlib files, and the first 4 windows, which
tests/test_explain.py recomputes) unquantized (bf16 weights), NF4 + DQ, NF4, FP4 and INT4,
all in fp32 compute; and the tiny-model demo fine-tune (qlora/assets/demo_tiny.yaml, fp32
compute) with QLoRA (NF4 + DQ base) and with 16-bit LoRA (quant_type none) on the same
data, seed and steps. Rendering fills every <!-- q:KEY --> marker of docs/tutorial.md
(qlora/explain/tutorial.py) and draws the tutorial's PNGs into docs/img/.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora.explain import measured, tutorial  # noqa: E402

TUTORIAL = ROOT / "docs" / "tutorial.md"
NUMBERS = ROOT / "docs" / "tutorial_numbers.json"
SMALL_WINDOWS = 4


def measure() -> dict:
    full_ids = measured.heldout_ids()
    small_ids = full_ids[:SMALL_WINDOWS]
    ppl_full, ppl_small = {}, {}
    for label, q, dq in measured.PPL_CASES:
        model = measured.demo_model(q, dq)
        ppl_full[label] = measured.perplexity(model, full_ids)
        ppl_small[label] = measured.perplexity(model, small_ids)
        print(f"held-out perplexity {label:<7} {ppl_full[label]:.4f}  (first {SMALL_WINDOWS} windows: {ppl_small[label]:.4f})")
    finetune = {}
    with tempfile.TemporaryDirectory() as tmp:
        for q in ("nf4", "none"):
            finetune[q] = measured.demo_finetune(q, Path(tmp) / q)
            print(json.dumps(finetune[q]))
    return {
        "command": "OMP_NUM_THREADS=1 python scripts/tutorial_numbers.py --measure",
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "perplexity": {"seq": measured.SEQ, "windows": int(full_ids.shape[0]), "tokens": int(full_ids.numel()),
                       "full": ppl_full, "small_windows": SMALL_WINDOWS, "small": ppl_small},
        "finetune": finetune,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="rerun the demo-model measurements first (minutes)")
    ap.add_argument("--check", action="store_true", help="only report stale numbers; exit 1 if any")
    args = ap.parse_args()
    if args.measure:
        numbers = measure()
        tmp = NUMBERS.with_suffix(".tmp")
        tmp.write_text(json.dumps(numbers, indent=2) + "\n")
        tmp.replace(NUMBERS)
        print(f"wrote {NUMBERS}")
    text = TUTORIAL.read_text()
    values = tutorial.tutorial_values(NUMBERS)
    diffs = tutorial.stale(text, values)
    for key, old, new in diffs:
        print(f"{key}: {old.strip()[:60]!r} -> {new.strip()[:60]!r}")
    if args.check:
        print(f"{len(diffs)} stale marker(s) in {TUTORIAL}")
        return 1 if diffs else 0
    TUTORIAL.write_text(tutorial.render(text, values, str(TUTORIAL)))
    from qlora.explain import blocks, nf4

    img = ROOT / "docs" / "img"
    img.mkdir(exist_ok=True)
    blocks.plot_blocks(blocks.explain_blocks(), img / "blocks.png")
    nf4.plot_levels(nf4.explain_nf4(minilm=False), img / "nf4_vs_int4.png")
    print(f"rendered {TUTORIAL} ({len(diffs)} marker(s) changed) and the PNGs in {img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
