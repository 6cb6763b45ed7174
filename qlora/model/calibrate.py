"""Layer-by-layer calibrated quantization (the GPTQ model pass) of a transformers decoder.

    model = load_calibrated("BASE", "notes.txt")      # 4-bit (Linear4bit), codes chosen by GPTQ
    qlora quantize --model BASE --calibrate notes.txt --output base-4bit/   (train --calibrate too)
    results = calibrate_model(model, ids, weights=fetch)  # the pass itself

For decoder layer i in order (`model.model.layers`: Llama / Qwen2 / Mistral-style models):
its linears are swapped for float32 nn.Linear copies of the 16-bit weights (read again from
the checkpoint by `weights(names)` where the model holds them in 4 bits), the layer runs in
float32 on the calibration hidden states with hooks that sum H = X^T X of every linear's input
(one H per distinct input: q/k/v share one, gate/up another), each linear is quantized
against its H (`make_quantizer`: GPTQ), the decoded weights are written back and the
layer's outputs recomputed, so layer i + 1 is calibrated on the inputs it will really see.
Then the layer gets Linear4bit modules holding the new codes (or keeps a 16-bit linear where
`quantize_fn` returns None) and goes back to its storage dtype.

The keyword arguments transformers passes to a decoder layer (position embeddings, the
causal mask, position ids) are captured from one real forward call of layer 0, so no model
internals are re-implemented. Every calibration row has the same length and no padding.
Peak memory: the 4-bit model, one decoder layer in float32, its input Hessians and the
calibration hidden states (rows x seq x hidden x 4 bytes).
Tests: tests/model/test_calibrate.py.
"""
from __future__ import annotations

import time
from typing import Callable, Collection, Union

import torch
from torch import nn

from ..nn.linear4bit import Linear4bit
from ..quant.gptq import gptq_quantize
from ..quant.loftq import loftq_init
from ..quant.tensor import QuantizedTensor, quantize

Result = Union[QuantizedTensor, "tuple[QuantizedTensor, torch.Tensor, torch.Tensor]"]
QuantizeFn = Callable[[str, torch.Tensor, "torch.Tensor | None"], "Result | None"]
WeightsFn = Callable[[list[str]], dict[str, torch.Tensor]]


class _Stop(Exception):
    pass


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple


