"""Packed batches: several documents side by side in one row, each kept apart from the others.

    inputs = model_inputs(batch)        # the transformers model's arguments for a (packed) batch
    packs_exactly(model)                # True when the model keeps packed documents apart

A packed batch (train/data.py: pack, collate) carries `position_ids` that restart at every
document, and the first label of each document is -100. Given position ids, no 2-D attention
mask and no cache, transformers (5.x, masking_utils.find_packed_sequence_indices) reads the
document boundaries from the position ids and confines attention to each document in the
form its attention implementation takes:
- sdpa (the default, and what runs on a CPU): a block-diagonal causal boolean mask
  [batch, 1, seq, seq], built once per forward (exact);
- flash_attention_2 / 3: the varlen kernels with cu_seqlens (no mask, no work across documents);
- flex_attention: a BlockMask that skips the blocks between documents; eager: the same mask, additive.
Positions follow the position ids: RoPE (Llama, Qwen2, Mistral, Gemma, Phi-3) and GPT-2's
learned table alike restart at each document. So a packed document gets the logits, loss and
gradients it gets alone (tests/model/test_packing.py, on every architecture of PACKED_MODEL_TYPES).

Other attention forms were measured on this CPU (torch 2.13, docs/benchmarks.md "Packing"):
SDPA once per document (no wasted work, but a call per document per layer) and flex_attention
(compiled) were both slower than the masked SDPA; torch's varlen_attn is CUDA-only.
"""
from __future__ import annotations

import torch
from torch import nn

PACKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2")
"""Architectures checked to keep packed documents apart (position ids -> positions and attention)."""
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""transformers attention implementations that read document boundaries from position ids
(the tests run sdpa, the default, and eager; flash and flex are transformers' own
code paths for packed position ids, not run here: no GPU, no flash-attn)."""


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The model's keyword arguments for `batch` (labels left out): a packed batch passes its
    position ids and no 2-D attention mask (which would hide the documents' boundaries), an
    unpacked one its attention mask; never a cache (a cache hides the boundaries too)."""
    if batch.get("position_ids") is not None:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}


def packs_exactly(model: nn.Module | dict) -> bool:
    """True when `model` (or its config dict) is of an architecture that keeps packed documents
    apart, with an attention implementation that does, on a transformers that can."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    config = model if isinstance(model, dict) else getattr(model, "config", None)
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    attention = get("_attn_implementation", None) or "sdpa"  # a config.json names none: sdpa is the default
    return get("model_type") in PACKED_MODEL_TYPES and attention in PACKED_ATTENTION
