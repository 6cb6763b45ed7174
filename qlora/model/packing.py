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
- flex_attention: a BlockMask that skips the blocks between documents; eager: the same mask, additive;
- varlen (qlora's, model/varlen.py): torch's varlen kernels over `cu_seq_lens` made on the host
  (train/distributed.py: share), passed here with a placeholder mask: no mask, nothing read back.
Positions follow the position ids: RoPE (Llama, Qwen2, Mistral, Gemma, Phi-3) and GPT-2's
learned table alike restart at each document. So a packed document gets the logits, loss and
gradients it gets alone (tests/model/test_packing.py, on every architecture of PACKED_MODEL_TYPES).

With the model's config, `model_inputs` builds that mask itself on the batch's device (sdpa on the
architectures above, one window or none for every layer), the same boolean mask transformers
builds: transformers' own mask code first asks the device whether the mask is all ones
(`mask.sum() == numel`, `.all()`), a device sync per forward on a GPU. Whether there is padding
is decided on the host instead (`unpadded_on_host`; train/distributed.py: share, before the copy),
so a padded or packed step reads nothing back. (Rows without padding or packing still cost one
read: transformers scans the default position ids for packed documents; a prebuilt mask would
avoid it but trade SDPA's is_causal kernels for masked ones.)

Other attention forms were measured on this CPU (torch 2.13, docs/benchmarks.md "Packing"):
SDPA once per document (no wasted work, but a call per document per layer) and flex_attention
(compiled) were both slower than the masked SDPA; torch's varlen_attn is CUDA-only.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import ATTENTION, PACKED_MODEL_TYPES
from .varlen import NAME as VARLEN
from .varlen import placeholder_mask


def model_inputs(batch: dict[str, torch.Tensor], config=None) -> dict:
    """The model's keyword arguments for `batch` (labels left out): a packed batch passes its
    position ids and no 2-D attention mask (which would hide the documents' boundaries), an
    unpacked one its attention mask (none for a host-side mask of all ones); never a cache (a
    cache hides the boundaries too). With the model's `config`, where `builds_mask(config)`,
    the mask is passed prebuilt ([b, 1, t, t], `block_causal_mask`): nothing read back; with
    varlen attention and the batch's host-made `cu_seq_lens`, those instead (model/varlen.py)."""
    ids, pos, mask = batch["input_ids"], batch.get("position_ids"), batch.get("attention_mask")
    inputs = {"input_ids": ids, "use_cache": False}
    if "cu_seq_lens" in batch and getattr(config, "_attn_implementation", None) == VARLEN:
        cu, longest = batch["cu_seq_lens"], batch["max_length"]
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
                      attention_mask=placeholder_mask(ids.device))
        if pos is not None:
            inputs["position_ids"] = pos
        return inputs
    if pos is not None:
        inputs["position_ids"] = pos
        mask = None
    elif mask is not None and unpadded_on_host(mask):
        mask = None  # causal attention needs no mask
    if (pos is not None or mask is not None) and config is not None and builds_mask(config):
        mask = block_causal_mask(ids.shape[1], pos, mask, sliding_window(config))
    if mask is not None:
        inputs["attention_mask"] = mask
    return inputs


def unpadded_on_host(mask: torch.Tensor) -> bool:
    """True when the 2-D attention `mask` is on the host and all ones. A mask on a device is not
    read: that would be a device sync (so the trainer asks before the copy, distributed.share)."""
    return mask.device.type == "cpu" and bool(mask.all())


def builds_mask(config) -> bool:
    """True when `model_inputs` may pass the mask prebuilt: sdpa (or varlen, whose calls
    without boundaries run SDPA) on an architecture of PACKED_MODEL_TYPES, causal, every
    layer with the same window (or none)."""
    get = lambda k, d=None: getattr(config, k, d)  # noqa: E731
    if (get("_attn_implementation") or "sdpa") not in ("sdpa", VARLEN) or get("model_type") not in PACKED_MODEL_TYPES:
        return False
    return get("is_causal", True) and len(set(get("layer_types") or ())) <= 1


def sliding_window(config) -> int | None:
    """The sliding window every layer attends within (None: none)."""
    size, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    return size if types is None or "sliding_attention" in types else None


def block_causal_mask(length: int, position_ids: torch.Tensor | None = None, padding: torch.Tensor | None = None,
                      window: int | None = None) -> torch.Tensor:
    """Boolean [b, 1, t, t] (True: attend), on the inputs' device, what transformers' sdpa_mask
    gives: causal, within each document of packed `position_ids` [b, t] (a new document where
    a position does not follow the one before), to the keys `padding` [b, t] keeps, less than
    `window` positions back."""
    device = (position_ids if position_ids is not None else padding).device
    i = torch.arange(length, device=device)
    back = i[:, None] - i[None, :]
    mask = ((back >= 0) if window is None else (back >= 0) & (back < window))[None]
    if position_ids is not None:
        start = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
        doc = start.cumsum(-1)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    if padding is not None:
        mask = mask & padding.bool()[:, None, :]
    return mask[:, None]


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
    # every implementation qlora accepts reads the boundaries from position ids (tests: sdpa, eager)
    return get("model_type") in PACKED_MODEL_TYPES and attention in ATTENTION
