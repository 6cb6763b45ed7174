"""Training across processes and machines: torchrun ranks, FSDP2 or DDP, the data split,
sharded checkpoints. train() in loop.py calls these when WORLD_SIZE > 1.

    torchrun --nproc-per-node 2 -m qlora train --model PATH --data FILE --output DIR
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m qlora train ...
    ... --distributed ddp        # a whole model per rank (faster when it fits)

Tested by tests/train/test_distributed.py (2 ranks, gloo, CPU).

- Backend: NCCL with one GPU per rank (LOCAL_RANK) when CUDA is there, else gloo on the CPU.
- `--distributed fsdp` (default): qlora/model/shard.py shards the 4-bit base and the LoRA
  parameters per transformer block with FSDP2; `ddp`: every rank loads the whole QLoRA
  model and DistributedDataParallel all-reduces the LoRA gradients.
- Data: `--batch-size` stays the global micro-batch; rank r takes its contiguous share
  (batch_size / world_size rows) of every micro-batch, so N ranks see exactly the rows one
  process would. The loss of a step is the sum of token losses over all ranks and
  micro-batches divided by the global count of target tokens (one all-reduce per step);
  each rank scales its loss by world_size because FSDP2 and DDP average gradients. Hence a
  run on N ranks follows the single-process run with the same flags (to float rounding).
- Checkpoints: the LoRA adapter is gathered (full tensors) and written by rank 0 in PEFT's
  format; each rank writes its optimizer shard (`optimizer-rank{r}.safetensors`; DDP state
  is replicated, so rank 0 writes one `optimizer.safetensors`) and its RNG state
  (`rng-rank{r}.safetensors`); trainer_state.json records the world size, and `--resume`
  requires the same one. Every rank writes into rank 0's temporary directory, which is
  renamed into place after a barrier: a checkpoint is complete or absent.
- Only rank 0 prints, shows progress bars, and writes metrics, config and summary; it prints
  the memory plan of one rank (qlora memory --world-size N, or 1 with DDP) and writes
  memory.json with the largest measured peak over the ranks (each rank's in rank_peak_bytes).
  Every rank runs the (small) eval set whole; the demo generations run only in one process.
- Dropout: the same seed on every rank for the initial LoRA weights, then rank r reseeds
  with seed + r so that ranks draw different dropout masks.
- Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) under torchrun: `StopRequest` turns
  the signal into a flag; at the start of every step the ranks agree on it (one all-reduce
  of a flag), so all of them stop at the same step and write one checkpoint together, then
  exit; --resume continues from it. torchrun kills its workers 30 s after passing the signal
  on, so a step must finish within that.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.adapter import PREFIX, adapter_tensors, read_adapter, save_adapter
from ..model.loss import causal_lm_loss
from ..model.save import atomic_directory
from ..model.shard import load_sharded, shard_rows, wrap_ddp
from ..nn.lora import LoraConfig
from ..optim import state_dict_from_tensors, state_dict_to_tensors
from ..optim.adamw import local
from . import data as D

MODES = ("fsdp", "ddp")


@dataclass
class Ranks:
    """Where this process stands: its rank, the world size, the mode and the device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none (one process), fsdp or ddp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg) -> Ranks:
    """Join torchrun's process group when WORLD_SIZE > 1; a single process gets Ranks()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.distributed not in MODES:
        raise ValueError(f"--distributed must be one of {', '.join(MODES)}, got {cfg.distributed!r}")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global micro-batch and must be a multiple of the "
                         f"{world} ranks (each takes batch_size / world_size rows); pass e.g. "
                         f"--batch-size {world * max(1, cfg.batch_size // world)}")
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but RANK is not set: launch several processes with torchrun "
                         "(torchrun --nproc-per-node N -m qlora train ...)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    mesh = init_device_mesh(device.type, (world,))
    return Ranks(rank, world, local_rank, cfg.distributed, device, mesh)


def peak_over_ranks(measured: dict[str, int], ranks: Ranks) -> dict[str, int]:
    """The `memory.measure` dict of the rank with the largest peak, plus `peak_rank` and every
    rank's peak in `rank_peak_bytes` (a collective: every rank calls it)."""
    import torch.distributed as dist

    every: list = [None] * ranks.world_size
    dist.all_gather_object(every, measured)
    peaks = [m["measured_peak_bytes"] for m in every]
    top = peaks.index(max(peaks))
    return dict(every[top], peak_rank=top, rank_peak_bytes=peaks)


