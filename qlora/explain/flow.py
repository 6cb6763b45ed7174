"""`qlora explain flow`: Y = dequant(W) X + s B A X through one real layer, forward and back.

    from qlora.explain.flow import explain_flow
    d = explain_flow()     # shapes, dtypes, bytes; what autograd keeps for backward

The layer is `model.layers.0.mlp.up_proj` of the shipped demo Llama (its real pretrained
bf16 weight), made a Linear4bit (NF4 + DQ, bf16 compute) wrapped in a LoraLinear with the
demo recipe's r = 16, alpha = 32, dropout 0.05. The tensors kept for backward are read
live from the autograd graph of Y (each node's `_saved_*` tensors, each storage once). The layer's autograd Function
(nn/lora4bit.py) keeps only a reference to the packed weight (ctx.qt, no copy); the decoded W lives in a shared workspace and is dropped.
Tests: tests/test_explain.py.
"""
from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from ..assets import asset_path
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear
from ..quant.tensor import QuantizedTensor
from .text import table

LAYER = "model.layers.0.mlp.up_proj"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _label(op: str, attr: str, t: torch.Tensor, layer: LoraLinear) -> str:
    r, n_in, n_out = layer.r, layer.in_features, layer.out_features
    shape = tuple(t.shape)
    if not shape:
        return "dropout seed (one int64, read on the device)"
    if shape == (r, n_in):
        return "A (compute-dtype copy)"
    if shape in ((n_out, r), (r, n_out)):  # addmm saves B^T, a view
        return "B (compute-dtype copy)"
    if shape[-1] == n_in:
        return "X itself (dropout(X) is regenerated from the seed)"
    if shape[-1] == r:
        return "A dropout(X): input of B"
    return f"{op}.{attr}"


def saved_for_backward(y: torch.Tensor, layer: LoraLinear) -> tuple[list[dict], list[QuantizedTensor]]:
    """Walk y's autograd graph: every tensor a node saved (node, attribute, shape, dtype,
    bytes; each storage once) and the QuantizedTensors custom Functions keep on ctx."""
    saved, kept_qt, seen, ptrs = [], [], set(), set()
    stack = [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        op = type(fn).__name__
        if isinstance(getattr(fn, "qt", None), QuantizedTensor):
            kept_qt.append(fn.qt)
        found = [(a, getattr(fn, a)) for a in sorted(a for a in dir(fn) if a.startswith("_saved_"))]
        if not found and hasattr(fn, "saved_tensors"):  # a custom autograd Function's ctx
            found = [(f"saved_tensors[{i}]", t) for i, t in enumerate(fn.saved_tensors)]
        for attr, t in found:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in ptrs:
                ptrs.add(t.data_ptr())
                saved.append({"name": _label(op, attr, t, layer), "op": f"{op}.{attr.removeprefix('_saved_')}",
                              "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "bytes": _nbytes(t)})
        stack += [nxt for nxt, _ in fn.next_functions]
    return saved, kept_qt


def explain_flow(tokens: int = 64, seed: int = 0, r: int = 16, alpha: float = 32, dropout: float = 0.05) -> dict:
    """Run one forward and backward through the real layer; report tensors and bytes."""
    with safe_open(str(asset_path("tiny-llama") / "model.safetensors"), "pt") as f:
        w = f.get_tensor(f"{LAYER}.weight")
    dense = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    dense.weight.data.copy_(w)
    compute = torch.bfloat16
    torch.manual_seed(seed)
    layer = LoraLinear(Linear4bit.from_linear(dense, "nf4", 64, True, compute), r=r, alpha=alpha, dropout=dropout)
    nn.init.normal_(layer.lora_B.weight, std=0.02)  # a trained-looking B, so B A X is not zero
    x = torch.randn(1, tokens, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(compute)
    x.requires_grad_(True)
    qt = layer.base_layer.weight

    layer.train()
    y = layer(x)
    saved, kept_qt = saved_for_backward(y, layer)
    y.float().pow(2).mean().backward()

    layer.eval()  # the formula, without dropout, in float32 from the same weights
    with torch.no_grad():
        y_eval = layer(x).float()
        wd = qt.dequantize(torch.float32)
        a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float()
        y_ref = x.float() @ wd.t() + layer.scaling * (x.float() @ a.t()) @ b.t()
    rel = float((y_eval - y_ref).norm() / y_ref.norm())

    quant_parts = {"packed codes": qt.data, "block scales (8-bit)": qt.absmax, "nested scales (fp32)": qt.nested_absmax}
    return {
        "layer": LAYER, "tokens": tokens, "r": r, "alpha": alpha, "scaling": layer.scaling, "dropout": dropout,
        "compute_dtype": str(compute).replace("torch.", ""),
        "tensors": [
            {"name": "X", "shape": list(x.shape), "dtype": "bfloat16", "bytes": _nbytes(x)},
            {"name": "W, 4-bit NF4 + DQ (frozen)", "shape": list(qt.shape), "dtype": "uint8 codes + scales",
             "bytes": qt.nbytes},
            {"name": "dequant(W) (workspace, per call)", "shape": list(qt.shape), "dtype": "bfloat16",
             "bytes": qt.numel() * 2},
            {"name": "A (trainable)", "shape": list(layer.lora_A.weight.shape), "dtype": "float32",
             "bytes": _nbytes(layer.lora_A.weight)},
            {"name": "B (trainable)", "shape": list(layer.lora_B.weight.shape), "dtype": "float32",
             "bytes": _nbytes(layer.lora_B.weight)},
            {"name": "Y", "shape": list(y.shape), "dtype": str(y.dtype).replace("torch.", ""), "bytes": _nbytes(y)},
        ],
        "quant_parts": {k: _nbytes(v) for k, v in quant_parts.items()},
        "dense_bf16_bytes": qt.numel() * 2,
        "saved": saved, "saved_bytes": sum(s["bytes"] for s in saved),
        "kept_by_reference": {"name": "ctx.qt of the layer's Function: the packed weight (its buffers, no copy)",
                              "bytes": sum(k.nbytes for k in kept_qt),
                              "same_buffers": all(k.data.data_ptr() == qt.data.data_ptr() for k in kept_qt)},
        "dropped": {"name": "dequant(W) in compute dtype (decoded again in backward)", "bytes": qt.numel() * 2},
        "grads": {"A": layer.lora_A.weight.grad is not None, "B": layer.lora_B.weight.grad is not None,
                  "X": x.grad is not None, "W": False},
        "formula_rel_error": rel,
    }


def render_tensors(d: dict, markdown: bool = False) -> str:
    rows = [(t["name"], "x".join(map(str, t["shape"])), t["dtype"], f"{t['bytes']:,}") for t in d["tensors"]]
    return table(["tensor", "shape", "dtype", "bytes"], rows, markdown)


def render_saved(d: dict, markdown: bool = False) -> str:
    rows = [(s["name"], s["op"], "x".join(map(str, s["shape"])), s["dtype"], f"{s['bytes']:,}", "kept")
            for s in d["saved"]]
    k = d["kept_by_reference"]
    rows.append((k["name"], "Lora4bitLinearBackward.qt", "x".join(map(str, d["tensors"][1]["shape"])), "4-bit",
                 f"{k['bytes']:,}", "kept (no new memory)"))
    rows.append((d["dropped"]["name"], "", "x".join(map(str, d["tensors"][1]["shape"])), d["compute_dtype"],
                 f"{d['dropped']['bytes']:,}", "dropped"))
    return table(["for backward", "saved by", "shape", "dtype", "bytes", ""], rows, markdown)
