"""A GGUF file as a transformers checkpoint: config and tokenizer once, tensors one at a time.

    local = gguf_checkpoint(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))  # dir: config.json + tokenizer
    gguf_source(local)                                                # the .gguf file behind it
    for file, name, tensor in stream_gguf(gguf_source(local), model):  # HF names, float32, one alive
        ...

`--model` (and `qlora.load_model`) take a `.gguf` file or a directory holding one; `resolve`
(checkpoint_files.py) turns it into the directory above. The file is checked by qlora's
bounded reader (gguf_file.py) before anything else reads it. The config and tokenizer are
translated from the GGUF metadata by transformers' own GGUF code, once per file, into a small
directory under `$QLORA_CACHE` (default ~/.cache/qlora) keyed by the file's path, size and
modification time; the weights are never copied there. Tensors are dequantized one at a time
from the memory-mapped file and renamed (and, for llama's q/k, un-permuted) by transformers'
tensor processors, so loading streams like safetensors does.
Tests: tests/model/test_smollm2.py (against transformers' GGUF loader).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .gguf_file import GGUFError, GGUFFile, read_gguf
from .temp_files import temp_beside

SOURCE = "gguf_source.json"
SUPPORTED = ("llama", "qwen2", "gemma2", "gemma3", "phi3", "gpt2")
"""GGUF architectures qlora loads, each tested against transformers' GGUF loader on a tiny file
written as llama.cpp writes it (tests/model/test_gguf_model.py). Mistral models are among them:
llama.cpp writes them as "llama" (it has no "mistral" architecture)."""
CACHE_VERSION = 2  # bump when what gguf_checkpoint writes changes, so old translations are redone


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE", "~/.cache/qlora")).expanduser() / "gguf"


def gguf_source(path: Path) -> Path | None:
    """The GGUF file a directory made by `gguf_checkpoint` stands for; None for other directories."""
    record = path / SOURCE
    if not record.is_file():
        return None
    return Path(json.loads(record.read_text())["file"])


def gguf_checkpoint(file: Path) -> Path:
    """A directory with the config.json and tokenizer files of GGUF `file` (made once, atomically)."""
    file = file.resolve()
    stat = file.stat()
    key = hashlib.sha256(f"{CACHE_VERSION}:{file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / f"{file.stem}-{key}"
    if (out / SOURCE).is_file():
        return out
    gguf = read_gguf(file)  # validated before transformers' reader sees it
    arch = gguf.get("general.architecture")
    if arch not in SUPPORTED:
        hint = " (llama.cpp writes Mistral models as 'llama')" if arch == "mistral" else ""
        raise GGUFError(f"{file}: architecture {arch!r} is not supported; qlora loads GGUF files of "
                        f"{', '.join(SUPPORTED)}{hint}")
    from transformers import AutoConfig, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        except (ValueError, KeyError, TypeError) as e:
            raise GGUFError(f"{file}: its metadata does not describe a {arch} model transformers can build "
                            f"({type(e).__name__}: {e})") from None
    if arch == "gpt2" and gguf.get("gpt2.context_length") is not None:
        # transformers maps it to n_ctx, which GPT2Config no longer reads: the position table
        # would keep the default 1024 rows and any other length fail to load
        config.n_positions = gguf.get("gpt2.context_length")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out, directory=True)
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # read back as the tokenizer.json written, not through a model class (Gemma's, GPT-2's)
        # that rebuilds its own pipeline from the vocabulary and so differs from, or fails on,
        # the tokenizer transformers built from this file (e.g. Gemma with a byte-level vocabulary)
        settings = json.loads((tmp / "tokenizer_config.json").read_text())
        settings["tokenizer_class"] = "TokenizersBackend"
        (tmp / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
        record = {"file": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "architecture": arch}
        (tmp / SOURCE).write_text(json.dumps(record, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process made it meanwhile
            if not (out / SOURCE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_names(model: nn.Module, arch: str, processor) -> dict[str, str]:
    """GGUF tensor name -> the model's name, for GGUF architecture `arch` (gguf's name table,
    built once; transformers' get_gguf_hf_weights_map rebuilds it for every submodule)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    code = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    table = get_tensor_name_map(code, model.config.num_hidden_layers)
    names = {}
    for name in model.state_dict():
        key = processor.preprocess_name(name)
        stem, dot, suffix = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
        parts = stem.split(".")
        for i in range(len(parts)):  # as a submodule would name it: "model.layers.0..." then "layers.0..."
            found = table.get_name(".".join(parts[i:]))
            if found is not None:
                names.setdefault(found + dot + suffix, name)
                break
    return names


def stream_gguf(file: Path | GGUFFile, model: nn.Module, progress: bool = True,
                select: Callable[[str], bool] | None = None) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, float32 tensor) for each tensor of GGUF `file` (a path or its parsed header):
    named as in `model` (built from its config, parameters on meta) where it has the tensor, else
    by its GGUF name. With `select`, only the tensors whose model name it accepts are read."""
    from tqdm import tqdm
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    gguf = file if isinstance(file, GGUFFile) else read_gguf(file)
    file = gguf.path
    arch = gguf.get("general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    names = gguf_names(model, arch, processor)
    infos = [i for i in gguf.tensors.values() if select is None or select(names.get(i.name, i.name))]
    for info in tqdm(infos, desc="load", unit="tensor", disable=not progress):
        parsed: dict = {"tensors": {}}
        result = processor.process(weights=gguf.read(info.name).numpy(), name=info.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name is None:  # the processor stored it itself (gpt2's output head)
            for key in list(parsed["tensors"]):
                yield file, key, parsed["tensors"].pop(key)
            continue
        key = names.get(result.name)
        tensor = torch.from_numpy(np.ascontiguousarray(result.weights))  # a copy only where the processor permuted
        del result  # held here, the last tensor would stay alive while the next one is read
        yield file, key if key is not None else info.name, tensor
        del tensor
