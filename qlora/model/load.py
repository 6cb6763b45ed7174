"""Load a Hugging Face causal LM straight into 4 bits, one tensor at a time.

    model = qlora.load_model("path/or/owner-name", quant_type="nf4", double_quant=True)

1. The model is built from its config with every parameter on the meta device (no
   memory); buffers such as rotary frequencies are built for real.
2. The safetensors files (single or sharded), or a GGUF file (gguf_model.py: dequantized
   one tensor at a time), are read tensor by tensor with plain reads.
   Each targeted linear weight is quantized as it arrives and its 16-bit copy dropped;
   other tensors (embeddings, lm_head, norms, biases) are kept in 16 bits (prepare_model
   later moves norms to fp32 for training).
3. A checkpoint that is already 4-bit (config.json carries a bitsandbytes
   `quantization_config`) is read as is, bit-exact, with no re-quantization.
Peak memory: about the quantized model plus the largest single tensor in 16-bit (a GGUF
tensor is decoded to float32 a few rows at a time, then converted). Before any of that, the
config's layer counts and sizes are checked against the tensors the files hold (check_config).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..nn.linear4bit import Linear4bit, is_conv1d
from ..quant.tensor import QuantizedTensor, quantize
from .checkpoint_files import CheckpointError, resolve, stream_tensors, tensor_table
from .gguf_file import read_gguf
from .gguf_model import gguf_source, stream_gguf
from .prepare import select_modules

_QUANT_PIECES = re.compile(r"^(?P<weight>.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_free_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc malloc_trim(0)); a no-op elsewhere.

    Temporaries freed between long-lived tensors leave holes that glibc keeps: loading a 170M
    Llama with the PyTorch reference quantizer (no C kernels) peaked anywhere from 199 to 307
    MiB over five runs, and at 210-214 MiB when trimmed after each tensor (the model is 176)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create every nn.Parameter on the meta device; buffers are created normally."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def bnb_quantization(config, where: str | Path = "config.json") -> dict | None:
    """The bitsandbytes 4-bit quantization_config of a transformers config, if any."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes" or qc.get("load_in_4bit", qc.get("_load_in_4bit")) is not True:
        raise CheckpointError(
            f"{where}: quantization_config {qc.get('quant_method')!r:.40} (load_in_4bit={qc.get('load_in_4bit')!r:.20}) "
            "is not a bitsandbytes 4-bit checkpoint; qlora reads 16-bit checkpoints and bitsandbytes 4-bit ones"
        )
    return qc


def read_config(path: Path, trust_remote_code: bool = False):
    """The transformers config of model directory `path`; CheckpointError if transformers cannot read it."""
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json; a model directory holds config.json and its weights")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, ArithmeticError) as e:
        raise CheckpointError(f"{path / 'config.json'}: transformers cannot read it ({type(e).__name__}: "
                              f"{str(e)[:300]}); re-download it or fix the file") from None


_SIZES = ("hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_attention_heads", "num_key_value_heads",
          "n_embd", "n_inner", "n_head", "moe_intermediate_size", "num_experts", "num_local_experts")
_LAYERS = ("num_hidden_layers", "n_layer")


def check_config(config, shapes: list[list[int]], names: list[str], where: Path) -> None:
    """Sizes in config.json that the weights cannot back are refused before a model is built from
    them (a declared 10^5 layers would hang the build, a vocab of 2^40 allocate from it): every
    layer count at most the layers the tensor names hold, every size at most the largest tensor's
    element count (x2: packed 4-bit bytes hold two)."""
    largest = 2 * max((math.prod(s) for s in shapes), default=0)
    layers = 1 + max((int(i) for name in names for i in re.findall(r"(?:^|\.)(\d+)\.", name)), default=0)
    for key in _SIZES + _LAYERS:
        value = getattr(config, key, None)
        if value is None:
            continue
        bound = layers if key in _LAYERS else largest
        if type(value) is not int or not 0 < value <= bound:
            raise CheckpointError(f"{where}: {key}={value!r:.40} does not fit the weights (at most {bound} for their "
                                  f"{len(names)} tensors); the config belongs to another checkpoint or is corrupt")


