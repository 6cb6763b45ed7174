"""GGUF import (model/gguf_model.py) of every architecture qlora claims, on tiny random files
written as llama.cpp writes them (tiny_gguf.py, with gguf's own writer):

- 16-bit load: the same logits as transformers' own GGUF loader, and as the model the file
  was written from;
- NF4 load: the same codes and logits as qlora's NF4 load of that model's safetensors;
- what transformers' loader gets wrong or refuses: a file named exactly "mistral" (it builds a
  Mistral class, then finds no "mistral" tensor table in gguf-py) and a GPT-2 context length
  other than 1024 (GPT2Config no longer reads the n_ctx it sets); qlora checked against the
  original model there;
- bad files named: an architecture qlora does not load, a truncated file, a tensor type no
  one can decode.

    python -m pytest tests/model/test_gguf_model.py -q
"""
from __future__ import annotations

import struct

import pytest
import torch

import qlora
from qlora.model import gguf_model
from qlora.model.checkpoint_files import resolve
from qlora.model.gguf_file import GGUFError, read_gguf

from tiny_gguf import ARCHS, TOKENIZER, write_tiny_gguf

IDS = torch.tensor([[286, 72, 101, 263, 285, 33, 100, 287]])  # control tokens, bytes, merged pieces


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Config + tokenizer translations go to this test's directory, not ~/.cache."""
    monkeypatch.setattr(gguf_model, "cache_root", lambda: tmp_path / "cache")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_like_transformers_gguf_loader(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, path = write_tiny_gguf(arch, tmp_path)
    ours = qlora.load_model(path, quant_type="none", compute_dtype=torch.float32, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert type(ours) is type(ref)
    theirs = ref.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in ours.state_dict().items())  # the same weights, bit for bit
    # the same logits up to float32 rounding: transformers may keep a weight transposed (a strided
    # view), and a matmul over another memory layout rounds differently
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(ours), logits(model), rtol=1e-5, atol=1e-5)  # the file is what it should be


# each architecture with its usual vocabulary and, where files of it with the other exist, that one too
# (Llama 2 / Mistral: sentencepiece; Phi-4 and Gemma 3 converted without tokenizer.model: byte-level);
# Qwen2 and GPT-2 come byte-level only (their tokenizer classes rebuild a byte-level pipeline)
VOCABS = [(a, TOKENIZER[a]) for a in ARCHS] + [(a, "gpt2") for a in ("mistral", "gemma2", "gemma3", "phi3")] + [
    ("llama", "llama")]


@pytest.mark.parametrize("arch, kind", VOCABS)
def test_tokenizer_encodes_like_transformers_gguf_tokenizer(arch, kind, tmp_path):
    from transformers import AutoTokenizer

    _, path = write_tiny_gguf(arch, tmp_path, tokenizer=kind)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(resolve(path))  # the translation qlora made once and kept
    chat = [{"role": "user", "content": "hi the"}, {"role": "assistant", "content": "the hi"}]
    for text in (" the hi", "the  hi there\n<|im_start|>x", "ßü 1", ""):
        assert ours(text).input_ids == ref(text).input_ids, text
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)
    assert ours.apply_chat_template(chat)["input_ids"] == ref.apply_chat_template(chat)["input_ids"]
    merged = 256 + 2 if kind == "gpt2" else 259 + 7  # "Ġthe" / "▁the": the third merge / eighth piece
    assert merged in ours(" the").input_ids  # the merges came through
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_from_gguf_equals_nf4_from_safetensors(arch, tmp_path):
    model, path = write_tiny_gguf(arch, tmp_path)
    model.save_pretrained(tmp_path / "st")
    a = qlora.load_model(path, progress=False)
    b = qlora.load_model(tmp_path / "st", progress=False)
    packed = {n: m._packed for n, m in b.named_modules() if isinstance(m, qlora.Linear4bit)}
    assert packed and {n: m._packed for n, m in a.named_modules() if isinstance(m, qlora.Linear4bit)}.keys() == packed.keys()
    for n, m in a.named_modules():
        if n in packed:
            assert torch.equal(m._packed, packed[n]), n
    assert torch.equal(logits(a), logits(b))


def test_a_file_named_mistral_loads_as_mistral(tmp_path):
    model, path = write_tiny_gguf("mistral", tmp_path, name="mistral")
    ours = qlora.load_model(path, quant_type="none", compute_dtype=torch.float32, progress=False)
    assert type(ours).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(logits(ours), logits(model), rtol=1e-5, atol=1e-5)


def test_gpt2_context_length_comes_from_the_file(tmp_path):
    model, path = write_tiny_gguf("gpt2", tmp_path, n_positions=128)
    ours = qlora.load_model(path, quant_type="none", compute_dtype=torch.float32, progress=False)
    assert ours.transformer.wpe.weight.shape == (128, 64)
    torch.testing.assert_close(logits(ours), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, hint", [("mamba", ""), ("mistral", "writes Mistral models as 'llama'")])
def test_an_unsupported_architecture_is_named(arch, hint, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=f"{path}: architecture '{arch}' is not supported; qlora loads .*llama.*{hint}"):
        qlora.load_model(path, progress=False)


def test_a_truncated_file_is_named(tmp_path):
    _, path = write_tiny_gguf("llama", tmp_path)
    last = list(read_gguf(path).tensors.values())[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset + last.nbytes // 2)
    with pytest.raises(GGUFError, match=f"{path}: tensor '{last.name}' ends at byte {last.offset + last.nbytes}, past the end"):
        qlora.load_model(path, progress=False)


def _set_type(path, name: str, ggml_type: int) -> None:
    """Rewrite the ggml type in tensor `name`'s header entry (name, n_dims, dims, type, offset)."""
    raw = path.read_bytes()
    key = struct.pack("<Q", len(name)) + name.encode()
    at = raw.index(key) + len(key)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    at += 4 + 8 * n_dims
    path.write_bytes(raw[:at] + struct.pack("<I", ggml_type) + raw[at + 4:])


@pytest.mark.parametrize("ggml_type, match", [
    (99, r"tensor 'blk.0.ffn_up.weight': unknown ggml type 99"),
    # Q8_1 is a llama.cpp dot-product intermediate: gguf-py has no decoder for it
    (9, r"tensor 'blk.0.ffn_up.weight' has type Q8_1, which the installed gguf package cannot dequantize"),
])
def test_a_tensor_type_that_cannot_be_decoded_is_named(ggml_type, match, tmp_path):
    _, path = write_tiny_gguf("llama", tmp_path)
    _set_type(path, "blk.0.ffn_up.weight", ggml_type)  # F32 bytes stay: a Q8_1 tensor is smaller
    with pytest.raises(GGUFError, match=f"{path}: {match}"):
        qlora.load_model(path, progress=False)
