"""The pre-quantized (bitsandbytes 4-bit) checkpoint fuzz strategy (tests/fuzz/test_bnb_fuzz.py, benchmarks/fuzz.py).

Seed: `qlora quantize`'s output (save_quantized) for a tiny random Llama: config.json with a
bitsandbytes quantization_config and model.safetensors holding each layer's packed codes,
absmax, quant_map, nested scales and JSON quant state. `mutate` breaks one thing: the
safetensors mutations (safetensors_mutations.py); one quantized weight's quant state set to a
bad value (quant type, blocksize, shape, dtype, nested offset), a field dropped, or the state not
JSON / not an object / not UTF-8 / not uint8; one of its pieces dropped, resized or retyped, or
bits of its codes or scales flipped; config.json's text mutated or its quantization_config
edited. The property (`BnbCase`): `load_model` raises a QloraError naming a file of the
checkpoint, or returns a model whose every Linear4bit decodes to its layer's shape; from the
seed's bytes exactly the seed's codes and scales; never another exception; under 5 s and the
checkpoint's size + 1 MiB of traced allocations.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from data_mutations import mutate as mutate_text
from fuzzing import INTERESTING, MIB, NON_UTF8, bounded, flip_bits
from safetensors.torch import load as load_bytes
from safetensors.torch import save
from safetensors_mutations import mutate as mutate_safetensors
from transformers import LlamaConfig

from qlora import Linear4bit, load_model, save_quantized
from qlora.errors import QloraError
from qlora.model.random_checkpoint import write_random_checkpoint

STATE_VALUES = {  # each must be refused (the key names nf4, the weights are 64 x 64 in blocks of 64)
    "quant_type": ["nf5", None, 4, "int4", "fp4"],
    "blocksize": [0, 48, 32, 8192, "64", 64.0, *INTERESTING],
    "shape": [[], [-1], [1 << 63], [64, 256], [1], "x", [64.0, 64], [1 << 40, 1 << 40], [0, 64]],
    "dtype": ["float99", 3, "int8", None],
    "nested_offset": ["x", float("inf"), None, True],
    "nested_blocksize": [128, "256", None],
}
STATE_ODD = {"dtype": ["torch.float32", "float16"], "nested_offset": [1e308, -3.5]}  # valid: they decode
QUANT_CONFIG_VALUES = {
    "quant_method": ["gptq", None, 3], "load_in_4bit": [False, None, "yes"], "load_in_8bit": [True],
    "bnb_4bit_quant_type": ["nf5", "fp4", None], "bnb_4bit_use_double_quant": [False, "x"],
    "bnb_4bit_compute_dtype": ["float99", 3], "bnb_4bit_quant_storage": ["int64"], "llm_int8_skip_modules": [5, []],
}
PIECES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


def write_seed(directory: Path) -> None:
    """A tiny Llama, random bf16 weights, quantized to NF4 + DQ and saved as bitsandbytes does."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    write_random_checkpoint(config, directory / "bf16")
    save_quantized(load_model(directory / "bf16", progress=False), directory / "seed")


def set_state(tensors: dict[str, torch.Tensor], weight: str, field: str, value) -> None:
    """Field `field` of `weight`'s JSON quant state set to `value`, in place."""
    key = weight + PIECES[-1]
    state = json.loads(bytes(tensors[key].tolist())) | {field: value}
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def edit_state(tensors: dict[str, torch.Tensor], weight: str, rng: random.Random) -> str:
    """One quantized weight's JSON quant state (or the tensor holding it) broken in place; the kind."""
    key = weight + PIECES[-1]
    state = json.loads(bytes(tensors[key].tolist()))
    kind = rng.choice(["value", "drop", "not-json", "not-object", "non-utf8", "dtype"])
    if kind == "value":
        table = rng.choice([STATE_VALUES, STATE_ODD])
        field = rng.choice(sorted(table))
        set_state(tensors, weight, field, rng.choice(table[field]))
        return f"state {field}"
    if kind == "drop":
        del state[(field := rng.choice(sorted(state)))]
        kind = f"drop state {field}"
    text = json.dumps(state).encode()
    if kind == "not-json":
        text = text[: rng.randrange(len(text))]
    elif kind == "not-object":
        text = rng.choice([b"[]", b"null", b"3", b'"nf4"'])
    elif kind == "non-utf8":
        at = rng.randrange(len(text))
        text = text[:at] + rng.choice(NON_UTF8) + text[at + 1:]
    blob = torch.tensor(list(text), dtype=torch.uint8)
    tensors[key] = blob.to(torch.int32) if kind == "dtype" else blob
    return kind


