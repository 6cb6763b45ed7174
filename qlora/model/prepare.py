"""prepare_model: turn a transformers causal LM into a QLoRA model, in place.

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = qlora.prepare_model(model, lora=qlora.LoraConfig(r=64, alpha=16, dropout=0.05))
    print(model.qlora_report)        # trainable parameters and the memory of each part

What it does, in order (formats.md section 7, the QLoRA recipe):
1. freezes every parameter;
2. swaps each linear layer selected by `quant_modules` ("all-linear": every nn.Linear and
   transformers Conv1D except the output head) for a Linear4bit, one layer at a time, so
   the peak is the model plus one layer; the 16-bit weight is dropped as soon as it is
   quantized. `quant_type=None` keeps the base in 16 bits (plain LoRA, the baseline);
3. keeps norms in fp32: their parameters are stored in fp32 and they compute in fp32, but
   return their input's dtype, so the residual stream stays in the model's dtype and the
   model runs with or without autocast (Llama-style RMSNorms as qlora's RMSNorm, one fused
   kernel, nn/rms_norm.py). Embeddings and lm_head stay as they are (frozen,
   not upcast: PEFT's fp32 copies cost memory for nothing). Attention modules whose rotary
   embedding is Llama's run it as one kernel a direction (nn/rotary.py: the same values);
4. wraps each layer selected by `lora.target_modules` in a LoraLinear, or a DoraLinear with
   `lora.use_dora` (the only trainable parameters); each decoder layer's adapters draw
   their dropout seeds together (`share_seeds`);
5. enables gradient checkpointing (reentrant: the same gradients as the non-reentrant form,
   fewer host hooks) and input gradients, and turns off the generation cache (which
   checkpointing cannot use). With `keep_attention` the checkpoints are selective (and
   non-reentrant): each layer also keeps its attention kernel's output and
   logsumexp ([tokens, hidden] more per layer), so the recompute skips attention.
Works on any architecture built of nn.Linear / Conv1D layers; tested on tiny Llama,
Qwen2, Mistral, Gemma, Phi-3 (fused qkv_proj / gate_up_proj) and GPT-2 (Conv1D) in
tests/model/test_prepare.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..errors import InputError
from ..nn.dora import DoraLinear
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraConfig, LoraLinear, share_seeds
from ..nn.rms_norm import RMSNorm, is_llama_style
from ..nn.rotary import use_fused_rotary
from .targets import is_linear, is_norm, matches, output_head

DEFAULT_LORA = LoraConfig(r=64, alpha=16, dropout=0.05, target_modules="all-linear")


# ---- choosing layers ------------------------------------------------------------------------
def select_modules(model: nn.Module, target_modules: str | list[str] | tuple[str, ...] = "all-linear",
                   exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Full names of the linear layers (nn.Linear, Conv1D, Linear4bit) that `target_modules`
    selects, never the output head; a list names modules by suffix, a string is
    "all-linear" or a regex over full names. Raises if the selector matches nothing."""
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(f"target_modules must be 'all-linear', a list of names or a regex, got {target_modules!r}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as e:
            raise InputError(f"target_modules={target_modules!r} is neither 'all-linear', a list nor a valid regex: {e}") from None
    head = output_head(model)
    inside_lora = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraLinear)}
    linears = [name for name, m in model.named_modules()
               if (is_linear(m) or isinstance(m, Linear4bit)) and m is not head and id(m) not in inside_lora]
    if not isinstance(target_modules, str):
        unmatched = [t for t in target_modules if not any(matches(n, [t]) for n in linears)]
        if unmatched:
            raise InputError(f"target_modules {unmatched} match no linear layer of {type(model).__name__}; "
                             f"its linear layers are e.g. {linears[:6]}")
    chosen = [n for n in linears if matches(n, target_modules) and not (exclude and matches(n, list(exclude)))]
    if not chosen:
        raise InputError(f"target_modules={target_modules!r} selects no linear layer of {type(model).__name__}; "
                         f"its linear layers are e.g. {linears[:6]}")
    return chosen


# ---- norms in fp32 ----------------------------------------------------------------------------
def _norm_pre_hook(module: nn.Module, args: tuple):
    x = args[0] if args else None
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dtype == torch.float32:
        return None
    module.__dict__["_qlora_io_dtype"] = x.dtype
    return (x.float(), *args[1:])


