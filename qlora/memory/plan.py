"""The plan: a run's predicted peak memory, part by part, whether it fits a device, and the
cheapest changes that would make it fit (see the package docstring for what each part counts).

    plan = plan_memory("llama-65b", seq_len=512, batch_size=1, device_memory="48GB")
    print(plan.table()); plan.total_bytes; plan.fits; plan.suggestions

Tests: tests/memory/test_plan_memory.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..model.targets import matches, parse_targets
from ..optim.adamw import MIN_8BIT_SIZE
from ..optim.paging import DEFAULT_PAGE_BYTES
from ..quant.blockwise8 import BLOCK as STATE_BLOCK
from ..quant.tensor import NESTED_BLOCKSIZE
from .activations import activation_bytes
from .shape import MemoryPlanError, Shape, load_config, model_shape

PART_NAMES = ("weights_4bit", "quant_constants", "kept_16bit", "unquantized_params", "lora_params", "lora_grads",
              "optimizer_state", "activations", "decode_workspace", "runtime_overhead")
LABELS = {"weights_4bit": "4-bit weights", "quant_constants": "quantization constants",
          "kept_16bit": "linears kept 16-bit (--keep-16bit)",
          "unquantized_params": "unquantized params (embeddings, lm_head, norms, biases)",
          "lora_params": "LoRA parameters", "lora_grads": "LoRA gradients", "optimizer_state": "optimizer state",
          "activations": "activations (peak of backward)", "decode_workspace": "decode workspace",
          "runtime_overhead": "runtime overhead"}
OPTIMS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
METHODS = ("qlora", "lora16", "full16")
OBJECTIVES = ("sft", "dpo", "orpo")
"""What a run trains on: rows (sft), or pairs of rows (dpo, orpo: a chosen and a rejected
completion of each prompt, so a micro-batch of `batch_size` pairs holds 2 x batch_size rows)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

CUDA_CONTEXT_BYTES = 512 << 20
"""CUDA context, kernels and cuBLAS handle outside PyTorch's allocator: an estimate (nvidia-smi
minus torch.cuda.memory_reserved is typically 0.3-0.6 GiB on Ampere/Hopper with CUDA 12 lazy
module loading; not measured here, the build machine has no GPU)."""
CUBLAS_WORKSPACE_BYTES = 32 << 20
"""cuBLAS workspace PyTorch allocates per handle/stream on Hopper (:4096:8 + 32 MiB config)."""


def parse_bytes(value: int | str | None) -> int | None:
    """Bytes of "24GiB", "48GB", "512MiB", "1e9" or an int; None stays None."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(value))
    if not m:
        raise MemoryPlanError(f"device memory {value!r}: write e.g. 24GiB, 48GB, 80000MB or a number of bytes")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(float(m.group(1)) * scale[unit])


@dataclass
class MemoryPlan:
    """Predicted peak memory of a fine-tuning run, by part (bytes); see the module docstring."""

    parts: dict[str, int]
    total_bytes: int
    fits: bool | None
    device_memory: int | None
    paged_bytes: int
    suggestions: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "fits": self.fits, "parts": dict(self.parts),
                "device_memory": self.device_memory, "paged_bytes": self.paged_bytes,
                "suggestions": list(self.suggestions), "settings": dict(self.settings), "details": dict(self.details)}

    def table(self) -> str:
        st = self.settings
        head = (f"memory plan: {st['model']} ({st['method']}, {st['quant_type'] if st['method'] == 'qlora' else '16-bit'}"
                f"{' + DQ' if st['method'] == 'qlora' and st['double_quant'] else ''}"
                f"{', ' + st['objective'].upper() if st.get('objective', 'sft') != 'sft' else ''}), seq {st['seq_len']} x "
                f"batch {st['batch_size']}{' pairs' if st.get('objective', 'sft') != 'sft' else ''}, r={st['rank']}, {st['optim']}, checkpointing "
                f"{('on, keeping attention' if st.get('keep_attention') else 'on') if st['gradient_checkpointing'] else 'off'}"
                f", {st['compute_dtype']} on {st['device']}"
                + (f", world size {st['world_size']}" if st["world_size"] > 1 else ""))
        lines = [head, f"  {'part':<56} {'MiB':>12} {'GB':>9}"]
        full = st["method"] == "full16"
        for k, v in self.parts.items():
            if k == "kept_16bit" and not v:
                continue
            label = LABELS[k]
            if st["method"] != "qlora" and k == "unquantized_params":
                label = "16-bit weights (all), norms fp32"
            if full and k == "lora_grads":
                label = "gradients (all weights, 16-bit)"
            if k == "optimizer_state" and self.paged_bytes:
                label += f" (+{self.paged_bytes / 2**20:,.0f} MiB paged on host)"
            lines.append(f"  {label:<56} {v / 2**20:>12,.1f} {v / 1e9:>9.3f}")
        lines.append(f"  {'total (predicted peak)':<56} {self.total_bytes / 2**20:>12,.1f} {self.total_bytes / 1e9:>9.3f}")
        d = self.details
        dq = (f"{'without' if st['double_quant'] else 'with'} double quantization the constants would be "
              f"{d['quant_constants_other_dq'] / 2**20:,.1f} MiB; " if st["method"] == "qlora" else "")
        lines.append(f"  ({d['trainable_params']:,} trainable of {d['total_params']:,} parameters; {dq}activations "
                     f"{'without' if st['gradient_checkpointing'] else 'with'} checkpointing "
                     f"{d['activations_other_checkpointing'] / 2**20:,.1f} MiB)")
        lines.append(f"  measured peak convention: {d['measured_as']}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.device_memory / 2**30:,.1f} GiB ({self.device_memory / 1e9:,.1f} GB)")
            for s in self.suggestions:
                lines.append(f"    - {s}")
        return "\n".join(lines)


def plan_memory(model: Any, *, seq_len: int = 512, batch_size: int = 1, rank: int = 64,
                target_modules: str | list[str] = "all-linear", optim: str = "paged_adamw",
                gradient_checkpointing: bool = True, keep_attention: bool = False, quant_type: str = "nf4",
                double_quant: bool = True,
                blocksize: int = 64, compute_dtype: str = "bfloat16", method: str = "qlora", world_size: int = 1,
                device_memory: int | str | None = None, device: str = "cuda", lora_dropout: float = 0.05,
                padded: bool | None = None, target_tokens: int | None = None, packed: bool = False,
                keep_16bit: tuple[str, ...] = (), objective: str = "sft", use_dora: bool = False,
                attention: str = "sdpa", _suggest: bool = True) -> MemoryPlan:
    """Predict the peak memory of fine-tuning `model` (a config; see the module docstring).

    Extra keywords beyond the shared contract: `device` ("cuda": the question "does it fit my
    card"; "cpu": what this trainer measures here), `lora_dropout` (recorded; the seeded
    dropout keeps no mask), `padded` (rows padded to a common length, so SDPA gets a mask;
    default: batch_size > 1), `target_tokens` (labelled tokens per micro-batch, which go
    through the fused head; default: all but the first of each row), `packed` (rows of packed
    documents kept apart, train/data.py pack: SDPA gets their block mask, and RoPE tables are
    per row), `keep_16bit` (linear names, full or their last parts, stored 16-bit in a qlora
    run; their extra bytes are in details["kept_16bit"]), `objective` (sft, dpo, orpo: a
    micro-batch of `batch_size` pairs is 2 x batch_size rows of `seq_len`; DPO's reference pass
    runs without gradients before the policy's forward, its activations freed before the peak
    of backward, so it adds nothing at the peak), `use_dora` (DoRA layers: a magnitude [out] per
    adapted linear, trained; each saves its output for the magnitude's gradient), `attention`
    (sdpa; eager: transformers' matmul-softmax-matmul, which saves the [b, heads, t, t]
    probabilities; varlen: torch's varlen kernels, no mask and no repeated k/v saved).
    """
    settings = dict(model=str(model) if not isinstance(model, dict) else model.get("_name_or_path", "config"),
                    seq_len=seq_len, batch_size=batch_size, rank=rank, target_modules=target_modules, optim=optim,
                    gradient_checkpointing=gradient_checkpointing, keep_attention=keep_attention,
                    quant_type=quant_type, double_quant=double_quant,
                    blocksize=blocksize, compute_dtype=compute_dtype, method=method, world_size=world_size,
                    device=device, lora_dropout=lora_dropout, padded=padded, target_tokens=target_tokens,
                    keep_16bit=list(keep_16bit), packed=packed, objective=objective, use_dora=use_dora,
                    attention=attention)
    _check(settings)
    rows = batch_size * (2 if objective in ("dpo", "orpo") else 1)  # pairs: chosen and rejected rows
    if hasattr(model, "to_dict") and not isinstance(model, dict):
        settings["model"] = getattr(model, "_name_or_path", "") or type(model).__name__
    shape = model_shape(load_config(model))
    e = DTYPE_BYTES[compute_dtype]
    cuda = device == "cuda"
    masked = packed or (rows > 1 if padded is None else padded)
    store = 4 if compute_dtype == "float32" else 2  # unquantized tensors (load_model)
    parts = dict.fromkeys(PART_NAMES, 0)
    details: dict[str, Any] = {}

    # ---- parameters ----
    lora_on: dict[str, bool] = {}
    kept: dict[str, int] = {}
    linear_params = lora_count = lora_state = biases = 0
    absmax_fp32 = absmax_dq = 0
    largest = 0
    selector = parse_targets(target_modules)  # as --target-modules reads it (TrainConfig.targets)
    for layer in range(shape.layers):
        for suffix, fan_in, fan_out, bias in shape.linears():
            name = shape.layer_prefix(layer) + suffix
            numel = fan_in * fan_out
            linear_params += numel
            biases += fan_out if bias else 0
            largest = max(largest, numel)
            if method == "qlora" and any(name == k or name.endswith("." + k) for k in keep_16bit):
                parts["kept_16bit"] += store * numel
                kept[name] = store * numel
            else:
                blocks = -(-numel // blocksize)
                absmax_fp32 += 4 * blocks + 16 * 4  # float32 absmax + the 16-entry code book
                absmax_dq += blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 16 * 4 + 256 * 4
                parts["weights_4bit"] += -(-numel // 2)
            if method != "full16" and matches(name, selector):
                lora_on[suffix] = True
                for numel_ad in (rank * fan_in, fan_out * rank) + ((fan_out,) if use_dora else ()):
                    lora_count += numel_ad
                    lora_state += _adam_state_bytes(numel_ad, optim)
    if method != "full16" and not lora_count:
        raise MemoryPlanError(f"target_modules={target_modules!r} selects no linear layer of this {shape.family} "
                              f"model; its layers are {[x[0] for x in shape.linears()]}")
    embed = shape.vocab * shape.hidden + shape.positions * shape.hidden
    head = 0 if shape.tied else shape.vocab * shape.hidden
    norms = shape.norm_elements()
    total_params = linear_params + biases + embed + head + norms
    details.update(total_params=total_params, linear_params=linear_params, embedding_params=embed,
                   lm_head_params=head, norm_params=norms, bias_params=biases,
                   quant_constants_other_dq=absmax_fp32 if double_quant else absmax_dq, kept_16bit=kept)

    if method == "qlora":
        parts["quant_constants"] = absmax_dq if double_quant else absmax_fp32
        parts["unquantized_params"] = store * (embed + head + biases) + 4 * norms
        parts["decode_workspace"] = largest * e * (2 if device == "cpu" and e == 2 and _cpu_transposed() else 1)
    else:  # 16-bit base: every weight in the 16-bit compute dtype (fp32 only if asked)
        parts["weights_4bit"] = 0
        parts["unquantized_params"] = store * (linear_params + embed + head + biases) + 4 * norms
    if method == "full16":
        trainable = total_params
        parts["lora_params"] = 0
        parts["lora_grads"] = store * total_params  # gradients in the weights' dtype
        state = sum(_adam_state_bytes(n, optim) for n in _param_sizes(shape))
    else:
        trainable = lora_count
        parts["lora_params"] = parts["lora_grads"] = 4 * lora_count
        state = lora_state
    details["trainable_params"] = trainable

    # ---- optimizer state: resident, or paged through two staging pages ----
    paged = 0
    state = -(-state // world_size)  # FSDP: each rank holds the state of its shards
    if optim.startswith("paged") and cuda:  # the two staging pages are per rank
        resident = min(state, 2 * DEFAULT_PAGE_BYTES)
        paged, state = state - resident, resident
    parts["optimizer_state"] = state

    # ---- activations ----
    lora = {k: True for k in lora_on} if method != "full16" else {x[0]: True for x in shape.linears()}
    # full16: a dense Linear saves its input for the weight gradient, like a LoRA's A (rank 0: no xa)
    kw = dict(seq_len=seq_len, batch_size=rows, rank=rank if method != "full16" else 0, lora=lora, e=e,
              masked=masked, targets=target_tokens, packed=packed, dora=use_dora and method != "full16", device=device,
              attention=attention)
    act = activation_bytes(shape, checkpointing=gradient_checkpointing, keep_attention=keep_attention, **kw)
    other = activation_bytes(shape, checkpointing=not gradient_checkpointing, **kw)
    parts["activations"] = act["peak"]
    details.update(activations_per_layer=act["per_layer"], activations_saved=act["saved"],
                   activations_at_head=act["at_head"],
                   activations_in_layer=act["in_layer"], activations_other_checkpointing=other["peak"])

    # ---- runtime ----
    if cuda:
        parts["runtime_overhead"] = CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES
        details["measured_as"] = ("CUDA: growth of torch.cuda.max_memory_allocated() + the memory outside "
                                  "PyTorch's allocator at the end (context; total - free - reserved); the card "
                                  "also holds the allocator's cached-but-free blocks")
    else:
        # input_ids, labels, attention_mask (int64) of the micro-batches the loop holds at once
        parts["runtime_overhead"] = (3 + (objective != "sft")) * 8 * rows * seq_len  # + the pairs' prompt_mask
        details["measured_as"] = ("CPU: the peak of live tensor bytes from the load on, as torch's allocator "
                                  "reports them (qlora/train/live_bytes.py, train/memory.py measure)")

    # ---- FSDP: parameters, gradients and state are sharded over the ranks ----
    if world_size > 1:
        layer_bytes = sum(parts[k] for k in ("weights_4bit", "quant_constants", "lora_params")) // shape.layers
        for k in ("weights_4bit", "quant_constants", "unquantized_params", "lora_params", "lora_grads"):
            parts[k] = -(-parts[k] // world_size)
        # each rank all-gathers one decoder layer's shards for compute and prefetches the next
        # (FSDP2's default): two unsharded layers beside the shards (estimate: per-layer average)
        gathered = 2 * layer_bytes * (world_size - 1) // world_size
        # the root (embeddings, head) is gathered once and stays unsharded through forward and
        # backward; its all-gather holds a copy-in shard and a whole output buffer beside the
        # unsharded tensors while it copies out (counted too, though it ends before backward)
        root = store * (embed + head)
        gathered += root * (world_size - 1) // world_size + root + -(-root // world_size)
        parts["runtime_overhead"] += gathered
        details["fsdp_all_gather_bytes"] = gathered
    total = sum(parts.values())
    limit = parse_bytes(device_memory)
    plan = MemoryPlan(parts, total, None if limit is None else total <= limit, limit, paged, [], settings, details)
    if limit is not None and not plan.fits and _suggest:
        plan.suggestions = _suggestions(model, settings, limit)
    return plan


def keep_budget(model: Any, budget: int | str | None, **settings: Any) -> int:
    """Bytes a --keep-16bit auto choice may add: `budget` minus the plan of `model` with every
    linear in 4 bits (plan_memory's defaults, overridden by `settings`)."""
    limit = parse_bytes(budget)
    if limit is None:
        raise MemoryPlanError("--keep-16bit auto needs --memory-budget SIZE (e.g. 24GiB): the layers it keeps "
                              "fill the room between the plan and that budget")
    return max(0, limit - plan_memory(model, _suggest=False, **settings).total_bytes)


def _check(st: dict) -> None:
    checks = [
        (st["method"] in METHODS, f"method must be one of {METHODS}"),
        (st["objective"] in OBJECTIVES, f"objective must be one of {OBJECTIVES}"),
        (st["quant_type"] in ("nf4", "fp4", "int4"), "quant_type must be nf4, fp4 or int4"),
        (st["optim"] in OPTIMS, f"optim must be one of {OPTIMS}"),
        (st["compute_dtype"] in DTYPE_BYTES, f"compute_dtype must be one of {tuple(DTYPE_BYTES)}"),
        (st["device"] in ("cuda", "cpu"), "device must be cuda or cpu"),
        (st["seq_len"] >= 1 and st["batch_size"] >= 1 and st["rank"] >= 1, "seq_len, batch_size and rank must be >= 1"),
        (st["world_size"] >= 1, "world_size must be >= 1"),
        (st["blocksize"] >= 16, "blocksize must be >= 16"),
        (st["attention"] in ("sdpa", "eager", "varlen"), "attention must be sdpa, eager or varlen"),
        (not (st["keep_attention"] and st["attention"] != "sdpa"),
         f"keep_attention keeps what SDPA's kernels return: it needs attention sdpa, not {st['attention']}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise MemoryPlanError(msg)


def _cpu_transposed() -> bool:
    import torch

    from ..nn.linear4bit import transposed_backward

    return transposed_backward(torch.device("cpu"), torch.bfloat16)


def _adam_state_bytes(numel: int, optim: str) -> int:
    """AdamW m + v of one parameter (qlora/optim/adamw.py)."""
    if optim.endswith("8bit") and numel >= MIN_8BIT_SIZE:
        return 2 * numel + 2 * 4 * -(-numel // STATE_BLOCK)
    return 8 * numel


def _param_sizes(s: Shape) -> list[int]:
    sizes = [fi * fo for _, fi, fo, _ in s.linears()] * s.layers
    sizes += [fo for _, _, fo, b in s.linears() if b] * s.layers
    sizes += [s.vocab * s.hidden] + ([s.vocab * s.hidden] if not s.tied else [])
    if s.positions:
        sizes.append(s.positions * s.hidden)
    return sizes + [s.hidden] * (s.norm_elements() // s.hidden)


def _suggestions(model: Any, st: dict, limit: int) -> list[str]:
    """The cheapest single changes (then pairs) that make the plan fit, with the total each gives."""
    base = {k: st[k] for k in ("seq_len", "batch_size", "rank", "target_modules", "optim", "gradient_checkpointing",
                               "keep_attention", "quant_type", "double_quant", "blocksize", "compute_dtype", "method",
                               "world_size", "device", "lora_dropout", "padded", "target_tokens",
                               "packed", "keep_16bit", "objective", "use_dora", "attention")}
    changes: list[tuple[str, dict]] = []
    if st["attention"] == "eager":
        changes.append(("--attn-implementation sdpa", {"attention": "sdpa"}))
    if not st["gradient_checkpointing"]:
        changes.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    elif st["keep_attention"]:
        changes.append(("without --keep-attention", {"keep_attention": False}))
    if st["method"] == "qlora" and not st["double_quant"]:
        changes.append(("--double-quant", {"double_quant": True}))
    if not st["optim"].startswith("paged") and st["device"] == "cuda":
        changes.append((f"--optim paged_{st['optim']}", {"optim": "paged_" + st["optim"]}))
    if not st["optim"].endswith("8bit"):
        changes.append((f"--optim {st['optim']}8bit", {"optim": st["optim"] + "8bit"}))
    if st["method"] != "qlora":
        changes.append(("--method qlora", {"method": "qlora"}))
    b = st["batch_size"]
    while b > 1:
        b //= 2
        changes.append((f"--batch-size {b} (raise grad_accum to keep the effective batch)", {"batch_size": b}))
    s = st["seq_len"]
    while s > 128:
        s //= 2
        changes.append((f"--seq-len {s}", {"seq_len": s}))
    r = st["rank"]
    while r > 8:
        r //= 2
        changes.append((f"--rank {r}", {"rank": r}))
    found: list[tuple[int, str]] = []
    for label, delta in changes:
        total = plan_memory(model, **{**base, **delta}, _suggest=False).total_bytes
        if total <= limit:
            found.append((total, label))
    if not found:  # pairs of the quality-neutral changes
        neutral = [c for c in changes if "seq-len" not in c[0] and "rank" not in c[0]]
        for i, (l1, d1) in enumerate(neutral):
            for l2, d2 in neutral[i + 1:]:
                total = plan_memory(model, **{**base, **d1, **d2}, _suggest=False).total_bytes
                if total <= limit:
                    found.append((total, f"{l1} and {l2}"))
    if not found:
        return ["no single or paired change fits: use a bigger device, --world-size N (FSDP), or a smaller model"]
    # cheapest first: changes that keep the model's quality (checkpointing, paging, 8-bit, DQ) before
    # ones that change the training (batch, sequence, rank); within each, the largest total that fits
    def cost(item: tuple[int, str]) -> tuple[int, int]:
        label = item[1]
        return (1 if any(w in label for w in ("--seq-len", "--rank", "--batch-size")) else 0, -item[0])
    seen, out = set(), []
    for total, label in sorted(found, key=cost):
        key = label.split(" ")[0] + label.split(" ")[-1]
        if label.startswith(("--seq-len", "--rank", "--batch-size")):
            key = label.split(" ")[0]
        if key in seen:
            continue
        seen.add(key)
        out.append(f"{label}: {total / 2**30:,.2f} GiB")
    return out[:5]
