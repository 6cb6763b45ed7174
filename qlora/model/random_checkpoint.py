"""Random-weight checkpoints of any transformers config, written without building the model.

    write_random_checkpoint(LlamaConfig(...), "dir/", shard_bytes=200 << 20)

For tests and benchmarks of the loaders: tensors are generated one at a time (peak memory
about one shard), named and shaped as `save_pretrained` writes them, in bf16.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .load import meta_parameters
from .save import write_safetensors
from .targets import is_norm


def write_random_checkpoint(config, directory: str | os.PathLike, shard_bytes: int = 200 << 20, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config.json + safetensors shards of N(0, 0.02) weights (norm weights 1, biases 0)."""
    from transformers import AutoModelForCausalLM

    with meta_parameters(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    norms = {f"{name}.{p}" for name, m in model.named_modules() if is_norm(m) for p, _ in m.named_parameters()}
    g = torch.Generator().manual_seed(seed)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in model.named_parameters():  # tied weights appear once
            if name in norms:
                t = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
            elif name.endswith("bias"):
                t = torch.zeros(p.shape)
            else:
                t = torch.randn(p.shape, generator=g) * 0.02
            yield name, t.to(dtype)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors(), directory, shard_bytes)
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    (directory / "config.json").write_text(config.to_json_string())
    return directory