def shutdown(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def build_model(cfg, ranks: Ranks, model_path: str, build_single) -> nn.Module:
    """The training model: FSDP2-sharded (loaded shard by shard), or DDP over `build_single`'s."""
    from .config import compute_dtype as resolve_compute_dtype

    if ranks.mode == "ddp":
        return wrap_ddp(build_single(cfg, model_path).to(ranks.device), ranks.device)
    if cfg.quant_type == "none":
        raise ValueError("--quant-type none (16-bit LoRA) is not sharded by FSDP2 here; use --distributed ddp")
    if cfg.calibrate:
        raise ValueError("--calibrate loads the whole model to calibrate it, which FSDP2's sharded loading does not; "
                         "use --distributed ddp, or calibrate once with `qlora quantize --calibrate` and train on that")
    lora = LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.targets(),
                      use_rslora=cfg.use_rslora)
    return load_sharded(model_path, lora, rank=ranks.rank, world_size=ranks.world_size, device=ranks.device,
                        mesh=ranks.mesh, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                        blocksize=cfg.blocksize, compute_dtype=resolve_compute_dtype(cfg), target_modules=cfg.targets(),
                        gradient_checkpointing=cfg.gradient_checkpointing, keep_attention=cfg.keep_attention,
                        trust_remote_code=cfg.trust_remote_code)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP wrapper (FSDP2 does not wrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def share(batch: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, torch.Tensor]:
    """This rank's contiguous rows of a global micro-batch, on its device."""
    return {k: shard_rows(v, ranks.rank, ranks.world_size).to(ranks.device) for k, v in batch.items()}


def all_reduce_sum(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to(ranks.device)
    dist.all_reduce(t)
    return t.cpu()


def forward_backward(model: nn.Module, micro: list[dict[str, torch.Tensor]], ranks: Ranks) -> torch.Tensor:
    """Backward over this rank's share of `micro`; returns the step's global mean token loss.

    Each rank's loss is (its token-loss sum) / (global target tokens) x world_size: the
    gradient average FSDP2 / DDP take then equals the single process's gradient."""
    # target counts from the host-side rows: no device sync per micro-batch
    counts = [int((shard_rows(b["labels"], ranks.rank, ranks.world_size)[:, 1:] != D.IGNORE).sum()) for b in micro]
    n_step = float(all_reduce_sum(torch.tensor(sum(counts), dtype=torch.float64), ranks))
    loss_sum = torch.zeros((), dtype=torch.float32, device=ranks.device)
    for i, (b, n) in enumerate(zip(micro, counts)):
        last = i == len(micro) - 1
        sync = model.no_sync() if ranks.mode == "ddp" and not last else _null()
        with sync:
            # a share without target tokens still runs backward (collectives), with a zero loss
            loss = causal_lm_loss(model, share(b, ranks)).float() * (n / max(n_step, 1))
            (loss * ranks.world_size).backward()
        loss_sum += loss.detach()
    return all_reduce_sum(loss_sum, ranks)


class StopRequest:
    """SIGINT / SIGTERM under torchrun: set a flag instead of raising, so that the ranks can
    agree to stop at the same step (`agreed`, a collective). One process: does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ranks: Ranks):
        self.ranks, self.requested, self._saved = ranks, False, {}
        if ranks.active:
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank when any rank got a signal (call it at the same point on all)."""
        if not self.ranks.active:
            return False
        return bool(all_reduce_sum(torch.tensor([float(self.requested)]), self.ranks).item() > 0)

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class NoMetrics:
    """Metrics for ranks other than 0: writes nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ---- checkpoints --------------------------------------------------------------------------------
def gathered_adapter(model: nn.Module, ranks: Ranks) -> dict[str, torch.Tensor] | None:
    """Full LoRA tensors under PEFT keys on rank 0 (None elsewhere); collective under FSDP2."""
    out = {}
    for key, p in adapter_tensors(unwrap(model)).items():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        if ranks.main:
            out[key] = full.detach().cpu().contiguous()
    return out if ranks.main else None


def _broadcast(value, ranks: Ranks):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def save_adapter_gathered(model: nn.Module, directory: Path, ranks: Ranks, base_model_name_or_path=None) -> None:
    """Rank 0 writes the gathered adapter (PEFT format) atomically; every rank must call this."""
    tensors = gathered_adapter(model, ranks)
    if ranks.main:
        with atomic_directory(directory) as tmp:
            save_adapter(unwrap(model), tmp, base_model_name_or_path=base_model_name_or_path, tensors=tensors)
    _barrier()


def save_checkpoint(output: Path, model, optimizer, sched, state: dict, keep_last: int, ranks: Ranks) -> Path:
    """Adapter (rank 0), optimizer shard and RNG (each rank), trainer state; atomic; collective."""
    from .loop import checkpoints, rng_state

    target = output / "checkpoints" / f"step-{state['step']:07d}"
    tensors = gathered_adapter(model, ranks)

    def write_own(tmp: Path) -> None:
        if ranks.mode == "fsdp" or ranks.main:
            name = f"optimizer-rank{ranks.rank}.safetensors" if ranks.mode == "fsdp" else "optimizer.safetensors"
            flat, meta = state_dict_to_tensors(optimizer.state_dict())
            save_file(flat, str(tmp / name), metadata=meta)
        save_file(rng_state(ranks.device), str(tmp / f"rng-rank{ranks.rank}.safetensors"))

    if ranks.main:
        with atomic_directory(target) as tmp:
            _broadcast(str(tmp), ranks)
            write_own(tmp)
            _barrier()  # every rank has written its files
            save_adapter(unwrap(model), tmp, tensors=tensors)
            full = dict(state, scheduler=sched.state_dict(), world_size=ranks.world_size, distributed=ranks.mode)
            (tmp / "trainer_state.json").write_text(json.dumps(full, indent=2))
        for old in checkpoints(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    else:
        write_own(Path(_broadcast(None, ranks)))
        _barrier()
    _barrier()  # the directory is in place
    return target


def load_checkpoint(path: Path, model, optimizer, sched, ranks: Ranks) -> dict:
    """Inverse of save_checkpoint, on the same world size and mode (a clear error otherwise)."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved_world, saved_mode = state.pop("world_size", 1), state.pop("distributed", "none")
    if (saved_world, saved_mode) != (ranks.world_size, ranks.mode):
        raise ValueError(f"{path}: written by {saved_world} process(es) ({saved_mode}); this run has "
                         f"{ranks.world_size} ({ranks.mode}). Resume with the same torchrun --nproc-per-node/--nnodes "
                         "and --distributed, or start a new --output")
    _load_adapter_shards(path, model, ranks)
    name = f"optimizer-rank{ranks.rank}.safetensors" if ranks.mode == "fsdp" else "optimizer.safetensors"
    with safe_open(str(path / name), "pt") as f:
        meta = f.metadata()
    optimizer.load_state_dict(state_dict_from_tensors(load_file(str(path / name)), meta))
    sched.load_state_dict(state.pop("scheduler"))
    from .loop import set_rng_state

    set_rng_state(load_file(str(path / f"rng-rank{ranks.rank}.safetensors")), ranks.device)
    return state


@torch.no_grad()
def _load_adapter_shards(path: Path, model: nn.Module, ranks: Ranks) -> None:
    """Copy each rank's piece of the saved (full) adapter into its LoRA shards."""
    _, modules = read_adapter(path)
    for key, p in adapter_tensors(unwrap(model)).items():
        module, part = key[len(PREFIX):].rsplit(".lora_", 1)
        full = modules.get(module, {}).get(part[0])
        if full is None:
            raise ValueError(f"{path}: lacks tensor {key!r} that this model's LoRA layer needs")
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(full.shape)}, the model's is {tuple(p.shape)}")
        piece = shard_rows(full, ranks.rank, ranks.world_size) if hasattr(p, "to_local") else full
        local(p).copy_(piece)
