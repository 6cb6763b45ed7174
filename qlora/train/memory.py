"""The trainer's side of the memory plan: plan a run before it starts, measure its peak after,
write <output>/memory.json (+ memory.png) with both.

    plan = plan_run(cfg, model_path, rows)        # printed; None when the config cannot be planned
    baseline = start_measure(model_path, device=device)
    ...                                           # the run (baseline.before_step(tokens) per step)
    write_run_memory(output, plan, measure(baseline))

CUDA: the allocator's peak growth + the memory outside it (context, cuBLAS). CPU: the peak of
live tensor bytes (live_bytes.py), what the plan counts, with the resident set's peak beside it
(peak.py) and what it holds beyond the tensors. Tests: tests/train/test_loop.py,
tests/train/test_distributed.py (memory.json); benchmarks/memory.py (plan vs measured).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..memory import LABELS, MemoryPlan, MemoryPlanError, plan_memory
from ..model.attention import plan_note, planned_attention
from ..model.loss import IGNORE
from .config import compute_dtype as resolve_compute_dtype
from .config import device as resolve_device
from .live_bytes import LiveTensorPeak

if TYPE_CHECKING:
    import torch


def plan_for_run(cfg, model_path: str, compute_dtype, seq_len: int | None = None,
                 target_tokens: int | None = None, world_size: int = 1) -> MemoryPlan:
    """The plan of one process of a TrainConfig run on this machine (device, compute dtype
    resolved); rows of `seq_len` tokens (default cfg.max_length), `target_tokens` labelled per
    micro-batch. Under torchrun (`world_size` > 1) each rank takes batch_size / world_size rows,
    and FSDP (not DDP) shards the parameters and the optimizer state."""
    device = "cuda" if resolve_device(cfg).type == "cuda" else "cpu"
    optim = {"paged_adamw_32bit": "paged_adamw", "paged_adamw_8bit": "paged_adamw8bit", "adamw_32bit": "adamw",
             "adamw_8bit": "adamw8bit"}[cfg.optim]
    method = "lora16" if cfg.quant_type == "none" else "qlora"
    sharded = world_size if getattr(cfg, "distributed", "fsdp") == "fsdp" else 1
    objective = getattr(cfg, "method", "sft")  # dpo, orpo: pairs of rows
    return plan_memory(model_path, seq_len=seq_len or cfg.max_length, batch_size=cfg.batch_size // world_size,
                       objective=objective, use_dora=getattr(cfg, "use_dora", False),
                       rank=cfg.lora_r, world_size=sharded,
                       target_modules=cfg.target_modules, optim=optim,
                       gradient_checkpointing=cfg.gradient_checkpointing, keep_attention=cfg.keep_attention,
                       quant_type="nf4" if method == "lora16" else cfg.quant_type, double_quant=cfg.double_quant,
                       blocksize=cfg.blocksize, compute_dtype=str(compute_dtype).replace("torch.", ""), method=method,
                       device=device, lora_dropout=cfg.lora_dropout,
                       padded=not cfg.packing and cfg.batch_size // world_size * (1 + (objective != "sft")) > 1,
                       packed=cfg.packing, target_tokens=target_tokens, keep_16bit=kept_names(cfg),
                       attention=planned_attention(getattr(cfg, "attn_implementation", "auto")))


def kept_names(cfg) -> tuple[str, ...]:
    """The linears --keep-16bit names (none for auto, whose choice is made while loading)."""
    keep = getattr(cfg, "keep_16bit", None)
    return () if keep in (None, "auto") else tuple(k.strip() for k in keep.split(",") if k.strip())


@dataclass
class Baseline:
    """Where a run's peak is measured from (start_measure) and the live-tensor counter (CPU)."""
    device: str  # "cpu", "cuda:N"
    allocated: int = 0  # CUDA: bytes allocated at the start
    rss: int = 0  # CPU: resident set at the start (VmHWM is reset to it)
    file_rss: int = 0  # CPU: file-backed resident pages at the start (code)
    live: LiveTensorPeak | None = None
    steps: int = 0  # training steps begun
    largest: int = 0  # the largest micro-batch (tokens, padding included) of a counted step

    def before_step(self, tokens: int) -> None:
        """Count live tensors in this step if it is one of the first COUNTED_STEPS (the optimizer
        state appears in the first) or its largest micro-batch (`tokens`, padding included) is
        larger than any counted one; else pause the counter: steady-state steps free what they
        allocate."""
        self.steps += 1
        if self.live is None:
            return
        if self.steps <= COUNTED_STEPS or tokens > self.largest:
            self.largest = max(self.largest, tokens)
            self.live.flush()
            self.live.resume()
        else:
            self.live.pause()


