"""Training across processes and machines: torchrun ranks, FSDP2 or DDP, the data split, the
collectives. train() in loop.py runs the same code for every world size: with one process
(`Ranks()`, WORLD_SIZE unset or 1) the collectives here do nothing.

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
  micro-batches divided by the global count of target tokens (counted on the host: every
  rank builds the same global micro-batches; one all-reduce of the loss per step, on the device);
  each rank scales its loss by world_size because FSDP2 and DDP average gradients. Hence a
  run on N ranks follows the single-process run with the same flags (to float rounding).
- Checkpoints (checkpoint.py): the LoRA adapter is gathered (full tensors) and written by
  rank 0 in PEFT's format; each rank writes its optimizer shard and RNG state into rank 0's
  temporary directory; `--resume` requires the same world size and mode.
- Only rank 0 prints, shows progress bars, and writes metrics, config and summary; it prints
  the memory plan of one rank (qlora memory --world-size N, or 1 with DDP) and writes
  memory.json with the largest measured peak over the ranks (each rank's in rank_peak_bytes).
  Every rank runs the (small) eval set whole; the demo generations run only in one process.
- Dropout: the same seed on every rank for the initial LoRA weights, then rank r reseeds
  with seed + r so that ranks draw different dropout masks.
- Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) under torchrun: `StopRequest` turns
  the signal into a flag; at the start of every step the ranks agree on it (one all-reduce
  of a host flag; beside NCCL over a gloo group, so it never waits for the GPU's queue: gloo
  needs a TCP interface between the hosts, GLOO_SOCKET_IFNAME where there are several), so
  all of them stop at the same step and write one checkpoint together, then
  exit; --resume continues from it. torchrun kills its workers 30 s after passing the signal
  on, so a step must finish within that.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.loss import target_index
from ..model.packing import unpadded_on_host
from ..model.shard import load_sharded, shard_rows
from ..model.varlen import cu_seq_lens
from ..nn.lora import LoraConfig
from .config import ConfigError
from .config import compute_dtype as resolve_compute_dtype
from .config import device as resolve_device

MODES = ("fsdp", "ddp")


@dataclass
class Ranks:
    """Where this process stands: its rank, the world size, the mode and the device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none (one process), fsdp or ddp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this process trains
    mesh: object = None
    host_group: object = None  # a gloo group for host tensors beside NCCL (None: the default group)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg) -> Ranks:
    """Join torchrun's process group when WORLD_SIZE > 1; a single process gets Ranks() on --device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(device=resolve_device(cfg))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.distributed not in MODES:
        raise ConfigError(f"--distributed must be one of {', '.join(MODES)}, got {cfg.distributed!r}")
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global micro-batch and must be a multiple of the "
                         f"{world} ranks (each takes batch_size / world_size rows); pass e.g. "
                         f"--batch-size {world * max(1, cfg.batch_size // world)}")
    if "RANK" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is not set: launch several processes with torchrun "
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
    host_group = dist.new_group(backend="gloo") if backend == "nccl" else None  # flags agreed without the GPU
    return Ranks(rank, world, local_rank, cfg.distributed, device, mesh, host_group)


def peak_over_ranks(measured: dict[str, int], ranks: Ranks) -> dict[str, int]:
    """The `train.memory.measure` dict of the rank with the largest peak, plus `peak_rank` and every
    rank's peak in `rank_peak_bytes` (a collective: every rank calls it; one process: `measured`)."""
    if not ranks.active:
        return measured
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


def build_sharded(cfg, ranks: Ranks, model_path: str) -> nn.Module:
    """The training model sharded with FSDP2 per block, loaded shard by shard (model/shard.py)."""
    if cfg.quant_type == "none":
        raise ConfigError("--quant-type none (16-bit LoRA) is not sharded by FSDP2 here; use --distributed ddp")
    if cfg.use_dora:
        raise ConfigError("--use-dora initializes each magnitude from the whole base weight, which FSDP2's sharded "
                          "loading never holds: use --distributed ddp")
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


def share(batch: dict[str, torch.Tensor], ranks: Ranks, boundaries: bool = False) -> dict[str, torch.Tensor | int]:
    """This rank's contiguous rows of a global micro-batch, on its device (one process: all of them).
    To CUDA through pinned memory, without blocking the host (the copy is queued before the
    step's kernels on the same stream). With labels on the host, also `target_index` (the loss's
    target positions, model/loss.py), so the loss picks them without a device sync; with
    `boundaries` (a varlen model: model/varlen.py: uses_varlen) and rows on the host, packed or
    right-padded, also `cu_seq_lens` and `max_length` (an int); an attention mask of all ones is
    left out (model/packing.py: model_inputs)."""
    cuda = torch.device(ranks.device).type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        if cuda and t.device.type == "cpu":
            return t.pin_memory().to(ranks.device, non_blocking=True)
        return t.to(ranks.device)

    rows = {k: shard_rows(v, ranks.rank, ranks.world_size) for k, v in batch.items()}
    if "attention_mask" in rows and "position_ids" not in rows and unpadded_on_host(rows["attention_mask"]):
        del rows["attention_mask"]  # no padding: decided here, so the model never asks the device
    out = {k: move(v) for k, v in rows.items()}
    if "labels" in rows and rows["labels"].device.type == "cpu":
        out["target_index"] = move(target_index(rows["labels"]))
    mask, pos = rows.get("attention_mask"), rows.get("position_ids")
    if boundaries and rows["input_ids"].device.type == "cpu" and (pos is not None or mask is None
                                                                   or right_padded(mask)):
        cu, longest = cu_seq_lens(pos, tuple(rows["input_ids"].shape))
        out["cu_seq_lens"], out["max_length"] = move(cu), longest  # an int: nothing to read back
    return out


def right_padded(mask: torch.Tensor) -> bool:
    """True when every row of the host-side 2-D `mask` is its tokens, then its padding."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def all_reduce_sum(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """`t` summed over the ranks in place, where it is (one process: `t` itself): a device
    tensor on the device (no host read), a host tensor over the host group (the device's
    queue is not waited for)."""
    if not ranks.active:
        return t
    import torch.distributed as dist

    dist.all_reduce(t, group=ranks.host_group if t.device.type == "cpu" else None)
    return t


def broadcast(value, ranks: Ranks):
    """Rank 0's `value` on every rank (a picklable object; one process: `value`)."""
    if not ranks.active:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (one process: return)."""
    if ranks.active:
        import torch.distributed as dist

        dist.barrier()


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


class NoMetrics:
    """Metrics for ranks other than 0: writes nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass
