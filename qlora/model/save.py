"""Write checkpoints the ecosystem reads: bitsandbytes 4-bit and merged 16-bit.

    qlora.save_quantized(model, "out/")     # transformers + bitsandbytes load it as is
    qlora.merge_adapter("base/", "adapter/", "merged/")   # 16-bit weights with LoRA folded in

Every writer fills a temporary sibling directory and renames it into place at the end,
so an interrupted or failed save never leaves a half-written output directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from ..nn.linear4bit import Linear4bit, is_conv1d
from ..nn.lora import LoraLinear
from .targets import is_linear
from .temp_files import temp_beside

MAX_SHARD_BYTES = 2 << 30
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target`."""
    target = Path(target).resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(target, directory=True)  # a killed run's leftovers are removed by the next one
    except OSError as e:
        raise InputError(f"{target}: cannot write a directory there ({e.strerror or e}); choose another "
                         "output path") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = temp_beside(target, directory=True, suffix=".old")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """model.safetensors, or shards + model.safetensors.index.json past `max_shard_bytes`.

    Each shard is written as soon as it is full, so at most one shard is held in memory.
    """
    meta = {"format": "pt"}
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = directory / f"part-{len(written) + 1:05d}.safetensors"
        save_file(shard, str(part), metadata=meta)
        written.append((part, list(shard)))
        shard.clear()

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t.detach().contiguous().cpu()
        size, total = size + nbytes, total + nbytes
    if shard or not written:
        flush()
    if len(written) == 1:
        os.replace(written[0][0], directory / "model.safetensors")
        return
    weight_map = {}
    for i, (part, names) in enumerate(written, 1):
        fname = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(part, directory / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_side_files(source: str | os.PathLike | None, directory: Path) -> None:
    """Tokenizer and generation config from the model's source directory, when known."""
    if source is None or not Path(source).is_dir():
        return
    for name in COPIED_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, directory / name)


def _tied(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    head = model.get_output_embeddings()
    return {f"{name}.weight" for name, m in model.named_modules() if m is head}


def save_quantized(model: nn.Module, directory: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a 4-bit model in the transformers + bitsandbytes layout (formats.md section 4).

    LoRA adapters are not included (save them with `save_adapter`, or fold them in with
    `merge_adapter`). Returns the output directory.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("save_quantized: the model has no Linear4bit layer; load it with qlora.load_model first")
    kinds = {(m.quant_type, m.double_quant) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"save_quantized: layers mix quantization settings {sorted(kinds)}; bitsandbytes needs one")
    quant_type, double_quant = kinds.pop()
    if quant_type == "int4":
        raise InputError("save_quantized: int4 is qlora's own format and bitsandbytes cannot read it; use nf4 or fp4")
    compute = {str(m.compute_dtype).removeprefix("torch.") for m in layers.values()}.pop()
    skip = sorted(name for name, m in model.named_modules() if is_linear(m) and name not in layers)
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k and k not in _tied(model)}
    # adapter wrappers nest the base layer as `<m>.base_layer`: save under the plain name
    state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip or None, "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
    }
    with atomic_directory(directory) as tmp:
        write_safetensors(state.items(), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        copy_side_files(getattr(model, "qlora_source", None), tmp)
    return Path(directory)


def _dense_layers(model: nn.Module, dtype: torch.dtype | None) -> dict[str, tuple[nn.Linear, float, bool]]:
    """name -> (dense 16-bit layer, |scaling * B @ A| Frobenius norm, was it a Conv1D)."""
    dense = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            base = m.base_layer
            conv = getattr(base, "fan_in_fan_out", False) or is_conv1d(base)
            dense[name] = (m.merged_layer(dtype), float(m.delta_weight().norm()), conv)
        elif isinstance(m, Linear4bit) and not any(name.startswith(n + ".") for n in dense):
            dense[name] = (m.dequantize(dtype), 0.0, m.fan_in_fan_out)
    return dense


def merged_model(base: str | os.PathLike, adapter: str | os.PathLike, quant_type: str = "nf4",
                 double_quant: bool = True, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                 ) -> tuple[nn.Module, dict[str, tuple[nn.Linear, float, bool]]]:
    """The base as it was trained (4-bit), with every quantized layer replaced by its dense
    16-bit merge dequant(W) + scaling * B @ A; and those layers (see _dense_layers)."""
    from .adapter import load_adapter
    from .load import load_model

    model = load_model(base, quant_type, double_quant, progress=False, trust_remote_code=trust_remote_code)
    load_adapter(model, adapter, trainable=False)
    layers = _dense_layers(model, dtype)
    for name, (layer, _, _) in layers.items():
        model.set_submodule(name, layer)
    return model, layers


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    requantize: bool = False,
    quant_type: str = "nf4",
    double_quant: bool = True,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    trust_remote_code: bool = False,
) -> Path:
    """Fold a LoRA adapter into its base and write a checkpoint plain transformers loads.

    The base is loaded as it was trained (4-bit `quant_type`, double quantization); each
    adapted weight becomes dequant(W) + scaling * B @ A, computed in fp32 and rounded once
    to 16 bits (`dtype`, default the checkpoint's). `requantize=True` writes a 4-bit
    checkpoint instead, and warns with the extra error that re-quantizing adds.
    """
    model, layers = merged_model(base, adapter, quant_type, double_quant, dtype, trust_remote_code)
    conv1d = {f"{name}.weight" for name, (_, _, conv) in layers.items() if conv}
    if requantize:
        added = update = 0.0
        for name, (layer, delta_norm, _) in layers.items():
            q = Linear4bit.from_linear(layer, quant_type, 64, double_quant)
            added += float((q.weight.dequantize(torch.float32) - layer.weight.float()).norm() ** 2)
            update += delta_norm**2
            model.set_submodule(name, q)
        ratio = (added / update) ** 0.5 if update else float("inf")
        warnings.warn(
            f"merge --requantize: re-quantizing the merged weights added an error {ratio:.2f}x the size of the "
            "LoRA update itself (Frobenius norms over all adapted layers); the 16-bit merge keeps the update exactly"
        )
        return save_quantized(model, output, max_shard_bytes)
    state = {k: (v.t() if k in conv1d else v) for k, v in model.state_dict().items() if k not in _tied(model)}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(next(iter(layers.values()))[0].weight.dtype).removeprefix("torch.")
    with atomic_directory(output) as tmp:
        write_safetensors(state.items(), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        copy_side_files(getattr(model, "qlora_source", None), tmp)
    return Path(output)