COUNTED_STEPS = 3


def start_measure(model_path: str | None = None, release_host_memory: bool = False,
                  device: torch.device | str = "cpu") -> Baseline:
    """Import what a run imports lazily (the model's modeling module, the native kernels), then
    reset the peak of the run's `device`: CUDA's allocator peak; on CPU the kernel's resident
    high-water mark, and the live-tensor counter starts (live_bytes.py).

    With `release_host_memory` (CPU) glibc returns freed tensors to the kernel at once
    (peak.return_freed_memory): the resident peak comes closer to the live-tensor peak."""
    import torch

    if model_path is not None:
        try:
            from transformers import AutoConfig
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            from ..model.checkpoint_files import resolve

            MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(resolve(model_path)))]
        except Exception:  # the loader will raise the real error
            pass
    try:  # the native CPU kernels: a shared library, code like any import
        from ..kernels import cpu as cpu_kernels

        cpu_kernels.load()
    except Exception:
        pass
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return Baseline(str(device), allocated=torch.cuda.memory_allocated(device))
    baseline = Baseline(device.type, live=LiveTensorPeak().start())
    try:
        from .peak import file_bytes, reset_peak, return_freed_memory

        if release_host_memory:
            return_freed_memory()
        baseline.rss, baseline.file_rss = reset_peak(), file_bytes()
    except OSError:  # not Linux
        pass
    return baseline