def _norm_post_hook(module: nn.Module, args: tuple, output):
    dtype = module.__dict__.pop("_qlora_io_dtype", None)
    return output.to(dtype) if dtype is not None and torch.is_tensor(output) else None


def keep_norms_fp32(model: nn.Module) -> int:
    """Store and compute every norm in fp32, returning its input's dtype; returns the count.
    Llama-style RMSNorms become qlora's RMSNorm (nn/rms_norm.py: the same bits, one fused
    kernel); other norms get fp32 weights and hooks that cast their input and output."""
    count = 0
    for name, m in list(model.named_modules()):
        if is_llama_style(m):
            m = RMSNorm.from_module(m)
            model.set_submodule(name, m)
        if isinstance(m, RMSNorm):
            count += 1
            continue
        if not is_norm(m) or is_linear(m):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                m._parameters[pname] = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
        if not getattr(m, "_qlora_fp32_hooks", False):
            m.register_forward_pre_hook(_norm_pre_hook)
            m.register_forward_hook(_norm_post_hook)
            m._qlora_fp32_hooks = True
        count += 1
    return count


# ---- the entry point --------------------------------------------------------------------------
def prepare_model(
    model: nn.Module,
    lora: LoraConfig | None = DEFAULT_LORA,
    quant_type: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = True,
    checkpoint_every: int = 1,
    keep_attention: bool = False,
    blocksize: int = 64,
    quant_modules: str | list[str] = "all-linear",
    verbose: bool = True,
) -> nn.Module:
    """Quantize, freeze, add LoRA, enable checkpointing; see the module docstring.

    `lora=None` only quantizes and freezes (e.g. before `load_adapter`). Returns the same
    model, with `model.qlora_report` (a ModelReport) set and, if `verbose`, printed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_model expects a torch nn.Module (a transformers causal LM), got {type(model).__name__}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a qlora.LoraConfig or None, got {type(lora).__name__}")
    existing = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    if existing and lora is not None:
        raise ValueError(f"the model already has LoRA adapters (e.g. {existing[0]!r}); prepare it only once")
    if lora is not None:  # check the selector before changing anything
        select_modules(model, lora.target_modules, lora.exclude_modules)

    model.requires_grad_(False)
    if quant_type is not None:
        for name in select_modules(model, quant_modules):
            layer = model.get_submodule(name)
            if not isinstance(layer, Linear4bit):
                model.set_submodule(name, Linear4bit.from_linear(layer, quant_type, blocksize, double_quant, compute_dtype))
                del layer  # the 16-bit weight goes now, before the next layer is quantized
    keep_norms_fp32(model)
    use_fused_rotary(model)
    if lora is not None:
        layer = DoraLinear if lora.use_dora else LoraLinear
        for name in select_modules(model, lora.target_modules, lora.exclude_modules):
            model.set_submodule(name, layer(model.get_submodule(name), lora.r, lora.alpha, lora.dropout,
                                            lora.use_rslora, lora.dtype))
        share_seeds(model)
    if gradient_checkpointing:
        enable_checkpointing(model, checkpoint_every, keep_attention)
    model.qlora_report = memory_report(model)
    if verbose:
        print(model.qlora_report)
    return model


ATTENTION_OPS = frozenset(
    op.default for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if (op := getattr(torch.ops.aten, name, None)) is not None
)
"""SDPA's fused kernels (CPU flash; CUDA flash, memory-efficient, cuDNN): their outputs are kept."""


