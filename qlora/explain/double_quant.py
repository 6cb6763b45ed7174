"""`qlora explain double-quant`: quantizing the block scales too, and what it saves.

    from qlora.explain.double_quant import explain_double_quant
    explain_double_quant()["bits"]        # {"without": 4.5, "with": 4.127...}

Bits per parameter are QuantizedTensor.bits_per_param of one 4096 x 4096 weight (a LLaMA-7B
attention projection) quantized with and without double quantization. The savings
multiply the difference by the number of quantized (linear) weights of each LLaMA model,
counted from the public LLaMA-1 shapes below (embeddings and lm_head stay 16-bit).
Tests: tests/test_explain.py.
"""
from __future__ import annotations

import torch

from ..quant.tensor import NESTED_BLOCKSIZE, quantize
from .text import table

LLAMA_SHAPES = {  # name: (hidden, intermediate, layers); vocab 32000 (Touvron et al. 2023, Table 2)
    "7B": (4096, 11008, 32),
    "13B": (5120, 13824, 40),
    "33B": (6656, 17920, 60),
    "65B": (8192, 22016, 80),
}
LLAMA_VOCAB = 32000


def llama_params(hidden: int, intermediate: int, layers: int, vocab: int = LLAMA_VOCAB) -> tuple[int, int]:
    """(linear weights, all parameters) of a LLaMA-1 model: q, k, v, o, gate, up, down per
    layer; embeddings and lm_head (untied) and two norms per layer plus the final one."""
    linear = layers * (4 * hidden * hidden + 3 * hidden * intermediate)
    return linear, linear + 2 * vocab * hidden + (2 * layers + 1) * hidden


def explain_double_quant(shape: tuple[int, int] = (4096, 4096), blocksize: int = 64, seed: int = 0) -> dict:
    """Bits/param with and without DQ, the error DQ adds, and the savings on LLaMA 7B-65B."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    plain = quantize(w, "nf4", blocksize, double_quant=False)
    dq = quantize(w, "nf4", blocksize, double_quant=True)
    norm = float(w.pow(2).sum().sqrt())
    scale_err = (dq.scales() - plain.absmax).abs() / plain.absmax
    bits = {"without": plain.bits_per_param, "with": dq.bits_per_param}
    saved_bits = bits["without"] - bits["with"]
    models = {}
    for name, dims in LLAMA_SHAPES.items():
        linear, total = llama_params(*dims)
        models[name] = {"params": total, "linear": linear, "bytes_without": linear * bits["without"] / 8,
                        "bytes_with": linear * bits["with"] / 8, "saved_bytes": linear * saved_bits / 8}
    return {
        "shape": list(shape), "blocksize": blocksize, "nested_blocksize": NESTED_BLOCKSIZE,
        "bits": bits, "saved_bits": saved_bits,
        "bytes_per_param": {k: v / 8 for k, v in bits.items()},
        "parts_without": {"codes": plain.data.numel(), "scales (fp32)": plain.absmax.numel() * 4},
        "parts_with": {"codes": dq.data.numel(), "scales (8-bit)": dq.absmax.numel(),
                       "nested scales (fp32)": dq.nested_absmax.numel() * 4, "offset (fp32)": 4},
        "scale_rel_error_max": float(scale_err.max()), "scale_rel_error_mean": float(scale_err.mean()),
        "rmse_without": float((plain.dequantize(torch.float32) - w).pow(2).sum().sqrt()) / norm,
        "rmse_with": float((dq.dequantize(torch.float32) - w).pow(2).sum().sqrt()) / norm,
        "models": models,
    }


def render_bits(d: dict, markdown: bool = False) -> str:
    n = d["shape"][0] * d["shape"][1]
    rows = []
    for key, label in (("without", "without DQ"), ("with", "with DQ")):
        parts = d[f"parts_{key}"]
        rows.append((label, " + ".join(f"{v:,} B {k}" for k, v in parts.items()), f"{sum(parts.values()):,}",
                     f"{d['bits'][key]:.4f}", f"{d['bytes_per_param'][key]:.4f}"))
    return table([f"NF4, {d['shape'][0]}x{d['shape'][1]} ({n:,} weights)", "stored", "bytes", "bits/param",
                  "bytes/param"], rows, markdown)


def render_savings(d: dict, markdown: bool = False) -> str:
    rows = [(f"LLaMA-{name}", f"{m['params'] / 1e9:.2f}B", f"{m['linear'] / 1e9:.2f}B", f"{m['bytes_without'] / 1e9:.2f}",
             f"{m['bytes_with'] / 1e9:.2f}", f"{m['saved_bytes'] / 1e9:.2f}")
            for name, m in d["models"].items()]
    return table(["model", "parameters", "4-bit linear weights", "GB without DQ", "GB with DQ", "DQ saves GB"], rows,
                 markdown)
