"""Training checkpoints: list, save, load, for one process and for N ranks alike.

    save_checkpoint(output, model, optimizer, sched, state, keep_last, ranks)  # <output>/checkpoints/step-0000042
    state = load_checkpoint(checkpoints(output)[-1], model, optimizer, sched, ranks)

A checkpoint directory holds the LoRA adapter in PEFT's format (adapter_config.json,
adapter_model.safetensors; under FSDP2 gathered to full tensors and written by rank 0), the
optimizer state (`optimizer.safetensors`; under FSDP2 each rank's shard in
`optimizer-rank{r}.safetensors`), the random generators (`rng.safetensors`; under torchrun
`rng-rank{r}.safetensors` per rank) and trainer_state.json (step, data position, counters,
the schedule; under torchrun also the world size and mode, which --resume requires again).
Written into a temporary directory that is renamed into place (under torchrun every rank
writes into rank 0's, after a broadcast of its name, and a barrier precedes the rename): a
checkpoint is complete or absent. Only the newest `keep_last` are kept.
Optimizer state is flattened for safetensors by `state_dict_to_tensors` (no pickles).
Tests: tests/train/test_loop.py (resume, Ctrl-C), tests/train/test_distributed.py (N ranks),
tests/optim/test_optim_state_dict.py (the flattening).
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, TrainingError
from ..model.adapter import PREFIX, adapter_tensors, load_adapter, read_adapter, save_adapter
from ..model.save import atomic_directory
from ..model.shard import shard_rows
from ..optim.adamw import local
from .distributed import Ranks, barrier, broadcast, unwrap


def checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints in `output`, oldest first."""
    found = [p for p in (output / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# ---- random generators ----------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a step draws from: torch's CPU one (the LoRA dropout seeds) and, on CUDA,
    the device's (the model's own dropout, e.g. GPT-2's, runs there)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Inverse of rng_state (a checkpoint without a CUDA state leaves the device's as it is)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- optimizer state as safetensors ---------------------------------------------------------------
def state_dict_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer state dict for safetensors: ({"state.<i>.<key>": tensor}, metadata).

    metadata["param_groups"] is the JSON of the parameter groups.
    """
    tensors = {f"state.{i}.{k}": t.contiguous() for i, s in state_dict["state"].items() for k, t in s.items()}
    return tensors, {"param_groups": json.dumps(state_dict["param_groups"])}


def state_dict_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """Inverse of `state_dict_to_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, t in tensors.items():
        prefix, i, key = name.split(".", 2)
        if prefix != "state":
            raise ValueError(f"state_dict_from_tensors: unexpected key {name!r} (expected state.<i>.<key>)")
        state[int(i)][key] = t
    return {"state": dict(state), "param_groups": json.loads(metadata["param_groups"])}


def _optimizer_file(ranks: Ranks) -> str:
    """FSDP2: each rank's shard; one process or DDP (replicated state): one file."""
    return f"optimizer-rank{ranks.rank}.safetensors" if ranks.mode == "fsdp" else "optimizer.safetensors"


def _rng_file(ranks: Ranks) -> str:
    return f"rng-rank{ranks.rank}.safetensors" if ranks.active else "rng.safetensors"


# ---- the adapter ----------------------------------------------------------------------------------
def gathered_adapter(model: nn.Module, ranks: Ranks) -> dict[str, torch.Tensor] | None:
    """Full LoRA tensors under PEFT keys on rank 0 (None elsewhere); collective under FSDP2."""
    out = {}
    for key, p in adapter_tensors(unwrap(model)).items():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        if ranks.main:
            out[key] = full.detach().cpu().contiguous()
    return out if ranks.main else None


def save_adapter_gathered(model: nn.Module, directory: Path, ranks: Ranks, base_model_name_or_path=None) -> None:
    """Rank 0 writes the gathered adapter (PEFT format) atomically; every rank must call this."""
    tensors = gathered_adapter(model, ranks)
    if ranks.main:
        with atomic_directory(directory) as tmp:
            save_adapter(unwrap(model), tmp, base_model_name_or_path=base_model_name_or_path, tensors=tensors)
    barrier(ranks)


@torch.no_grad()
def _load_adapter(path: Path, model: nn.Module, ranks: Ranks) -> None:
    """The saved (full) adapter into the model: load_adapter in one process; under torchrun each
    rank copies its piece into its LoRA parameters (shards under FSDP2, whole under DDP)."""
    if not ranks.active:
        load_adapter(model, path, trainable=True)
        return
    _, modules = read_adapter(path)
    for key, p in adapter_tensors(unwrap(model)).items():
        module, part = key[len(PREFIX):].rsplit(".lora_", 1)
        full = modules.get(module, {}).get(part[0])
        if full is None:
            raise CheckpointError(f"{path}: lacks tensor {key!r} that this model's LoRA layer needs")
        if tuple(full.shape) != tuple(p.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(full.shape)}, the model's is {tuple(p.shape)}")
        piece = shard_rows(full, ranks.rank, ranks.world_size) if hasattr(p, "to_local") else full
        local(p).copy_(piece)


# ---- save and load --------------------------------------------------------------------------------
def save_checkpoint(output: Path, model, optimizer, sched, state: dict, keep_last: int, ranks: Ranks) -> Path:
    """Adapter, optimizer, schedule, RNG and trainer state for `state["step"]`, atomically
    (see the module docstring); collective under torchrun."""
    target = output / "checkpoints" / f"step-{state['step']:07d}"
    tensors = gathered_adapter(model, ranks)

    def write_own(tmp: Path) -> None:
        if ranks.mode == "fsdp" or ranks.main:
            flat, meta = state_dict_to_tensors(optimizer.state_dict())
            save_file(flat, str(tmp / _optimizer_file(ranks)), metadata=meta)
        save_file(rng_state(ranks.device), str(tmp / _rng_file(ranks)))

    if ranks.main:
        with atomic_directory(target) as tmp:
            broadcast(str(tmp), ranks)
            write_own(tmp)
            barrier(ranks)  # every rank has written its files
            save_adapter(unwrap(model), tmp, tensors=tensors)
            full = dict(state, scheduler=sched.state_dict())
            if ranks.active:
                full.update(world_size=ranks.world_size, distributed=ranks.mode)
            (tmp / "trainer_state.json").write_text(json.dumps(full, indent=2))
        for old in checkpoints(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    else:
        write_own(Path(broadcast(None, ranks)))
        barrier(ranks)
    barrier(ranks)  # the directory is in place
    return target


def load_checkpoint(path: Path, model, optimizer, sched, ranks: Ranks) -> dict:
    """Inverse of save_checkpoint, on the same world size and mode (a TrainingError otherwise)."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved_world, saved_mode = state.pop("world_size", 1), state.pop("distributed", "none")
    if (saved_world, saved_mode) != (ranks.world_size, ranks.mode):
        raise TrainingError(f"{path}: written by {saved_world} process{'es' if saved_world > 1 else ''} ({saved_mode}); "
                            f"this run has {ranks.world_size} ({ranks.mode}). Resume it under torchrun with the same "
                            "--nproc-per-node/--nnodes and --distributed, or start a new --output")
    _load_adapter(path, model, ranks)
    name = path / _optimizer_file(ranks)
    with safe_open(str(name), "pt") as f:
        meta = f.metadata()
    optimizer.load_state_dict(state_dict_from_tensors(load_file(str(name)), meta))
    sched.load_state_dict(state.pop("scheduler"))
    set_rng_state(load_file(str(path / _rng_file(ranks))), ranks.device)
    return state
