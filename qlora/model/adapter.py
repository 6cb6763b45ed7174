"""LoRA adapters on disk in PEFT's format, both ways.

    qlora.save_adapter(model, "out/adapter")    # adapter_config.json + adapter_model.safetensors
    qlora.load_adapter(model, "out/adapter")    # also reads adapters that PEFT saved

The files (formats.md section 6): tensors `base_model.model.<module path>.lora_A.weight`
([r, in]) and `.lora_B.weight` ([out, r]), no adapter name in the key, safetensors
metadata {"format": "pt"}; a JSON config with PEFT's LoRA keys. DoRA (nn/dora.py) adds
`.lora_magnitude_vector` ([out]) per layer and `"use_dora": true`, as PEFT writes them. `peft.PeftModel.from_pretrained`
loads what `save_adapter` writes onto the same (dequantized) base and computes the same
logits; tests/model/test_adapter.py checks both directions.

`load_adapter` validates everything before it changes the model: every tensor must name
a linear layer of this model with matching shapes, and every adapter already in the model
must be in the file; errors name the tensor at fault. Layers without an adapter get one;
an existing adapter of another rank is rebuilt at the file's rank (make the optimizer after
loading).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..nn.dora import DoraLinear
from ..nn.linear4bit import Linear4bit, features, is_conv1d
from ..nn.lora import LoraLinear, share_seeds
from .checkpoint_files import CheckpointError, read_tensors
from .targets import is_linear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
                  r"|lora_(?P<m>magnitude)_vector(?:\.weight)?)$")
_UNSUPPORTED = {  # config flags of PEFT features this format reader does not implement
    "bias": lambda v: v not in (None, "none"), "modules_to_save": lambda v: bool(v),
    "lora_bias": lambda v: bool(v), "layer_replication": lambda v: bool(v), "use_qalora": lambda v: bool(v),
}


def _lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _dropout(m: LoraLinear) -> float:
    return float(m.lora_dropout.p) if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def _base(m: LoraLinear) -> nn.Module:
    return m._base4bit() or m.base_layer


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json content for the LoRA layers of `model`."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save; call qlora.prepare_model first")
    ranks = Counter(m.r for m in layers.values())
    alphas = Counter(m.alpha for m in layers.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("save_adapter: the LoRA layers mix rsLoRA and plain scaling; PEFT's format has one flag")
    leaves = sorted({name.rpartition(".")[2] for name in layers})
    # Leaf names are what PEFT writes; they are exact only if no other linear layer shares one.
    others = [n for n, m in model.named_modules()
              if (is_linear(m) or isinstance(m, Linear4bit)) and n not in layers and n.rpartition(".")[2] in leaves]
    targets = leaves if not others else sorted(layers)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    conv1d = any(getattr(_base(m), "fan_in_fan_out", False) or is_conv1d(_base(m))
                 for m in layers.values())
    dora = {isinstance(m, DoraLinear) for m in layers.values()}
    if len(dora) > 1:
        raise ValueError("save_adapter: the layers mix DoRA and plain LoRA; PEFT's format has one use_dora flag")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _dropout(next(iter(layers.values()))),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "use_rslora": rslora.pop(),
        "use_dora": dora.pop(),
        "init_lora_weights": True,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the LoRA weights of `model` (a prepared transformers causal LM) in PEFT's format.

    `tensors` (PEFT keys -> full tensors, see `adapter_tensors`) replaces reading the model's
    weights: FSDP2 passes the ones it gathered from the shards. Each file is written under a
    temporary name and renamed into place, so an existing adapter in `directory` is replaced
    whole or not at all."""
    config = adapter_config(model, base_model_name_or_path)
    if tensors is None:
        tensors = {k: t.detach().cpu().contiguous() for k, t in adapter_tensors(model).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights, tmp_config = directory / f".{WEIGHTS_NAME}.tmp", directory / f".{CONFIG_NAME}.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)
    return directory


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of `model` under PEFT's keys, in module order (the tensors themselves)."""
    tensors = {}
    for name, m in _lora_layers(model).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
        if isinstance(m, DoraLinear):
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    return tensors


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a full name or a dotted suffix (regex)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module path: {"A": tensor, "B": tensor, "M": DoRA magnitude}}) of a PEFT LoRA adapter directory."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.exists():
        raise CheckpointError(f"{config_path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not weights_path.exists():
        hint = " (adapter_model.bin is a pickle: re-save it with safetensors)" if (directory / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{weights_path} not found{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    _check_config(config_path, config)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(weights_path):
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{weights_path}: tensor {key!r} is not a LoRA weight "
                                  f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight' (DoRA: "
                                  "'.lora_magnitude_vector'); qlora reads LoRA and DoRA only")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{weights_path}: tensor {key!r} is {tensor.dtype}; LoRA weights are floats")
        got = modules.setdefault(match["module"], {})
        part = "M" if match["m"] else match["ab"]
        if part in got:
            raise CheckpointError(f"{weights_path}: two tensors for {key!r} (several adapters?)")
        got[part] = tensor
    if not modules:
        raise CheckpointError(f"{weights_path}: holds no LoRA tensors")
    return config, modules


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_config(path: Path, config: object) -> None:
    """The adapter_config.json keys qlora uses, with PEFT's types; raises CheckpointError naming the key."""
    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{path}: {message}; fix the file or re-save the adapter")

    if not isinstance(config, dict):
        raise bad(f"a JSON {type(config).__name__}, not an object")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; qlora reads LORA adapters only")
    for key, unsupported in _UNSUPPORTED.items():
        if unsupported(config.get(key)):
            raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported by qlora (plain LoRA only)")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise bad(f"missing {key!r}")
    if type(config["r"]) is not int or config["r"] < 1:
        raise bad(f"r={config['r']!r:.40} is not an int >= 1")
    if not _is_number(config["lora_alpha"]) or config["lora_alpha"] <= 0:
        raise bad(f"lora_alpha={config['lora_alpha']!r:.40} is not a positive number")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        raise bad(f"lora_dropout={dropout!r:.40} is not a number in [0, 1)")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise bad(f"target_modules={targets!r:.40} is not a name, a regex or a list of names")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise bad(f"{key}={config[key]!r:.40} is not true or false")
    patterns = (("rank_pattern", "ranks", lambda v: type(v) is int and v >= 1), ("alpha_pattern", "numbers", _is_number))
    for key, values, ok in patterns:
        pattern = {} if config.get(key) is None else config[key]
        if not isinstance(pattern, dict) or not all(ok(v) for v in pattern.values()):
            raise bad(f"{key}={pattern!r:.60} is not a mapping of module names to {values}")
        for name in pattern:
            try:
                re.compile(name)
            except re.error as e:
                raise bad(f"{key} key {name!r} is not a valid regex ({e})") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA or DoRA adapter (saved by qlora or by PEFT) into `model`, in place."""
    config, modules = read_adapter(directory)
    dora = bool(config.get("use_dora", False))
    weights_path = Path(directory) / WEIGHTS_NAME
    existing = _lora_layers(model)
    plan = []
    for path, ab in sorted(modules.items()):
        key_a, key_b = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        for key, part in ((key_a, "A"), (key_b, "B")):
            if part not in ab:
                raise CheckpointError(f"{weights_path}: tensor {key!r} is missing (its partner is there)")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{weights_path}: tensor {key_a!r} names module {path!r}, which "
                             f"{type(model).__name__} does not have; the adapter belongs to another base model") from None
        if isinstance(module, LoraLinear):
            if module.merged:
                raise ValueError(f"{path}: its LoRA layer is merged into the base weight; unmerge() it before "
                                 "loading an adapter")
            in_f, out_f = module.in_features, module.out_features
        elif is_linear(module) or isinstance(module, Linear4bit):
            in_f, out_f = features(module)
        else:
            raise CheckpointError(f"{weights_path}: tensor {key_a!r} names {path!r}, a {type(module).__name__}, not a "
                                  "linear layer; the adapter belongs to another base model")
        a, b = ab["A"], ab["B"]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or a.shape[1] != in_f:
            raise CheckpointError(f"{weights_path}: tensor {key_a!r} has shape {tuple(a.shape)}; module {path!r} "
                             f"needs [r, {in_f}]: the adapter belongs to another base model")
        if tuple(b.shape) != (out_f, r):
            raise CheckpointError(f"{weights_path}: tensor {key_b!r} has shape {tuple(b.shape)}; with "
                             f"{key_a!r} of shape {tuple(a.shape)}, module {path!r} needs ({out_f}, {r})")
        if r != _pattern_value(config.get("rank_pattern"), path, config["r"]):
            raise CheckpointError(f"{weights_path}: tensor {key_a!r} has rank {r}, adapter_config.json says "
                             f"{_pattern_value(config.get('rank_pattern'), path, config['r'])}")
        magnitude = ab.get("M")
        key_m = f"{PREFIX}{path}.lora_magnitude_vector"
        if dora and (magnitude is None or tuple(magnitude.shape) != (out_f,)):
            raise CheckpointError(f"{weights_path}: adapter_config.json says use_dora, and module {path!r} needs "
                                  f"tensor {key_m!r} of shape ({out_f},); "
                                  + ("it is missing" if magnitude is None else f"it has {tuple(magnitude.shape)}"))
        if not dora and magnitude is not None:
            raise CheckpointError(f"{weights_path}: tensor {key_m!r} is a DoRA magnitude, but adapter_config.json "
                                  "does not say use_dora: true")
        alpha = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
        plan.append((path, module, a, b, r, alpha, magnitude))
    missing = sorted(set(existing) - set(modules))
    if missing:
        raise CheckpointError(f"{weights_path}: lacks tensor {PREFIX}{missing[0]}.lora_A.weight for the model's LoRA layer "
                         f"{missing[0]!r} ({len(missing)} layer(s) without weights in the file)")

    dropout = float(config.get("lora_dropout") or 0.0)
    rslora = bool(config.get("use_rslora", False))
    kind = DoraLinear if dora else LoraLinear
    for path, module, a, b, r, alpha, magnitude in plan:
        if isinstance(module, LoraLinear) and (module.r != r or type(module) is not kind):
            module = kind(module.base_layer, r, alpha, _dropout(module), rslora, module.lora_A.weight.dtype)
            model.set_submodule(path, module)
        elif not isinstance(module, LoraLinear):
            module = kind(module, r, alpha, dropout, rslora)
            model.set_submodule(path, module)
        module.alpha, module.use_rslora = alpha, rslora  # its scaling follows
        with torch.no_grad():
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
            if magnitude is not None:
                module.lora_magnitude_vector.copy_(magnitude)
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)
        module.lora_A.weight.requires_grad_(trainable)
        module.lora_B.weight.requires_grad_(trainable)
    share_seeds(model)
    return model