def _keep_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing policy: save what the attention kernels return, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(model: nn.Module, every: int = 1, keep_attention: bool = False) -> None:
    """Gradient checkpointing of every `every`-th decoder layer + input gradients.

    Checkpointing all layers (every=1) keeps the least; each layer left out keeps its
    activations and skips its recompute in backward (about a fifth of a step's matmuls).
    `keep_attention`: checkpointed layers keep what the attention kernel returned (selective
    checkpointing), so only the rest is recomputed; it costs [tokens, hidden] per layer.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {every!r}")
    # reentrant where it is exact (the same gradients bit for bit: tests/model/test_prepare.py) and
    # cheaper on the host: no pack/unpack hook per saved tensor. Selective checkpointing needs the
    # non-reentrant form, and reentrant needs the layer input to require grad (input gradients).
    kwargs: dict = {"use_reentrant": not keep_attention and hasattr(model, "enable_input_require_grads")}
    if keep_attention:
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_attention_policy)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    elif every != 1:
        raise ValueError(f"checkpoint_every={every} needs transformers >= 5 (activation_checkpointing_enable)")
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                         "pass gradient_checkpointing=False or use a transformers model")
    if hasattr(model, "enable_input_require_grads") and not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False


# ---- the report -------------------------------------------------------------------------------
PARTS = ("4-bit weights", "quant constants", "dense linear", "embeddings", "lm_head", "norms", "other", "LoRA")


@dataclass
class ModelReport:
    """Parameter counts and resident bytes of each part of a (prepared) model."""

    trainable: int
    total: int
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)  # part -> (elements, bytes)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b in self.parts.values())

    def __str__(self) -> str:
        lines = [f"qlora: {self.trainable:,} trainable parameters of {self.total:,} "
                 f"({100 * self.trainable / max(self.total, 1):.3f}%)",
                 f"  {'part':<16} {'elements':>14} {'MiB':>10}"]
        for part in PARTS:
            if part in self.parts:
                n, b = self.parts[part]
                lines.append(f"  {part:<16} {n:>14,} {b / 2**20:>10.2f}")
        lines.append(f"  {'total':<16} {'':>14} {self.total_bytes / 2**20:>10.2f}")
        lines += [f"  ({note})" for note in self.notes]
        return "\n".join(lines)


def memory_report(model: nn.Module) -> ModelReport:
    """Count every parameter and quantized buffer once (tied tensors once), by part."""
    head = output_head(model)
    lora_ids = {id(x) for m in model.modules() if isinstance(m, LoraLinear) for x in (m.lora_A, m.lora_B)}
    parts: dict[str, list[int]] = {}
    seen: set[tuple[int, int]] = set()
    notes: list[str] = []
    trainable = total = 0

    def add(part: str, t: torch.Tensor | None, elements: int | None = None) -> bool:
        if t is None:
            return False
        key = (t.data_ptr(), t.numel())
        if key in seen and t.numel() > 0:
            return False
        seen.add(key)
        row = parts.setdefault(part, [0, 0])
        row[0] += t.numel() if elements is None else elements
        row[1] += t.numel() * t.element_size()
        return True

    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            add("4-bit weights", m._packed, m.in_features * m.out_features)
            total += m.in_features * m.out_features
            for b in ("_absmax", "_code", "_nested_absmax", "_nested_code"):
                add("quant constants", getattr(m, b), 0)
        for pname, p in m.named_parameters(recurse=False):
            if id(m) in lora_ids or pname == "lora_magnitude_vector":
                part = "LoRA"
            elif isinstance(m, nn.Embedding):
                part = "embeddings"
            elif m is head:
                part = "lm_head"
            elif is_norm(m) and not is_linear(m):
                part = "norms"
            elif is_linear(m) and pname == "weight":
                part = "dense linear"
            else:
                part = "other"
            if add(part, p):
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
            elif m is head:
                notes.append(f"{name}.{pname} is tied to the input embeddings, counted there")
    return ModelReport(trainable, total, {k: (v[0], v[1]) for k, v in parts.items()}, notes)


def compile_layers(model: nn.Module, backend: str = "inductor", **options) -> int:
    """torch.compile each decoder layer in place (`module.compile`); returns how many.

    One graph per layer with no break inside (the 4-bit decode and the seeded dropout are custom
    ops, nn/ops.py; the dropout seed is a tensor input); layers of one shape share the compiled
    code. transformers checkpoints a layer's `forward`, so the checkpoint is traced inside the graph.
    Sizes start static; a batch of a new length recompiles once with symbolic sizes (dynamo's
    automatic dynamic shapes), then every length reuses that graph. (`dynamic=True` from the
    start trips a dynamo assertion, lift_tracked_freevar_to_input, at the dropout op inside the
    layer's autograd Function in torch 2.13: a whole decoder layer only, not one LoraLinear.)
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers decoder layers to compile")
    # the fp32-norm hooks (keep_norms_fp32) note the input dtype on the module and take it back
    # within the same call: nothing for the checkpoint's recomputation to replay
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(backend=backend, **options)
    return len(layers)
