"""Which attention transformers runs in a model: `--attn-implementation`.

    check_attention("flex_attention", device)        # before loading: raises where it cannot train
    set_attention(model, "flex_attention", device)   # after loading; "auto" keeps the model's own
    auto_attention(config, device, dtype, packing)   # what the trainer runs for auto: varlen for packed fp32 on a CPU

ATTENTION are the implementations qlora accepts, all of them transformers' own code paths (no
kernels from the Hub: they would be remote code):
- sdpa: torch's scaled_dot_product_attention, transformers' default (qlora prebuilds its masks,
  model/packing.py; the memory planner models it);
- eager: the model's own matmul, softmax, matmul (saves the [b, heads, t, t] probabilities;
  the memory planner models it too);
- flash_attention_2 / flash_attention_3: the flash-attn package's kernels (CUDA); packed rows
  run its varlen form, with no work across documents;
- flex_attention: torch's flex_attention with a block mask that skips the blocks between packed
  documents (compiled; torch trains it on CUDA only, it has no CPU backward);
- varlen: torch's own varlen flash kernels (torch.nn.attention.varlen, CUDA, no flash-attn
  package; on the CPU, SDPA's CPU flash kernels once per document), registered with
  transformers by qlora (model/varlen.py): packed documents with no mask and no work across
  them, the boundaries handed over from the host.
Each keeps packed documents apart (model/packing.py). What a device or an install lacks is an
error here, naming the flag, not a failure at the first step.
Tests: tests/model/test_attention.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", "varlen")
PACKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2")
"""Architectures checked to keep packed documents apart (position ids -> positions and attention;
model/packing.py): packing is on for them, and varlen takes only them."""


def check_attention(name: str, device: torch.device | str = "cpu") -> None:
    """Raise, naming the flag, if attention `name` cannot train on `device` here (before any loading)."""
    if name == "auto":
        return
    if name not in ATTENTION:
        raise InputError(f"--attn-implementation {name}: expected auto or one of {', '.join(ATTENTION)}")
    if name == "flex_attention" and torch.device(device).type != "cuda":
        raise InputError("--attn-implementation flex_attention: torch trains flex attention on CUDA only (no CPU "
                         "backward); use sdpa (the default) here")
    if name == "varlen" and torch.device(device).type == "cuda":
        try:
            from torch.nn.attention import varlen  # noqa: F401
        except ImportError:
            raise InputError(f"--attn-implementation varlen: this torch ({torch.__version__}) has no "
                             "torch.nn.attention.varlen; upgrade torch, or use sdpa (the default)") from None
    if name.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        if not (is_flash_attn_2_available() if name == "flash_attention_2" else is_flash_attn_3_available()):
            raise InputError(f"--attn-implementation {name}: the flash-attn package for it is not installed (or "
                             "this is no CUDA machine); install it, or use sdpa (the default)")


def set_attention(model: nn.Module, name: str, device: torch.device | str = "cpu") -> None:
    """Switch `model` (a transformers model) to attention `name` for training on `device`;
    "auto" keeps what the model was loaded with."""
    check_attention(name, device)
    if name == "auto":
        return
    if name == "varlen":
        from .varlen import register

        config = model.config
        if config.model_type not in PACKED_MODEL_TYPES:
            raise InputError(f"--attn-implementation varlen: checked for {', '.join(PACKED_MODEL_TYPES)} only, not "
                             f"{config.model_type!r}; use sdpa (the default)")
        if dropout := getattr(config, "attention_dropout", 0.0) or getattr(config, "attn_pdrop", 0.0):
            raise InputError(f"--attn-implementation varlen: torch's varlen attention has no dropout, and this "
                             f"model's attention dropout is {dropout}; set it to 0 in config.json, or use sdpa")
        register()
    try:
        model.set_attn_implementation(name)
    except (ImportError, ValueError) as e:
        raise InputError(f"--attn-implementation {name}: transformers cannot run it here ({str(e)[:300]}); "
                         "install what it names, or use sdpa (the default)") from None
    if getattr(model.config, "_attn_implementation", None) != name:
        raise InputError(f"--attn-implementation {name}: {type(model).__name__} cannot switch its attention; "
                         "leave the flag at auto")


def auto_attention(config: dict, device: torch.device | str, compute_dtype: torch.dtype, packing: bool) -> str:
    """What `--attn-implementation auto` runs for a model of `config` (config.json's dict): varlen
    for packed rows on a CPU computing in float32, where the model takes it without a sliding
    window (SDPA's CPU flash kernels once per document: there a row's fp32 attention costs its
    query-key pairs, and the benchmark ran 1.26x (median) the tokens/s of SDPA with the block mask,
    docs/benchmarks.md); "auto" (the model's own, sdpa) elsewhere."""
    if not packing or torch.device(device).type != "cpu" or compute_dtype != torch.float32:
        return "auto"
    dropout = config.get("attention_dropout") or config.get("attn_pdrop")
    if config.get("model_type") not in PACKED_MODEL_TYPES or dropout:
        return "auto"
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        return "auto"
    return "varlen"


def planned_attention(name: str) -> str:
    """The attention the memory planner counts for `name`: eager and varlen as themselves, every
    other as sdpa."""
    return name if name in ("eager", "varlen") else "sdpa"


def plan_note(name: str) -> str | None:
    """What a memory plan for attention `name` leaves out, or None."""
    if name in ("flash_attention_2", "flash_attention_3", "flex_attention"):
        return (f"memory: the plan counts what sdpa attention saves; --attn-implementation {name} is not modelled "
                "(its kernels save about as much as SDPA's, without the mask)")
    return None
