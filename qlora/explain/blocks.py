"""`qlora explain quantization` and `qlora explain blocks`: absmax integers, and why blocks.

    from qlora.explain.blocks import explain_quantization, explain_blocks
    explain_quantization()["codes"]      # [0, 7, -4]

Every number comes from qlora.quantize / QuantizedTensor.dequantize with the INT4 code book
(value = q / 7, q in [-8, 7]); the packed nibbles are read back with blockwise.unpack_4bit.
Tests: tests/test_explain.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..quant.blockwise import unpack_4bit
from ..quant.tensor import quantize
from .text import table

EXAMPLE_BLOCK = (0.1, 2.5, -1.5)
SAMPLE = [0, 1, 2, 3, 64, 65, 66, 67]
"""Weights shown side by side: four of the outlier's block (index 3 is the outlier), four of the next."""
INT4_MAX = 7
"""INT4 maps absmax to the integer 7: value = q * absmax / 7."""


def int4_roundtrip(x: torch.Tensor, blocksize: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(integers q in [-8, 7], per-block absmax, decoded values) of qlora's INT4 quantization."""
    qt = quantize(x, "int4", blocksize=blocksize, double_quant=False)
    q = (unpack_4bit(qt.data, x.numel()) - 8).tolist()  # stored code c means the integer c - 8
    return q, qt.absmax.clone(), qt.dequantize(torch.float32).reshape(-1)


def explain_quantization(block: tuple[float, ...] = EXAMPLE_BLOCK) -> dict:
    """Integer absmax quantization of one block: constant, codes, decoded values, errors."""
    x = torch.tensor(block, dtype=torch.float32)
    codes, absmax, decoded = int4_roundtrip(x, blocksize=64)  # 3 elements: one (partial) block
    errors = decoded - x
    return {
        "block": list(block),
        "absmax": float(absmax[0]),
        "constant": float(absmax[0]) / INT4_MAX,  # the value of one integer step
        "scaled": (x / absmax[0] * INT4_MAX).tolist(),  # x / constant, before rounding
        "codes": codes,
        "decoded": decoded.tolist(),
        "errors": errors.tolist(),
        "max_abs_error": float(errors.abs().max()),
        "bits_per_value": 4,
    }


def render_quantization(d: dict, markdown: bool = False) -> str:
    rows = [(f"{x:g}", f"{s:.2f}", q, f"{y:.4f}", f"{e:+.4f}")
            for x, s, q, y, e in zip(d["block"], d["scaled"], d["codes"], d["decoded"], d["errors"])]
    return table(["x", "x / constant", "code q = round", "decoded q * constant", "error"], rows, markdown)


def explain_blocks(seed: int = 0, n_blocks: int = 4, blocksize: int = 64, outlier: float = 100.0) -> dict:
    """A tensor of n_blocks * blocksize small N(0, 1) weights with `outlier` at index 3:
    INT4 with one constant for the whole tensor vs one per block of `blocksize`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_blocks * blocksize, generator=g)
    w[3] = outlier
    small = torch.ones_like(w, dtype=torch.bool)
    small[3] = False
    out: dict = {"n": w.numel(), "blocksize": blocksize, "outlier": outlier, "outlier_index": 3,
                 "small_absmax": float(w[small].abs().max()), "sample_index": SAMPLE, "sample": w[SAMPLE].tolist(),
                 "schemes": {}}
    for name, bs in (("one constant", w.numel()), (f"blocks of {blocksize}", blocksize)):
        q, absmax, decoded = int4_roundtrip(w, bs)
        err = decoded - w
        per_block = []
        for b in range(n_blocks):
            sl = slice(b * blocksize, (b + 1) * blocksize)
            s = small[sl]
            per_block.append({
                "absmax": float(absmax[(b * blocksize) // bs]),
                "small_to_zero": int(((decoded[sl] == 0) & s).sum()),
                "small_count": int(s.sum()),
                "rmse_small": float(err[sl][s].pow(2).mean().sqrt()),
            })
        out["schemes"][name] = {
            "blocksize": bs, "constants": absmax.numel(), "decoded_sample": decoded[SAMPLE].tolist(),
            "outlier_decoded": float(decoded[3]), "small_to_zero": int(((decoded == 0) & small).sum()),
            "rmse_small": float(err[small].pow(2).mean().sqrt()), "per_block": per_block,
            "decoded": decoded.tolist(),
        }
    out["weights"] = w.tolist()
    return out


def render_blocks(d: dict, markdown: bool = False) -> str:
    rows = []
    for name, s in d["schemes"].items():
        for b, pb in enumerate(s["per_block"]):
            rows.append((name, b, f"{pb['absmax']:.3f}", f"{pb['small_to_zero']} of {pb['small_count']}",
                         f"{pb['rmse_small']:.4f}"))
    return table(["scheme", "block", "absmax", "small weights -> 0", "RMSE of small weights"], rows, markdown)


def render_blocks_sample(d: dict, markdown: bool = False) -> str:
    rows = [("original", *(f"{v:.3f}" for v in d["sample"]))]
    rows += [(name, *(f"{v:.3f}" for v in s["decoded_sample"])) for name, s in d["schemes"].items()]
    return table(["weight index", *(str(i) for i in d["sample_index"])], rows, markdown)


def plot_blocks(d: dict, path: Path) -> bool:
    """The weights and their INT4 decodings under both schemes; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(11, 4))
    idx = range(d["n"])
    ax.plot(idx, d["weights"], ".", color="0.4", label="original (outlier 100 clipped from view)")
    for (name, s), color in zip(d["schemes"].items(), ("tab:red", "tab:blue")):
        ax.plot(idx, s["decoded"], "-", color=color, lw=1, label=f"INT4, {name}")
    for b in range(1, d["n"] // d["blocksize"]):
        ax.axvline(b * d["blocksize"] - 0.5, color="0.8", lw=0.8)
    lim = d["small_absmax"] * 1.3
    ax.set(ylim=(-lim, lim), xlabel="weight index", ylabel="value",
           title=f"one outlier ({d['outlier']:g}) at index {d['outlier_index']}: one constant vs blocks of {d['blocksize']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
