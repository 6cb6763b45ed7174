"""Layer-by-layer calibrated quantization (the GPTQ model pass) of a transformers decoder.

    qts = calibrate_model(model, ids)   # ids: LongTensor [n, seq] of calibration text
    qts["model.layers.0.self_attn.q_proj"].state_dict()   # the bitsandbytes layout
    model = load_calibrated("BASE", "notes.txt")   # a 4-bit model (Linear4bit) like load_model's
    qlora quantize --model BASE --calibrate notes.txt --output base-4bit/   (train --calibrate too)

For decoder layer i in order: run the calibration hidden states through it with hooks that
sum H = X^T X of every nn.Linear's input, quantize that layer's linears against their H
(gptq_quantize by default), write the decoded weights back into the layer, then recompute
the layer's outputs with the quantized layer: layer i + 1 is calibrated on the inputs it
will really see. Works on Llama / Qwen2 / Mistral-style models (`model.model.layers`): the
keyword arguments transformers passes to a decoder layer (position_embeddings from
model.model.rotary_emb, the causal mask, position_ids) are captured from one real forward
call of layer 0, so no model internals are re-implemented. Every row of `ids` must have the
same length and no padding.

The model is modified in place: each quantized Linear keeps the decoded weight (plus B A
when `quantize_fn` returns a LoftQ triple), which is what a 4-bit layer computes with.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..nn.linear4bit import Linear4bit
from ..quant.gptq import gptq_quantize
from ..quant.tensor import QuantizedTensor, quantize

QuantizeFn = Callable[[torch.Tensor, torch.Tensor], "QuantizedTensor | tuple[QuantizedTensor, torch.Tensor, torch.Tensor]"]


class _Stop(Exception):
    pass


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple


def _decoded(result) -> torch.Tensor:
    if isinstance(result, QuantizedTensor):
        return result.dequantize(torch.bfloat16).float()
    qt, A, B = result
    return qt.dequantize(torch.bfloat16).float() + B.float() @ A.float()


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    progress: bool = True,
    quantize_fn: QuantizeFn | None = None,
    batch_size: int = 8,
) -> dict[str, QuantizedTensor]:
    """Module name -> quantized weight for every Linear inside model.model.layers.

    `quantize_fn(weight, hessian)` may replace GPTQ; if it returns (Q, A, B) (LoftQ) the
    dict holds those triples and the layer is recomputed with dequant(Q) + B A. By default,
    layers whose rows are not whole blocks (in_features % blocksize) keep absmax codes.
    """
    if quantize_fn is None:
        def quantize_fn(weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedTensor:
            if weight.shape[1] % blocksize:  # a block would span two rows: GPTQ's column order cannot hold it
                return quantize(weight, quant_type, blocksize, double_quant)
            return gptq_quantize(weight, hessian, quant_type, blocksize, double_quant)
    if calibration_ids.dim() != 2:
        raise ValueError(f"calibration_ids must be [n, seq], got shape {tuple(calibration_ids.shape)}")
    layers = model.model.layers
    device = next(model.parameters()).device
    batches = calibration_ids.to(device).split(batch_size)

    # 1. the hidden states entering layer 0 and the keyword arguments every layer gets.
    hidden: list[torch.Tensor] = []
    layer_kwargs: dict = {}

    def catch(module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        layer_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    last = batches[-1].shape[0]
    if last != batches[0].shape[0]:  # the captured mask / positions are per batch shape: keep it uniform
        raise ValueError(f"calibration rows ({calibration_ids.shape[0]}) must be a multiple of batch_size={batch_size}")

    results: dict = {}
    for i, layer in enumerate(layers):
        t0 = time.time()
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hess = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in linears.items()}
        count = [0]

        def accumulate(name):
            def hook(module, args, output):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                hess[name].addmm_(x.T, x)
            return hook

        handles = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
        try:
            for h in hidden:
                layer(h, **layer_kwargs)
                count[0] += h.shape[0] * h.shape[1]
        finally:
            for hd in handles:
                hd.remove()
        for name, m in linears.items():
            result = quantize_fn(m.weight.data, hess[name] / count[0])
            m.weight.data.copy_(_decoded(result).to(m.weight.dtype))
            results[f"model.layers.{i}.{name}"] = result
        del hess
        hidden = [_hidden(layer(h, **layer_kwargs)) for h in hidden]
        if progress:
            print(f"calibrate: layer {i + 1}/{len(layers)} ({len(linears)} linears) in {time.time() - t0:.1f}s", flush=True)
    return results


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


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def load_calibrated(path: str, data: str, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, rows: int = 128, seq: int = 512,
                    blocksize: int = 64, trust_remote_code: bool = False, progress: bool = True) -> nn.Module:
    """A model like load_model's whose decoder-layer linears are GPTQ-calibrated on `data`
    (calibration_ids), in the same bitsandbytes layout; other tensors as load_model keeps them.
    Peak: the model in float32 during calibration (not streamed layer by layer yet)."""
    from transformers import AutoTokenizer

    from .checkpoint_files import resolve
    from .load import load_model

    tokenizer = AutoTokenizer.from_pretrained(resolve(path), trust_remote_code=trust_remote_code)
    ids = calibration_ids(tokenizer, data, rows, seq)
    model = load_model(path, quant_type="none", compute_dtype=torch.float32, trust_remote_code=trust_remote_code,
                       progress=progress)
    quantized = calibrate_model(model, ids, quant_type, blocksize, double_quant, progress,
                                batch_size=next(b for b in (8, 4, 2, 1) if rows % b == 0))
    store = torch.float32 if compute_dtype == torch.float32 else torch.bfloat16
    model.to(store)
    for name, qt in quantized.items():
        layer = model.get_submodule(name)
        new = Linear4bit.from_quantized(qt, bias=layer.bias, compute_dtype=compute_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.requires_grad_(False)
    return model