def _float32(value):
    """Floating tensors (also inside tuples) in float32; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, tuple):
        return tuple(_float32(v) for v in value)
    return value


def decoded(result: Result) -> torch.Tensor:
    """The float32 weight a quantize_fn result computes with: dequant(Q) [+ B A for LoftQ]."""
    if isinstance(result, QuantizedTensor):
        return result.dequantize(torch.bfloat16).float()
    qt, A, B = result
    return qt.dequantize(torch.bfloat16).float() + B.float() @ A.float()


def make_quantizer(quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   loftq_rank: int = 0, loftq_iters: int = 1, keep_16bit: Collection[str] = ()) -> QuantizeFn:
    """The quantize_fn of a recipe: GPTQ against the layer's Hessian (absmax where there is
    none, or where a row is not whole blocks: GPTQ's column order cannot hold a block that
    spans two rows); with `loftq_rank`, LoftQ alternations around that quantizer; None (16-bit)
    for the modules `keep_16bit` names (a full name, or its last parts: "mlp.down_proj")."""
    def base(weight: torch.Tensor, hessian: torch.Tensor | None) -> QuantizedTensor:
        if hessian is None or weight.shape[1] % blocksize:
            return quantize(weight, quant_type, blocksize, double_quant)
        return gptq_quantize(weight, hessian, quant_type, blocksize, double_quant)

    def quantize_fn(name: str, weight: torch.Tensor, hessian: torch.Tensor | None) -> Result | None:
        if any(name == k or name.endswith("." + k) for k in keep_16bit):
            return None
        if loftq_rank:
            return loftq_init(weight, loftq_rank, loftq_iters, quantizer=lambda res: base(res, hessian))
        return base(weight, hessian)
    return quantize_fn


def _capture(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """The hidden states entering layer 0 (float32) and the keyword arguments every layer gets."""
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}

    def catch(module, args, kw):
        hidden.append((args[0] if args else kw.pop("hidden_states")).float())
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, {k: _float32(v) for k, v in kwargs.items()}


def _hessians(layer: nn.Module, linears: dict[str, nn.Linear], hidden: list[torch.Tensor],
              kwargs: dict) -> dict[str, torch.Tensor]:
    """Mean x x^T of each linear's input over the calibration tokens; linears fed the same
    tensor (q/k/v, gate/up) share one matrix."""
    hess: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # holding x: its memory cannot be reused meanwhile
    tokens = 0

    def hook(name):
        def fn(module, args, output):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            first = alias.setdefault(name, seen.setdefault(key, (name, x))[0])
            if first == name:
                x = x.reshape(-1, x.shape[-1])
                hess.setdefault(name, torch.zeros(x.shape[1], x.shape[1], device=x.device)).addmm_(x.T, x)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        for h in hidden:
            seen.clear()
            layer(h, **kwargs)
            tokens += h.shape[0] * h.shape[1]
    finally:
        for hd in handles:
            hd.remove()
    return {n: hess[alias[n]] / tokens for n in linears}


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    weights: WeightsFn,
    quantize_fn: QuantizeFn | None = None,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    progress: bool = True,
    batch_size: int = 8,
    sensitivity: dict[str, float] | None = None,
) -> dict[str, Result]:
    """Re-quantize every Linear4bit of model.model.layers in place from its 16-bit weight
    (`weights(names)`, float32 [out, in]); returns module name -> result.

    `quantize_fn(name, weight, hessian)` (default `make_quantizer`) returns a
    QuantizedTensor, a LoftQ triple (Q, A, B) whose B A the layer computes with during the
    pass, or None to keep that linear 16-bit (an nn.Linear; left out of the result). Without
    `calibration_ids` nothing runs forward and `hessian` is None (absmax / LoftQ / keep only).
    A `sensitivity` dict gets, per quantized linear, ||y_q - y||^2 / ||y||^2 for the decoder
    layer's output y on the first calibration batch when only that linear is quantized.
    """
    if quantize_fn is None:
        quantize_fn = make_quantizer(quant_type, blocksize, double_quant)
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}
    if calibration_ids is not None:
        if calibration_ids.dim() != 2:
            raise ValueError(f"calibration_ids must be [n, seq], got shape {tuple(calibration_ids.shape)}")
        if calibration_ids.shape[0] % batch_size:  # the captured mask / positions are per batch shape
            raise ValueError(f"calibration rows ({calibration_ids.shape[0]}) must be a multiple of "
                             f"batch_size={batch_size}")
        hidden, kwargs = _capture(model, list(calibration_ids.to(device).split(batch_size)))

    results: dict[str, Result] = {}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        t0 = time.time()
        prefix = f"model.layers.{i}."
        originals = {n: m for n, m in layer.named_modules() if isinstance(m, Linear4bit)}
        sixteen = weights([prefix + n for n in originals]) if originals else {}
        linears: dict[str, nn.Linear] = {}
        for n, m in originals.items():
            w = sixteen.pop(prefix + n)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=device)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
            linears[n] = lin
            layer.set_submodule(n, lin)
        store = next((p.dtype for p in layer.parameters() if p.is_floating_point() and p.dtype != torch.float32),
                     torch.float32)
        layer.float()
        hess = _hessians(layer, linears, hidden, kwargs) if hidden else {}
        done = {}
        for n, lin in linears.items():
            result = quantize_fn(prefix + n, lin.weight.detach().clone(), hess.get(n))
            if result is not None:
                done[n] = result
        del hess
        if sensitivity is not None and hidden:
            y = _hidden(layer(hidden[0], **kwargs))
            for n, result in done.items():
                w16 = linears[n].weight.detach().clone()
                linears[n].weight.copy_(decoded(result))
                sensitivity[prefix + n] = float((_hidden(layer(hidden[0], **kwargs)) - y).square().sum()
                                                / y.square().sum())
                linears[n].weight.copy_(w16)
        for n, result in done.items():
            linears[n].weight.copy_(decoded(result))
            results[prefix + n] = result
        hidden = [_hidden(layer(h, **kwargs)) for h in hidden]
        layer.to(store)
        for n, m in originals.items():
            if prefix + n in results:
                r = results[prefix + n]
                new = Linear4bit(r if isinstance(r, QuantizedTensor) else r[0], m.bias, m.compute_dtype)
                new.fan_in_fan_out = m.fan_in_fan_out
            else:  # kept 16-bit
                new = linears[n].to(store)
            layer.set_submodule(n, new.train(m.training))
        if progress:
            print(f"calibrate: layer {i + 1}/{len(layers)} ({len(linears)} linears) in {time.time() - t0:.1f}s",
                  flush=True)
    return results


def keep_most_sensitive(model: nn.Module, sensitivity: dict[str, float], budget_bytes: int,
                        weights: WeightsFn) -> dict[str, int]:
    """Put back into 16 bits the quantized linears with the most `sensitivity` per extra byte
    while their extra bytes (16-bit weight minus 4-bit storage) fit in `budget_bytes`;
    returns name -> extra bytes of those kept, in the order chosen."""
    cost = {}
    for name in sensitivity:
        m = model.get_submodule(name)
        cost[name] = m.weight.numel() * (4 if m.compute_dtype == torch.float32 else 2) - m.weight.nbytes
    kept: dict[str, int] = {}
    left = budget_bytes
    for name in sorted(sensitivity, key=lambda n: sensitivity[n] / max(cost[n], 1), reverse=True):
        if cost[name] <= left:
            kept[name] = cost[name]
            left -= cost[name]
    for name, w in weights(list(kept)).items():
        m = model.get_submodule(name)
        store = torch.float32 if m.compute_dtype == torch.float32 else torch.bfloat16
        lin = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=store)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        model.set_submodule(name, lin.requires_grad_(False).train(m.training))
    return kept


def calibration_ids(tokenizer, path: str, rows: int = 128, seq: int = 512) -> torch.Tensor:
    """[rows, seq] token windows of file `path`: plain text, or data rows (JSONL / JSON / CSV,
    every string value of a row joined), as one stream cut into windows."""
    from pathlib import Path

    from ..errors import InputError
    from ..rows import DataError, read_rows

    file = Path(path)
    if rows < 1 or seq < 2:
        raise InputError(f"--calibrate-rows {rows} / --calibrate-seq {seq}: need at least 1 row of 2 tokens")
    if file.suffix in (".jsonl", ".json", ".csv"):
        texts = []
        for where, row in read_rows(str(file)):
            if isinstance(row, DataError):  # a line that is not JSON
                raise row
            if not _strings(row):
                raise DataError(f"{where}: no text in this row ({type(row).__name__} {str(row)[:60]!r}); calibration "
                                "reads every string value of a row: fix or drop the row")
            texts.append(" ".join(_strings(row)))
        text = "\n\n".join(texts)
    else:
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{file}: cannot read calibration text ({e})") from None
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < rows * seq:
        raise DataError(f"{file}: {ids.numel()} tokens, the calibration needs {rows} x {seq} = {rows * seq}; "
                        "give more text or lower --calibrate-rows / --calibrate-seq")
    return ids[: rows * seq].view(rows, seq)


SELF = "self"
"""`--calibrate self`: calibrate on text the model writes itself (no data needed)."""


@torch.no_grad()
def generated_ids(model: nn.Module, rows: int, seq: int, seed: int = 0, batch_size: int = 16) -> torch.Tensor:
    """[rows, seq] tokens sampled from `model` itself (temperature 1), each row started from a
    random vocabulary token, as in data-free quantization-aware training (LLM-QAT): calibration
    inputs drawn from the model's own distribution when the user has no text."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, rows, batch_size):
            first = torch.randint(0, vocab, (min(batch_size, rows - start), 1)).to(device)
            ids = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=seq - 1, min_new_tokens=seq - 1,
                                 pad_token_id=0)
            out.append(ids.cpu())
    return torch.cat(out)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def checkpoint_weights(path: str, model: nn.Module, allow_pickle: bool = False) -> WeightsFn:
    """`weights` for calibrate_model: the named 16-bit weights read again from checkpoint
    `path` (safetensors, GGUF or an allowed pickle), float32, [out, in]."""
    from .checkpoint_files import resolve, stream_tensors
    from .gguf_model import gguf_source, stream_gguf

    root = resolve(path)
    gguf = gguf_source(root)
    prefix = getattr(model, "base_model_prefix", "")

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        wanted = {f"{n}.weight": n for n in names}

        def name_of(key: str) -> str | None:
            return wanted.get(key) or (wanted.get(f"{prefix}.{key}") if prefix else None)

        stream = (stream_tensors(root, allow_pickle, progress=False, select=lambda k: name_of(k) is not None)
                  if gguf is None else stream_gguf(gguf, model, progress=False, select=lambda k: k in wanted))
        got = {}
        for _, key, tensor in stream:
            name = name_of(key)
            w = tensor.float()
            got[name] = w.t().contiguous() if getattr(model.get_submodule(name), "fan_in_fan_out", False) else w
        return got

    return fetch


