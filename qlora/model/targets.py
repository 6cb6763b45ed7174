"""What kind of module is this: a linear layer, a norm, the output head.

prepare.select_modules builds the "all-linear" / names / regex selection on these.
"""
from __future__ import annotations

from torch import nn

from ..nn.linear4bit import is_conv1d


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), whose weight is [in, out]."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm of any transformers architecture."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None
