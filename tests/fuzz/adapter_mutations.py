"""The adapter-directory fuzz strategy (tests/fuzz/test_adapter_fuzz.py and benchmarks/fuzz.py).

Seed: a PEFT-format adapter (adapter_config.json + adapter_model.safetensors, rank 4 on q_proj
and v_proj, B random) saved by qlora from a tiny 4-bit Llama. `mutate` breaks one thing in one
of the two files: the safetensors mutations (safetensors_mutations.py), a tensor renamed,
dropped, added, reshaped or retyped, or the config's JSON text mutated or one of its fields set
to a bad value (r 0 / -1 / 2^31 / 2^63 / 4.0 / "4", lora_alpha 0 / inf, patterns, types) or
an odd but valid one.
The property (`AdapterCase`): `load_adapter` on a fresh copy of the base either raises a
QloraError naming a file of the directory, or loads LoRA layers whose A is [r, in] and B is
[out, r] of their base layer; from the seed's bytes exactly the seed's weights and scaling;
never another exception; under 5 s and the directory's size + 1 MiB of traced allocations.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch
from data_mutations import mutate as mutate_text
from fuzzing import INTERESTING, MIB, bounded
from safetensors.torch import load as load_bytes
from safetensors.torch import save
from safetensors_mutations import mutate as mutate_safetensors
from transformers import LlamaConfig, LlamaForCausalLM

from qlora import LoraConfig, LoraLinear, load_adapter, prepare_model, save_adapter
from qlora.errors import QloraError
from qlora.model.adapter import CONFIG_NAME, WEIGHTS_NAME

BAD_VALUES = {  # each must be refused
    "r": [*INTERESTING, 4.0, "4", None, True, [4]],
    "lora_alpha": [0, -8, float("inf"), float("nan"), "8", None],
    "lora_dropout": [1, -0.1, float("nan"), "0.1"],
    "target_modules": [5, [1], {"a": 1}],
    "use_rslora": ["yes", 1],
    "rank_pattern": [{"q_proj": 0}, {"(": 4}, {"q_proj": 2}, {"v_proj": 8}, [], "x"],
    "alpha_pattern": [{"q_proj": "x"}, {"[": 1}, []],
    "peft_type": ["IA3", None, 3],
    "use_dora": [True], "bias": ["all"], "modules_to_save": [["lm_head"]],
}
ODD_VALUES = {  # valid, unusual: loaded (scaled differently) or refused, never another error
    "lora_alpha": [1e308, 1e-300], "target_modules": ["(", "", []], "alpha_pattern": [{"v_proj": 0.5}],
    "use_rslora": [True], "lora_dropout": [None, 0], "base_model_name_or_path": [None, 3, "../../etc"],
}


def base_model() -> torch.nn.Module:
    """The tiny 4-bit Llama the seed adapter belongs to (no LoRA layers)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return prepare_model(LlamaForCausalLM(config), lora=None, verbose=False, gradient_checkpointing=False)


