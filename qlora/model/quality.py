"""What quantization costs a real model, in perplexity: one row per base recipe.

    rows = quality_report("SmolLM2.gguf", "held_out.txt", calibrate="other.txt")
    qlora quantize-report --model M --data TEXT [--calibrate CALIB] [--recipes bf16,absmax,calibrated,loftq]

Each recipe loads the model afresh (a bounded peak each) and scores it on `seq`-token windows
of the evaluation text, in float32 on the CPU (the compute dtype elsewhere):
- bf16: the 16-bit model (quant_type none);
- absmax, fp4, int4: `load_model`'s round-to-nearest with absmax scales (+DQ), what
  bitsandbytes does (absmax NF4 is bit-exact with it);
- calibrated: GPTQ on the calibration text (model/calibrate.py), same format and bits;
- loftq: calibrated + LoftQ rank-`rank` factors as the LoRA start (adapter bits reported apart);
- loftq-absmax: LoftQ on absmax codes, no calibration data;
- self-calibrated: GPTQ on text the model samples itself (`--calibrate self`), no data.
Without `calibrate` the evaluation text's first windows calibrate and the rest evaluate, so
the two never overlap. Bits per parameter count the quantized linears' storage (4.127 with DQ)
over all their parameters; `adapter_bits` is LoftQ's 16-bit A and B over the same count.
Tests: tests/model/test_quality.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

RECIPES = ("bf16", "absmax", "fp4", "int4", "calibrated", "loftq", "loftq-absmax", "self-calibrated")


@dataclass
class Row:
    recipe: str
    perplexity: float
    bits_per_param: float
    adapter_bits_per_param: float
    seconds: float


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 2) -> float:
    """exp(mean next-token NLL) over the windows ids [n, seq]."""
    nll, count = 0.0, 0
    for x in ids.split(batch_size):
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll += float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def _bits(model: nn.Module) -> tuple[float, float]:
    """(storage bits per decoder-layer linear parameter, LoftQ adapter bits per such parameter)."""
    from ..nn.linear4bit import Linear4bit

    bits = params = adapter = 0.0
    for name, m in model.model.layers.named_modules():
        if isinstance(m, Linear4bit):
            bits += m.weight.bits_per_param * m.weight.numel()
            params += m.weight.numel()
            adapter += 16 * sum(t.numel() for t in getattr(m, "lora_init", None) or ())
        elif isinstance(m, nn.Linear) and not name.endswith(("lora_A", "lora_B")):
            bits += 16 * m.weight.numel()
            params += m.weight.numel()
    return bits / max(params, 1), adapter / max(params, 1)


def load_recipe(model: str, recipe: str, calib_ids: torch.Tensor | None, rank: int = 64, loftq_iters: int = 1,
                progress: bool = False) -> nn.Module:
    """The model under `recipe` (see the module docstring), float32 compute, eval mode."""
    from ..nn.lora import LoraConfig
    from .calibrate import calibrate_model, checkpoint_weights, generated_ids, make_quantizer
    from .load import load_model
    from .prepare import prepare_model

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    quant_type = {"bf16": "none", "fp4": "fp4", "int4": "int4"}.get(recipe, "nf4")
    m = load_model(model, quant_type=quant_type, compute_dtype=torch.float32, progress=progress)
    if recipe in ("calibrated", "loftq", "loftq-absmax", "self-calibrated"):
        fn = make_quantizer(loftq_rank=rank if recipe.startswith("loftq") else 0, loftq_iters=loftq_iters)
        ids = None if recipe == "loftq-absmax" else calib_ids
        if recipe == "self-calibrated":
            rows, seq = calib_ids.shape if calib_ids is not None else (32, 512)
            ids = generated_ids(m, rows, seq)
        for name, result in calibrate_model(m, ids, checkpoint_weights(model, m), fn, progress=progress).items():
            if isinstance(result, tuple):
                m.get_submodule(name).lora_init = result[1:]
        if recipe.startswith("loftq"):  # scaling 1: the adapter starts at exactly B A
            prepare_model(m, lora=LoraConfig(r=rank, alpha=rank, target_modules="all-linear",
                                             exclude_modules=["lm_head"]), quant_type=None,
                          compute_dtype=torch.float32, gradient_checkpointing=False, verbose=False)
    return m.eval()


def token_windows(tokenizer, text: str, count: int, seq: int, what: str) -> torch.Tensor:
    """The first count x seq tokens of `text` as [count, seq]; a clear error if it is shorter."""
    from ..rows import DataError

    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < count * seq:
        raise DataError(f"{what}: {ids.numel()} tokens, need {count} x {seq} = {count * seq}; give more text "
                        "or fewer windows")
    return ids[: count * seq].view(count, seq)


def _read(path: str) -> str:
    from pathlib import Path

    from ..rows import DataError

    try:
        return Path(path).read_text(errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read the text ({e.strerror or e})") from None


def quality_report(model: str, data: str, calibrate: str | None = None,
                   recipes: tuple[str, ...] = ("bf16", "absmax", "calibrated", "loftq"), windows: int = 16,
                   calibrate_rows: int = 32, seq: int = 512, rank: int = 64, loftq_iters: int = 1,
                   progress: bool = True) -> list[Row]:
    """Perplexity of each recipe on text file `data` (see the module docstring)."""
    from transformers import AutoTokenizer

    from .checkpoint_files import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(model))
    text = _read(data)
    calibrated = any(r in ("calibrated", "loftq") for r in recipes)
    if calibrated and calibrate is None:  # the first windows calibrate, the rest evaluate
        both = token_windows(tokenizer, text, calibrate_rows + windows, seq, data)
        calib_ids, eval_ids = both[:calibrate_rows], both[calibrate_rows:]
    else:
        eval_ids = token_windows(tokenizer, text, windows, seq, data)
        calib_ids = token_windows(tokenizer, _read(calibrate), calibrate_rows, seq, calibrate) if calibrated else None
    rows: list[Row] = []
    for recipe in recipes:
        t0 = time.time()
        m = load_recipe(model, recipe, calib_ids, rank, loftq_iters)
        bits, adapter = _bits(m) if recipe != "bf16" else (16.0, 0.0)
        rows.append(Row(recipe, perplexity(m, eval_ids), bits, adapter, time.time() - t0))
        del m
        if progress:
            print(format_row(rows[-1], rows[0].perplexity if rows[0].recipe == "bf16" else None), flush=True)
    return rows


def format_row(row: Row, bf16: float | None) -> str:
    vs = f"{100 * (row.perplexity / bf16 - 1):+7.1f}%" if bf16 else "        "
    extra = f" + {row.adapter_bits_per_param:.3f} adapter" if row.adapter_bits_per_param else ""
    return f"{row.recipe:14s} ppl {row.perplexity:9.3f} {vs} vs bf16  bits/param {row.bits_per_param:.3f}{extra}  ({row.seconds:.0f} s)"


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def write_report(model: str | None, data: str, output: str, calibrate: str | None = None,
                 recipes: tuple[str, ...] = ("bf16", "absmax", "calibrated", "loftq"), windows: int = 16,
                 calibrate_rows: int = 32, rank: int = 64, loftq_iters: int = 1) -> list[Row]:
    """`qlora quantize-report --data`: quality_report printed and written to OUTPUT/quality.json."""
    import json
    from pathlib import Path

    if model is None:
        raise ValueError("quantize-report --data needs --model: the causal LM to score (a directory or .gguf)")
    for recipe in recipes:
        if recipe not in RECIPES:
            raise ValueError(f"--recipes: unknown recipe {recipe!r}; expected some of {', '.join(RECIPES)}")
    print(f"model {model}: perplexity on {data} ({windows} x 512 tokens)"
          + (f", calibrated on {calibrate}" if calibrate else f", calibrated on its first {calibrate_rows} windows"))
    rows = quality_report(model, data, calibrate, recipes, windows, calibrate_rows, rank=rank, loftq_iters=loftq_iters)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps({"model": str(model), "data": data, "calibrate": calibrate, "rows": as_dicts(rows)},
                              indent=1))
    tmp.replace(out / "quality.json")
    print(f"wrote {out / 'quality.json'}")
    return rows
