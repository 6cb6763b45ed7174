"""GGUF export (model/export_gguf.py, `qlora export --gguf`) of every architecture qlora's GGUF
import claims, from tiny random files written as llama.cpp writes them (tiny_gguf.py):

- each tensor is what llama.cpp's converter would write for the merged model (`qlora merge`'s
  checkpoint put through tiny_gguf's converter), in the base file's order, metadata kept;
- transformers' GGUF loader reads it back with the merged model's logits: f16 within 16-bit
  rounding, q8_0 and q4_0 with their (growing) quantization error.

    python -m pytest tests/model/test_export_gguf.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qlora
from qlora.model import gguf_model
from qlora.model.export_gguf import export_gguf
from qlora.model.gguf_file import read_gguf
from qlora.model.save import merge_adapter, merged_model

from tiny_gguf import ARCHS, gguf_tensors, write_tiny_gguf

IDS = torch.tensor([[286, 72, 101, 263, 285, 33, 100, 287]])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_model, "cache_root", lambda: tmp_path / "cache")


def random_adapter(base, out):
    """A qlora adapter on the NF4 base with random (non-zero) B, so the merge changes every target."""
    model = qlora.prepare_model(qlora.load_model(base, progress=False), quant_type=None, verbose=False,
                                lora=qlora.LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, qlora.LoraLinear):
            m.lora_B.weight.data.normal_(0, 0.05, generator=g)
    return qlora.save_adapter(model, out)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trips_through_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    _, base = write_tiny_gguf(arch, tmp_path)
    adapter = random_adapter(base, tmp_path / "adapter")
    merged, _ = merged_model(base, adapter)
    with torch.no_grad():
        want = merged.float()(IDS).logits
    # the reference layout: `qlora merge`'s checkpoint through llama.cpp's conventions (tiny_gguf)
    plain = AutoModelForCausalLM.from_pretrained(merge_adapter(base, adapter, tmp_path / "merged"), dtype=torch.float32)
    expected = gguf_tensors(plain, arch)

    src = read_gguf(base)
    errors = {}
    for kind in ("f16", "q8_0", "q4_0"):
        out = export_gguf(base, adapter, tmp_path / f"out-{kind}.gguf", kind, progress=False)
        new = read_gguf(out)
        assert list(new.tensors) == list(src.tensors)
        assert {k: v for k, v in new.fields.items() if k != "general.file_type"} == {
            k: v for k, v in src.fields.items() if k != "general.file_type"}
        if kind == "f16":
            for name, info in new.tensors.items():
                ref = expected[name].astype(np.float16 if len(info.shape) == 2 else np.float32).astype(np.float32)
                assert np.array_equal(new.read(name).numpy(), ref), name
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
        with torch.no_grad():
            errors[kind] = float((back(IDS).logits - want).norm() / want.norm())
    assert errors["f16"] < 1e-5, errors  # 16-bit values are exact in f16 here: only summation order differs
    assert errors["f16"] < errors["q8_0"] < errors["q4_0"] < 0.5, errors
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left beside