def load_calibrated(path: str, data: str | None = None, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, rows: int = 128, seq: int = 512,
                    blocksize: int = 64, trust_remote_code: bool = False, progress: bool = True,
                    loftq_rank: int = 0, loftq_iters: int = 1, keep_16bit: Collection[str] | str = (),
                    keep_budget_bytes: int = 0, target_modules: str | list[str] = "all-linear") -> nn.Module:
    """A model like load_model's whose decoder-layer linears are re-quantized from their 16-bit
    weights by `make_quantizer`: GPTQ against calibration text `data` (calibration_ids) when
    given, LoftQ when `loftq_rank` > 0 (its (A, B) left on the Linear4bit as `lora_init` for
    prepare_model), 16-bit for the names in `keep_16bit`; the bitsandbytes layout throughout.
    `keep_16bit="auto"` keeps the linears most sensitive on `data` whose extra bytes fit in
    `keep_budget_bytes` (keep_most_sensitive; the choice is left in `model.qlora_kept_16bit`)."""
    from transformers import AutoTokenizer

    from .checkpoint_files import resolve
    from .load import load_model

    auto = keep_16bit == "auto"
    if auto and data is None:
        raise ValueError("--keep-16bit auto measures each layer's sensitivity on calibration data: give --calibrate DATA")
    ids = None
    if data is not None and data != SELF:
        tokenizer = AutoTokenizer.from_pretrained(resolve(path), trust_remote_code=trust_remote_code)
        ids = calibration_ids(tokenizer, data, rows, seq)
    model = load_model(path, quant_type, double_quant, compute_dtype, trust_remote_code=trust_remote_code,
                       blocksize=blocksize, target_modules=target_modules, progress=progress)
    if data == SELF:
        ids = generated_ids(model, rows, seq)
    quantize_fn = make_quantizer(quant_type, blocksize, double_quant, loftq_rank, loftq_iters,
                                 () if auto else keep_16bit)
    weights = checkpoint_weights(path, model)
    sensitivity: dict[str, float] | None = {} if auto else None
    results = calibrate_model(model, ids, weights, quantize_fn, quant_type, blocksize, double_quant, progress,
                              batch_size=next(b for b in (8, 4, 2, 1) if rows % b == 0), sensitivity=sensitivity)
    kept = keep_most_sensitive(model, sensitivity, keep_budget_bytes, weights) if auto else {}
    for name, result in results.items():
        if isinstance(result, tuple) and name not in kept:
            model.get_submodule(name).lora_init = result[1:]
    model.qlora_kept_16bit = kept
    if progress and auto:
        print(f"keep-16bit auto: {len(kept)} linears, +{sum(kept.values()) / 2**20:.1f} MiB of "
              f"{keep_budget_bytes / 2**20:.1f} MiB: {', '.join(kept) or 'none fit'}")
    return model
