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
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory holding the checkpoint: the path itself, the Hub snapshot, or for a
    .gguf file (or a directory holding one) its config + tokenizer directory (gguf_model.py)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        from .gguf_file import find_gguf

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
MAX_HEADER = 100_000_000  # bytes of header JSON; the safetensors library's own limit
_REDO = "the file is corrupt or not safetensors; re-download or re-save it"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate name {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _is_int(x: object) -> bool:
    return type(x) is int  # not bool, not float


def read_header(file: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file: name -> {dtype, shape, data_offsets, start},
    validated as strictly as the safetensors library does (lengths, types, dtypes, shapes;
    offsets sorted, contiguous and covering the data exactly). `start` is the file offset."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors file; re-download or re-save it")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER:
            raise CheckpointError(f"{file}: bytes 0-7 give a header of {n} bytes but the file has {size} "
                                  f"(at most {MAX_HEADER}); the file is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: unreadable safetensors header ({e.msg} at byte {8 + e.pos}); {_REDO}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # non-UTF-8, duplicate names, deep nesting
        raise CheckpointError(f"{file}: unreadable safetensors header ({e}, bytes 8-{8 + n}); {_REDO}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the header (bytes 8-{8 + n}) is a JSON {type(header).__name__}, "
                              f"not an object; {_REDO}")
    meta = header.pop("__metadata__", None)  # null, like absent, is what the library accepts
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{file}: __metadata__ must map strings to strings, got {meta!r:.80}; {_REDO}")
    for name, info in header.items():
        where = f"{file}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: expected {{dtype, shape, data_offsets}}, got {info!r:.80}; {_REDO}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype!r}; qlora reads {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r:.80} is not a list of non-negative ints; {_REDO}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r:.80} is not [begin, end] with "
                                  f"0 <= begin <= end; {_REDO}")
        nbytes = math.prod(shape) * torch.empty(0, dtype=_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes (file byte "
                                  f"{8 + n + offsets[0]}), shape {shape} {dtype} needs {nbytes}; {_REDO}")
        if 8 + n + offsets[1] > size:
            raise CheckpointError(f"{where} ends at byte {8 + n + offsets[1]} but the file has {size} bytes; "
                                  "the file is truncated: re-download or re-save it")
        info["start"] = 8 + n + offsets[0]
    end = 0  # the tensors, in file order, must tile the data buffer: no gap, overlap or tail
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = info["data_offsets"]
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(f"{file}: tensor {name!r} starts at file byte {8 + n + begin}, which {what} "
                                  f"(that one ends at {8 + n + end}); {_REDO}")
        end = stop
    if 8 + n + end != size:
        raise CheckpointError(f"{file}: the tensors end at byte {8 + n + end}, {size - 8 - n - end} bytes before the "
                              f"end of the file; {_REDO}")
    return header


def read_tensors(
    file: Path, scratch: Callable[[str], bool] | None = None, buffer: torch.Tensor | None = None,
    select: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors one at a time with plain reads (no memory map, so pages of the file
    never count against this process's resident memory). Tensors for which `scratch(name)`
    is true are read into `buffer` (uint8, large enough) and are valid only until the next;
    with `select`, only the tensors it accepts are read."""
    header = read_header(file)
    with open(file, "rb", buffering=0) as f:
        for name, info in header.items():
            if select is not None and not select(name):
                continue
            dtype, shape = _DTYPES[info["dtype"]], info["shape"]
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            if buffer is not None and scratch is not None and scratch(name):
                t = buffer[:nbytes].view(dtype).view(shape)
            else:
                t = torch.empty(shape, dtype=dtype)
            if nbytes:
                f.seek(info["start"])
                got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                if got != nbytes:  # the file shrank since its header was read
                    raise CheckpointError(f"{file}: tensor {name!r} is truncated ({got} of {nbytes} bytes)")
            yield name, t


def _load_pickle(file: Path, **kwargs) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True): tensors only; a pickle that would run code is refused."""
    try:
        state = torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"refers to {found.group(1)}" if found else "holds more than tensors"
        raise CheckpointError(f"{file}: the pickle {what}, which qlora does not load (it can run code); "
                              "convert the checkpoint to safetensors where you trust it, and load that") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{file}: not a readable torch checkpoint ({str(e).split('. ')[0].strip()}); "
                              "re-download it or convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file}: expected a state dict of named tensors; convert it to safetensors")
    return state


def tensor_table(path: Path, allow_pickle: bool = False) -> dict[str, tuple[Path, list[int], int]]:
    """Every tensor of the checkpoint: name -> (file, shape, bytes), from headers only."""
    table: dict[str, tuple[Path, list[int], int]] = {}
    for file in weight_files(path, allow_pickle):
        if file.suffix == ".safetensors":
            for name, info in read_header(file).items():
                table[name] = (file, info["shape"], info["data_offsets"][1] - info["data_offsets"][0])
        else:
            for name, t in _load_pickle(file, map_location="meta").items():
                table[name] = (file, list(t.shape), t.numel() * t.element_size())
    return table


def stream_tensors(
    path: Path, allow_pickle: bool = False, progress: bool = True, scratch: Callable[[str], bool] | None = None,
    select: Callable[[str], bool] | None = None,
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield (file, name, tensor) for every weight of the checkpoint at `path` (or every one
    `select(name)` accepts), one at a time.

    Tensors selected by `scratch(name)` (the ones the caller consumes at once, e.g. to
    quantize them) share one reused buffer sized to the largest of them, so reading adds
    no allocation churn: the peak is what the caller keeps plus that one buffer.
    """
    table = {k: v for k, v in tensor_table(path, allow_pickle).items() if select is None or select(k)}
    sizes = [nbytes for name, (_, _, nbytes) in table.items() if scratch is not None and scratch(name)]
    buffer = torch.empty(max(sizes), dtype=torch.uint8) if sizes else None
    total = sum(nbytes for _, _, nbytes in table.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        for file in dict.fromkeys(f for f, _, _ in table.values()):
            if file.suffix == ".safetensors":
                tensors = read_tensors(file, scratch, buffer, select)
            else:
                tensors = ((k, t) for k, t in _load_pickle(file, map_location="cpu", mmap=True).items() if k in table)
            for name, t in tensors:
                bar.update(t.numel() * t.element_size())
                yield file, name, t