def write_seed(base: torch.nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """Save the seed adapter under `directory`; its tensors."""
    model = prepare_model(copy.deepcopy(base), lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                          quant_type=None, verbose=False, gradient_checkpointing=False)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            torch.nn.init.normal_(m.lora_B.weight)
    save_adapter(model, directory)
    return load_bytes((directory / WEIGHTS_NAME).read_bytes())


def edit_tensors(tensors: dict[str, torch.Tensor], rng: random.Random) -> tuple[str, dict[str, torch.Tensor]]:
    """A tensor renamed, dropped, added, reshaped or retyped."""
    tensors = dict(tensors)
    key = rng.choice(sorted(tensors))
    kind = rng.choice(["rename", "drop", "add", "reshape", "retype", "adapter-name"])
    if kind == "rename":
        new = rng.choice([key.replace("q_proj", "k_proj"), key.replace("q_proj", "o_proj"),
                          key.replace("self_attn", "mlp"), key.replace("lora_A", "lora_B"),
                          key.replace("layers.1", "layers.7"), key.replace("base_model.model.", ""),
                          key.replace("model.layers.0", "lm_head"), key.replace("q_proj", "rotary_emb")])
        tensors[new] = tensors.pop(key)
    elif kind == "drop":
        del tensors[key]
    elif kind == "add":
        tensors[rng.choice(["base_model.model.model.embed_tokens.lora_A.weight", "base_model.model.x.lora_A.weight",
                            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", "extra"])] = torch.zeros(4, 64)
    elif kind == "reshape":
        t = tensors[key]
        shape = rng.choice([(t.shape[0] + 1, t.shape[1]), (t.shape[0], t.shape[1] - 1), (t.numel(),), (1, *t.shape),
                            (0, t.shape[1]), (t.shape[1], t.shape[0])])
        tensors[key] = torch.zeros(shape, dtype=t.dtype)
    elif kind == "retype":
        tensors[key] = tensors[key].to(rng.choice([torch.int32, torch.uint8, torch.bool, torch.float16, torch.float64]))
    else:
        tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)
    return kind, tensors


def mutate(config: bytes, weights: bytes, tensors: dict[str, torch.Tensor],
           rng: random.Random) -> tuple[str, bytes, bytes]:
    """One random mutation: its kind, the config bytes and the weights bytes."""
    target = rng.choice(["config-text", "config-field", "weights-bytes", "weights-tensors"])
    if target == "config-text":
        kind, config = mutate_text(config, rng)
    elif target == "config-field":
        values = json.loads(config)
        table = rng.choice([BAD_VALUES, ODD_VALUES])
        key = rng.choice(sorted(table) + ["delete"])
        if key == "delete":
            kind = f"delete {(gone := rng.choice(sorted(values)))}"
            del values[gone]
        else:
            kind = key
            values[key] = rng.choice(table[key])
        config = json.dumps(values).encode()
    elif target == "weights-bytes":
        kind, weights = mutate_safetensors(weights, rng)
    else:
        kind, edited = edit_tensors(tensors, rng)
        weights = save(edited, metadata={"format": "pt"})
    return f"{target} {kind}", config, weights


def lora_state(model: torch.nn.Module) -> dict[str, tuple]:
    return {name: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone(), m.scaling)
            for name, m in model.named_modules() if isinstance(m, LoraLinear)}


class AdapterCase:
    """The base and the seed adapter, made once under `workdir`; calling it runs one mutated case."""

    def __init__(self, workdir: Path) -> None:
        self.base = base_model()
        self.seed_dir, self.dir = workdir / "seed", workdir / "case"
        self.tensors = write_seed(self.base, self.seed_dir)
        self.config, self.weights = ((self.seed_dir / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME))
        self.dir.mkdir()
        self.expected = lora_state(load_adapter(copy.deepcopy(self.base), self.seed_dir))
        assert len(self.expected) == 4

    def __call__(self, rng: random.Random) -> str:
        kind, config, weights = mutate(self.config, self.weights, self.tensors, rng)
        return f"{kind}: {self.check(config, weights)}"

    def check(self, config: bytes, weights: bytes) -> str:
        """"rejected", "equal" or "changed"; AssertionError (or any non-QloraError) if the property fails."""
        (self.dir / CONFIG_NAME).write_bytes(config)
        (self.dir / WEIGHTS_NAME).write_bytes(weights)
        model = copy.deepcopy(self.base)
        got = bounded(lambda: load_adapter(model, self.dir), len(config) + len(weights) + MIB)
        if isinstance(got, QloraError):
            assert str(self.dir) in str(got), got
            return "rejected"
        state = lora_state(got)
        for name, (a, b, scaling) in state.items():
            base = got.get_submodule(name).base_layer
            assert a.shape == (a.shape[0], base.in_features) and b.shape == (base.out_features, a.shape[0]), name
            assert a.shape[0] >= 1 and scaling > 0 and scaling == scaling, (name, scaling)
        equal = state.keys() == self.expected.keys() and all(
            torch.equal(state[n][0], self.expected[n][0]) and torch.equal(state[n][1], self.expected[n][1])
            and state[n][2] == self.expected[n][2] for n in state)
        if (config, weights) == (self.config, self.weights):
            assert equal, "the seed's bytes loaded other weights"
        return "equal" if equal else "changed"
