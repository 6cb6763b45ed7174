"""Find, check and stream the weight files of a Hugging Face checkpoint, one tensor at a time.

    path = resolve("meta-llama/Llama-3.2-1B")        # local dir, or the Hub cache / download
    for name, tensor in stream_tensors(path):         # bounded memory: one tensor alive
        ...

Only safetensors are read by default. A `.bin`/pickle-only checkpoint is refused unless
`allow_pickle=True`, and then loaded with `torch.load(weights_only=True)`. Errors name
the file (and tensor) at fault and say what to do.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and what to do."""


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory holding the checkpoint: the path itself, the Hub snapshot, or for a
    .gguf file (or a directory holding one) its config + tokenizer directory (gguf_model.py)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        from .gguf_file import find_gguf  # it imports CheckpointError from here

        gguf = path if path.is_file() and path.suffix == ".gguf" else None
        if path.is_dir() and not (path / "config.json").exists():
            gguf = find_gguf(path)
        if gguf is not None:
            from .gguf_model import gguf_checkpoint

            return gguf_checkpoint(gguf)
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model directory (config.json + *.safetensors) or a .gguf "
                                  "file, got another file")
        return path
    text = str(path_or_hub_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such directory (and not a Hub id of the form owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text}: not in the local Hugging Face cache and the Hub is unreachable (HF_HUB_OFFLINE={int(offline)}); "
            "download it where there is network, or pass the path of a local model directory"
        ) from None
    except Exception as e:  # network errors, unknown repos, gated models
        raise CheckpointError(f"{text}: could not fetch from the Hub ({type(e).__name__}: {e}); pass a local path") from None


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files in load order (sharded via the index, or single)."""
    index = path / INDEX
    if index.exists():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / f for f in dict.fromkeys(mapping.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{path}: only pickle weights ({', '.join(p.name for p in pickles)}); pickles can run code when loaded. "
            "Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) to load them with "
            "torch.load(weights_only=True)"
        )
    if pickles:
        return pickles
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors or {INDEX})")


_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


def read_header(file: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file: name -> {dtype, shape, data_offsets}."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors file; re-download or re-save it")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{file}: header claims {n} bytes but the file has {size}; the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors header ({e}); re-download or re-save it") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(
                f"{file}: tensor {name!r} ends at byte {8 + n + end} but the file has {size} bytes; the file is truncated"
            )
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        info["start"] = 8 + n + start
    return header


def read_tensors(
    file: Path, scratch: Callable[[str], bool] | None = None, buffer: torch.Tensor | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors one at a time with plain reads (no memory map, so pages of the file
    never count against this process's resident memory). Tensors for which `scratch(name)`
    is true are read into `buffer` (uint8, large enough) and are valid only until the next."""
    header = read_header(file)
    with open(file, "rb", buffering=0) as f:
        for name, info in header.items():
            dtype, shape = _DTYPES[info["dtype"]], info["shape"]
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if nbytes != expected:
                raise CheckpointError(f"{file}: tensor {name!r} has {nbytes} bytes for shape {shape} {info['dtype']}")
            if buffer is not None and scratch is not None and scratch(name):
                t = buffer[:nbytes].view(dtype).view(shape)
            else:
                t = torch.empty(shape, dtype=dtype)
            if nbytes:
                f.seek(info["start"])
                got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                if got != nbytes:
                    raise CheckpointError(f"{file}: tensor {name!r} is truncated ({got} of {nbytes} bytes)")
            yield name, t


def tensor_table(path: Path, allow_pickle: bool = False) -> dict[str, tuple[Path, list[int], int]]:
    """Every tensor of the checkpoint: name -> (file, shape, bytes), from headers only."""
    table: dict[str, tuple[Path, list[int], int]] = {}
    for file in weight_files(path, allow_pickle):
        if file.suffix == ".safetensors":
            for name, info in read_header(file).items():
                table[name] = (file, info["shape"], info["data_offsets"][1] - info["data_offsets"][0])
        else:
            for name, t in torch.load(file, map_location="meta", weights_only=True).items():
                table[name] = (file, list(t.shape), t.numel() * t.element_size())
    return table


def stream_tensors(
    path: Path, allow_pickle: bool = False, progress: bool = True, scratch: Callable[[str], bool] | None = None
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield (file, name, tensor) for every weight of the checkpoint at `path`, one at a time.

    Tensors selected by `scratch(name)` (the ones the caller consumes at once, e.g. to
    quantize them) share one reused buffer sized to the largest of them, so reading adds
    no allocation churn: the peak is what the caller keeps plus that one buffer.
    """
    table = tensor_table(path, allow_pickle)
    sizes = [nbytes for name, (_, _, nbytes) in table.items() if scratch is not None and scratch(name)]
    buffer = torch.empty(max(sizes), dtype=torch.uint8) if sizes else None
    total = sum(nbytes for _, _, nbytes in table.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        for file in dict.fromkeys(f for f, _, _ in table.values()):
            if file.suffix == ".safetensors":
                tensors = read_tensors(file, scratch, buffer)
            else:
                tensors = iter(torch.load(file, map_location="cpu", weights_only=True, mmap=True).items())
            for name, t in tensors:
                bar.update(t.numel() * t.element_size())
                yield file, name, t
