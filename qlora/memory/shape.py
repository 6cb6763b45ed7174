"""The numbers of a decoder-only model that its training memory depends on, from its config alone.

    shape = model_shape(load_config("llama-7b"))   # a shipped name, config.json, model dir, .gguf, Hub id, dict
    shape.linears()                                # (suffix, in, out, bias) of one decoder layer

Families: Llama (also Mistral, Qwen2, Gemma), Phi-3 (fused qkv and gate_up) and GPT-2 (Conv1D,
learned positions). No weights are read. Tests: tests/memory/test_plan_memory.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QloraError

SHIPPED = ("llama-7b", "llama-13b", "llama-33b", "llama-65b")
"""Configs shipped in qlora/assets/configs (LLaMA-1, the QLoRA paper's models)."""


class MemoryPlanError(QloraError, ValueError):
    """The planner cannot read the model or a setting is invalid; the message says what to do."""


def load_config(model: Any) -> dict:
    """The config dict of a shipped name, config.json path, model directory, Hub id, dict or
    transformers PretrainedConfig (only config.json is read)."""
    if isinstance(model, dict):
        return dict(model)
    if hasattr(model, "to_dict"):
        return model.to_dict()
    name = str(model)
    if name in SHIPPED:
        from ..assets import asset_path

        return json.loads((asset_path("configs") / f"{name}.json").read_text())
    path = Path(name)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()):
        from ..model.checkpoint_files import resolve

        path = resolve(path)  # its config.json, translated from the GGUF metadata (model/gguf_model.py)
    if path.is_file():
        return json.loads(path.read_text())
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MemoryPlanError(f"{path}: no config.json in this directory")
        return json.loads((path / "config.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except Exception as e:  # offline, unknown repo, gated
        raise MemoryPlanError(f"--model {name!r}: not a shipped config ({', '.join(SHIPPED)}), a file or a directory, "
                              f"and its config.json could not be fetched from the Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); pass a local config.json") from None


@dataclass
class Shape:
    """The numbers of a decoder-only model that memory depends on."""

    family: str  # llama (also mistral, qwen2, gemma), phi3, gpt2
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    positions: int = 0  # learned position embeddings (GPT-2)
    qkv_bias: bool = False
    norm_offset: bool = False  # Gemma's RMSNorm scales by (1 + weight)
    attn_dropout: float = 0.0  # dropout on the attention probabilities in training (GPT-2: attn_pdrop)
    resid_dropout: float = 0.0  # dropout on each sublayer's output before the residual add (GPT-2, Phi-3)
    embd_dropout: float = 0.0  # dropout on the embeddings (GPT-2)
    activation: str = ""  # GPT-2's activation_function (gelu_new: a formula of four saved tensors)

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(module suffix, in, out, bias) of one decoder layer's linear layers, in call order."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == "gpt2":
            return [("attn.c_attn", h, 3 * h, True), ("attn.c_proj", h, h, True), ("mlp.c_fc", h, i, True),
                    ("mlp.c_proj", i, h, True)]
        if self.family == "phi3":
            return [("self_attn.qkv_proj", h, q + 2 * kv, False), ("self_attn.o_proj", q, h, False),
                    ("mlp.gate_up_proj", h, 2 * i, False), ("mlp.down_proj", i, h, False)]
        b = self.qkv_bias
        return [("self_attn.q_proj", h, q, b), ("self_attn.k_proj", h, kv, b), ("self_attn.v_proj", h, kv, b),
                ("self_attn.o_proj", q, h, False), ("mlp.gate_proj", h, i, False), ("mlp.up_proj", h, i, False),
                ("mlp.down_proj", i, h, False)]

    def layer_prefix(self, layer: int) -> str:
        return f"transformer.h.{layer}." if self.family == "gpt2" else f"model.layers.{layer}."

    def norm_elements(self) -> int:
        """Elements of all norm parameters (2 per layer + the final; LayerNorm has a bias)."""
        per = 2 * self.hidden if self.family == "gpt2" else self.hidden
        return (2 * self.layers + 1) * per


def model_shape(config: dict) -> Shape:
    """A Shape from a transformers config dict; raises naming the missing key."""
    kind = str(config.get("model_type", "llama")).lower()

    def need(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        if default is not None:
            return default
        raise MemoryPlanError(f"config ({kind}) has none of {keys}; the planner needs it")

    if kind == "gpt2":
        h = need("n_embd", "hidden_size")
        return Shape("gpt2", h, need("n_inner", default=4 * h) or 4 * h, need("n_layer", "num_hidden_layers"),
                     need("n_head", "num_attention_heads"), need("n_head", "num_attention_heads"),
                     h // need("n_head", "num_attention_heads"), need("vocab_size"), True,
                     positions=need("n_positions", "max_position_embeddings"),
                     attn_dropout=_float(config, "attn_pdrop", 0.1), resid_dropout=_float(config, "resid_pdrop", 0.1),
                     embd_dropout=_float(config, "embd_pdrop", 0.1),
                     activation=config.get("activation_function") or "gelu_new")  # GPT2Config's defaults
    family = "phi3" if kind in ("phi3", "phi4") else "llama"
    if kind not in ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "mixtral") and "architectures" in config:
        archs = " ".join(config["architectures"] or [])
        if not any(a in archs for a in ("Llama", "Mistral", "Qwen2", "Gemma", "Phi3")):
            raise MemoryPlanError(f"model_type {kind!r} ({archs}): the planner knows Llama, Mistral, Qwen2, Gemma, "
                                  "Phi-3 and GPT-2 layouts; pass a config of one of those families")
    h = need("hidden_size")
    heads = need("num_attention_heads")
    return Shape(family, h, need("intermediate_size"), need("num_hidden_layers"), heads,
                 need("num_key_value_heads", default=heads), config.get("head_dim") or h // heads,
                 need("vocab_size"), bool(config.get("tie_word_embeddings", kind == "gemma")),
                 qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
                 norm_offset=kind.startswith("gemma"), attn_dropout=_float(config, "attention_dropout", 0.0),
                 resid_dropout=_float(config, "resid_pdrop", 0.0) if family == "phi3" else 0.0)


def _float(config: dict, key: str, default: float) -> float:
    value = config.get(key)
    return default if value is None else float(value)
