"""What kind of module is this: a linear layer, a norm, the output head; and which module
names a target selector picks.

prepare.select_modules builds the "all-linear" / names / regex selection on these; the memory
planner and TrainConfig read --target-modules with `parse_targets`.
"""
from __future__ import annotations

import re

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


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> str | list[str] | tuple[str, ...]:
    """--target-modules text as a selector: "all-linear" and regexes stay strings, comma-separated
    names (or one plain name) become a list; a list or tuple is already one."""
    if not isinstance(spec, str) or spec == "all-linear" or ("," not in spec and not spec.isidentifier()):
        return spec
    return [s.strip() for s in spec.split(",")]


def matches(name: str, selector: str | list[str] | tuple[str, ...]) -> bool:
    """Whether module `name` is selected: "all-linear" selects all, a list a module whose full name
    equals an entry or ends with "." + it, any other string is a regex over the full name."""
    if isinstance(selector, str):
        return selector == "all-linear" or re.fullmatch(selector, name) is not None
    return any(name == s or name.endswith("." + s) for s in selector)