def measure(baseline: Baseline) -> dict[str, int]:
    """The peak of a run over `baseline` (from start_measure), in bytes.

    CUDA: max_memory_allocated growth + the device memory outside PyTorch's allocator (the
    context, cuBLAS; other processes on the card count too). CPU: the peak of live tensor
    bytes (what the plan counts), and beside it the resident set's: VmHWM growth, of which
    `code_pages_bytes` are code of torch/MKL/qlora first run meanwhile (file-backed pages) and
    `outside_tensors_bytes` the rest above the live tensors (glibc's free-but-kept heap, the
    oneDNN primitive cache, Python objects, thread stacks)."""
    import torch

    if baseline.device.startswith("cuda"):  # + what the device holds outside PyTorch's allocator (context, cuBLAS)
        device = torch.device(baseline.device)
        free, total = torch.cuda.mem_get_info(device)
        context = max(0, total - free - torch.cuda.memory_reserved(device))
        allocated = torch.cuda.max_memory_allocated(device) - baseline.allocated
        return {"measured_peak_bytes": allocated + context, "max_allocated_bytes": allocated,
                "context_bytes": context, "max_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    live = baseline.live.stop() if baseline.live is not None and baseline.live.active else None
    out: dict[str, int] = {}
    try:
        from .peak import file_bytes, peak_bytes

        grown, code = peak_bytes() - baseline.rss, max(0, file_bytes() - baseline.file_rss)
        out = {"resident_peak_bytes": grown, "code_pages_bytes": code}
    except OSError:  # not Linux
        pass
    if live is None:  # another profiler ran: the resident figure is all there is
        return {"measured_peak_bytes": out.get("resident_peak_bytes", 0) - out.get("code_pages_bytes", 0), **out}
    if out:
        out["outside_tensors_bytes"] = max(0, out["resident_peak_bytes"] - out["code_pages_bytes"] - live)
    return {"measured_peak_bytes": live, "live_tensor_peak_bytes": live, **out}


def write_run_memory(output: Path, plan: MemoryPlan | None, measured: dict[str, int]) -> dict:
    """<output>/memory.json (+ memory.png when matplotlib is installed); prints the comparison."""
    peak = measured["measured_peak_bytes"]
    if plan is None:
        record = {"predicted_peak_bytes": None, **measured}
        (output / "memory.json").write_text(json.dumps(record, indent=2))
        print(f"memory: measured peak {peak / 2**20:,.1f} MiB; {output / 'memory.json'}")
        return record
    record = {"predicted_peak_bytes": plan.total_bytes, **measured,
              "ratio": peak / plan.total_bytes if plan.total_bytes else None, "parts": plan.parts,
              "measured_as": plan.details["measured_as"], "settings": plan.settings}
    tmp = output / "memory.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(output / "memory.json")
    drawn = plot_breakdown(plan, output / "memory.png", peak)
    what = " (live tensors)" if "live_tensor_peak_bytes" in measured else ""
    print(f"memory: predicted peak {plan.total_bytes / 2**20:,.1f} MiB, measured{what} {peak / 2**20:,.1f} MiB "
          f"(ratio {record['ratio']:.3f}); {output / 'memory.json'}"
          + ("" if drawn else " (memory.png skipped: matplotlib is not installed)"))
    if "outside_tensors_bytes" in measured:
        mib = {k: measured[k] / 2**20 for k in ("resident_peak_bytes", "code_pages_bytes", "outside_tensors_bytes")}
        print(f"  resident set peak +{mib['resident_peak_bytes']:,.1f} MiB = live tensors + code first run "
              f"{mib['code_pages_bytes']:,.1f} + outside tensors {mib['outside_tensors_bytes']:,.1f} ({OUTSIDE})")
    return record


OUTSIDE = ("glibc's freed-but-kept heap (--release-host-memory returns it), oneDNN's GEMM primitive cache per "
           "batch shape, Python objects")
"""What a CPU process holds beyond its live tensors, which the plan does not count."""


def plot_breakdown(plan: MemoryPlan, path: Path, measured: int | None = None) -> bool:
    """A horizontal bar chart of the parts (and the measured peak); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [k for k, v in plan.parts.items() if v > 0]
    values = [plan.parts[k] / 2**20 for k in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), [LABELS[k].split(" (")[0] for k in names])
    ax.invert_yaxis()
    title = f"predicted peak {plan.total_bytes / 2**20:,.0f} MiB"
    if measured is not None:
        title += f", measured {measured / 2**20:,.0f} MiB"
    ax.set(xlabel="MiB", title=title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plan_run(cfg, model_path: str, rows: list | None = None, world_size: int = 1) -> MemoryPlan | None:
    """plan_for_run for the longest of the tokenized `rows` (the batch that holds it peaks) and
    the most target tokens a micro-batch of them can hold, printed; None (with a note) when the
    config cannot be planned."""
    import warnings

    with warnings.catch_warnings():  # the trainer warns about emulated bf16 itself
        warnings.simplefilter("ignore")
        compute_dtype = resolve_compute_dtype(cfg)
    longest = max((len(r.input_ids) for r in rows or []), default=0) or cfg.max_length
    multiple = getattr(cfg, "pad_to_multiple", 1)
    seq_len = -(-min(longest, cfg.max_length) // multiple) * multiple  # as data.collate pads it
    # the head's rows: no batch holds more targets than the rows with the most (after the shift);
    # a preference pair (train/preference.py Pair): both completions, and the prompt for ORPO's NLL
    per_row = sorted((sum(1 for t in r.labels[1:] if t != IGNORE) if hasattr(r, "labels") else
                      len(r.chosen) + len(r.rejected) + (len(r.prompt) - 1) * (getattr(cfg, "method", "sft") == "orpo" and cfg.train_on_prompt)
                      for r in rows or []), reverse=True)
    targets = sum(per_row[: max(1, cfg.batch_size // world_size)]) if per_row else None
    try:
        plan = plan_for_run(cfg, model_path, compute_dtype, seq_len, target_tokens=targets, world_size=world_size)
    except (MemoryPlanError, OSError, KeyError, ValueError) as e:
        print(f"memory: no plan for this model ({e}); memory.json will hold only the measured peak")
        return None
    print(plan.table())
    if note := plan_note(getattr(cfg, "attn_implementation", "auto")):
        print(note)
    return plan