def _no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' own switch for skipping weight initialization (what from_pretrained uses):
    on meta parameters, initialization is Python meta kernels, 45% of a SmolLM2 build. It skips
    the tying too, so load_model ties the weights itself once they are loaded."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_model(config, where: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` with every parameter on the meta device (buffers real), weights not
    initialized and not tied."""
    from transformers import AutoModelForCausalLM

    with meta_parameters(), _no_init_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, ArithmeticError) as e:
            raise CheckpointError(f"{where}: transformers cannot build the model it describes ({type(e).__name__}: "
                                  f"{str(e)[:300]}); fix the file or re-download it") from None


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, file: Path, dtype: torch.dtype) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = module._parameters.get(attr, None)
    if current is None and attr in module._buffers:
        current = module._buffers[attr]
    if current is None:
        raise KeyError(name)
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects {tuple(current.shape)}; "
            "the weights do not belong to this config.json"
        )
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def _checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def load_model(
    path_or_hub_id: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    target_modules: str | list[str] = "all-linear",
    blocksize: int = 64,
    allow_pickle: bool = False,
    progress: bool = True,
) -> nn.Module:
    """A transformers causal LM whose targeted linear layers are Linear4bit, loaded with a
    bounded memory peak (see the module docstring). Other float weights are stored in the
    checkpoint's 16-bit dtype (bf16 if it is fp32; fp32 if `compute_dtype` is), all frozen.
    `quant_type="none"` keeps every weight so (16-bit LoRA)."""
    path = resolve(path_or_hub_id)
    config = read_config(path, trust_remote_code)
    prequantized = bnb_quantization(config, path / "config.json")
    if prequantized is not None:
        config.quantization_config = None
        del config.quantization_config
    device = torch.device(device or "cpu")
    gguf = gguf_source(path)
    names = tensor_table(path, allow_pickle) if gguf is None else {}
    header = None if gguf is None else read_gguf(gguf)  # parsed once: its string tables take a while
    shapes = {n: s for n, (_, s, _) in names.items()} if header is None else {
        n: list(t.shape) for n, t in header.tensors.items()}
    check_config(config, list(shapes.values()), list(shapes), path / "config.json")
    model = build_model(config, path / "config.json", trust_remote_code)
    model.eval()
    # unquantized weights: 16-bit as in the checkpoint, or fp32 when the compute is fp32 (so no
    # matmul falls back to bf16 on CPUs where bf16 is emulated)
    store_dtype = torch.float32 if compute_dtype == torch.float32 else _checkpoint_dtype(config)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    prefix = getattr(model, "base_model_prefix", "")

    def model_key(key: str) -> str | None:
        if key in params:
            return key
        if prefix and f"{prefix}.{key}" in params:
            return f"{prefix}.{key}"
        return None

    if prequantized is not None:
        targets = {m[: -len(".weight")] for key in names if (m := _weight_of_piece(key))}
        targets = {model_key(f"{t}.weight")[: -len(".weight")] for t in targets if model_key(f"{t}.weight")}
    elif quant_type == "none":  # 16-bit LoRA: every weight stays as it is
        targets = set()
    else:
        targets = set(select_modules(model, target_modules))
    pieces: dict[str, dict[str, torch.Tensor]] = {t: {} for t in targets}
    unexpected: list[str] = []

    def quantized_on_arrival(key: str) -> bool:  # read into the shared scratch buffer
        name = model_key(key)
        return prequantized is None and name is not None and name.endswith(".weight") and name[: -len(".weight")] in targets

    stream = (stream_tensors(path, allow_pickle, progress, scratch=quantized_on_arrival) if gguf is None
              else stream_gguf(header, model, progress))
    def place(file: Path, key: str, tensor: torch.Tensor) -> None:
        piece = _weight_of_piece(key)
        name = model_key(piece or key)
        module = name.rpartition(".")[0] if name else None
        if name is not None and module in targets and (piece is not None or name.endswith(".weight")):
            if prequantized is not None:
                pieces[module][key.replace(piece or key, "weight", 1) if piece else "weight"] = tensor.to(device)
                return
            layer = model.get_submodule(module)
            if tuple(tensor.shape) != tuple(layer.weight.shape):
                raise CheckpointError(
                    f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the config expects "
                    f"{tuple(layer.weight.shape)}; the weights do not belong to this config.json"
                )
            if is_conv1d(layer):  # Conv1D keeps [in, out]; store [out, in] like nn.Linear
                tensor = tensor.t().contiguous()
            pieces[module]["qt"] = quantize(tensor.to(device), quant_type, blocksize, double_quant)
            release_free_heap()  # the quantizer's freed temporaries
        elif name is None:
            unexpected.append(key)
        else:
            _set_tensor(model, name, tensor.to(device), file, store_dtype)

    for file, key, tensor in stream:
        place(file, key, tensor)
        del tensor  # the loop variable would keep it alive while the next one is read
    for module, got in pieces.items():
        layer = model.get_submodule(module)
        if prequantized is not None:
            try:
                qt = QuantizedTensor.from_state_dict(got, prefix="weight")
            except ValueError as e:
                raise CheckpointError(f"{path}: quantized weight {module}.weight: {e}") from None
        elif "qt" in got:
            qt = got["qt"]
        else:
            continue  # reported as missing below
        bias = layer.bias if getattr(layer, "bias", None) is not None and layer.bias.device.type != "meta" else None
        new = Linear4bit.from_quantized(qt, bias=bias, compute_dtype=compute_dtype)
        new.fan_in_fan_out = is_conv1d(layer)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}; "
            "it is incomplete or belongs to another config"
        )
    if unexpected:
        warnings.warn(f"{path}: ignored {len(unexpected)} tensor(s) the model does not use, e.g. {unexpected[:3]}")
    model.requires_grad_(False).eval()  # the swapped-in layers too
    model.qlora_source = str(path)  # where save_quantized / merge_adapter copy the tokenizer from
    return model.to(device)


def _weight_of_piece(key: str) -> str | None:
    m = _QUANT_PIECES.match(key)
    return m.group("weight") if m else None