def edit_pieces(tensors: dict[str, torch.Tensor], weight: str, rng: random.Random) -> str:
    """One piece of a quantized weight dropped, resized, retyped, renamed or its bits flipped; the kind."""
    key = weight + rng.choice(PIECES[:-1])
    kind = rng.choice(["drop", "resize", "retype", "flip", "rename"])
    t = tensors[key]
    if kind == "drop":
        del tensors[key]
    elif kind == "resize":
        tensors[key] = torch.zeros(max(t.numel() + rng.choice([-1, 1, 64, -t.numel()]), 0), dtype=t.dtype)
    elif kind == "retype":
        tensors[key] = t.to(rng.choice([torch.float16, torch.int32, torch.uint8, torch.float32, torch.bfloat16]))
    elif kind == "flip":
        raw = bytearray(t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
        tensors[key] = torch.frombuffer(bytearray(flip_bits(bytes(raw), rng, most=3)), dtype=t.dtype).view(t.shape)
    else:
        other = key.replace("layers.0", "layers.1") if "layers.0" in key else key.replace("layers.1", "layers.0")
        tensors[rng.choice([other, key.replace("q_proj", "rotary"), key + ".extra"])] = tensors.pop(key)
    return f"{kind} {key.rsplit('.weight', 1)[1] or 'codes'}"


def mutate(config: bytes, weights: bytes, tensors: dict[str, torch.Tensor],
           rng: random.Random) -> tuple[str, bytes, bytes]:
    """One random mutation: its kind, config.json's bytes and model.safetensors' bytes."""
    target = rng.choice(["config-text", "quantization_config", "weights-bytes", "quant-state", "pieces"])
    if target == "config-text":
        kind, config = mutate_text(config, rng)
    elif target == "quantization_config":
        values = json.loads(config)
        key = rng.choice(sorted(QUANT_CONFIG_VALUES) + ["delete"])
        if key == "delete":
            del values["quantization_config"]
        else:
            values["quantization_config"][key] = rng.choice(QUANT_CONFIG_VALUES[key])
        kind, config = key, json.dumps(values).encode()
    elif target == "weights-bytes":
        kind, weights = mutate_safetensors(weights, rng)
    else:
        tensors = dict(tensors)
        weight = rng.choice(sorted(k for k in tensors if k.endswith(".weight") and k + ".absmax" in tensors))
        kind = (edit_state if target == "quant-state" else edit_pieces)(tensors, weight, rng)
        weights = save(tensors, metadata={"format": "pt"})
    return f"{target} {kind}", config, weights


def quantized_state(model: torch.nn.Module) -> dict[str, dict]:
    return {name: m.weight.state_dict() for name, m in model.named_modules() if isinstance(m, Linear4bit)}


class BnbCase:
    """The seed checkpoint, written once under `workdir`; calling it runs one mutated case."""

    def __init__(self, workdir: Path) -> None:
        write_seed(workdir)
        self.dir = workdir / "case"
        self.dir.mkdir()
        self.config, self.weights = ((workdir / "seed" / n).read_bytes() for n in ("config.json", "model.safetensors"))
        self.tensors = load_bytes(self.weights)
        self.expected = quantized_state(load_model(workdir / "seed", progress=False))
        assert len(self.expected) == 14

    def __call__(self, rng: random.Random) -> str:
        kind, config, weights = mutate(self.config, self.weights, self.tensors, rng)
        return f"{kind}: {self.check(config, weights)}"

    def check(self, config: bytes, weights: bytes) -> str:
        """"rejected", "equal" or "changed"; AssertionError (or any non-QloraError) if the property fails."""
        (self.dir / "config.json").write_bytes(config)
        (self.dir / "model.safetensors").write_bytes(weights)
        got = bounded(lambda: load_model(self.dir, progress=False), len(config) + len(weights) + MIB)
        if isinstance(got, QloraError):
            assert str(self.dir) in str(got), got
            return "rejected"
        for name, m in got.named_modules():
            if isinstance(m, Linear4bit):
                assert m.weight.dequantize().shape == (m.out_features, m.in_features), name
        state = quantized_state(got)
        equal = state.keys() == self.expected.keys() and all(
            state[n].keys() == self.expected[n].keys() and all(
                torch.equal(state[n][k], self.expected[n][k]) for k in state[n]) for n in state)
        if (config, weights) == (self.config, self.weights):
            assert equal, "the seed's bytes loaded other weights"
        return "equal" if equal else "changed"
