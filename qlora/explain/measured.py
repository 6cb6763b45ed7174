"""The demo model's measured numbers: held-out perplexity under each quantization, and the
demo fine-tune with QLoRA vs 16-bit LoRA on the same data.

    python scripts/tutorial_numbers.py --measure     # runs these (a few minutes, 1 thread)

These are too slow for `qlora explain` and the fast tests: the script commits their
results to docs/tutorial_numbers.json, and tests/test_explain.py recomputes one of them
(NF4 + DQ perplexity on a small held-out slice) to check the file.

Held-out text: the stdlib files that scripts/pretrain.py never trained on (listed in
qlora/assets/tiny-llama/pretrain.json), tokenized and cut into windows of 256 tokens, as
tests/train/test_assets.py does. Perplexity is exp(mean token loss) in fp32 compute.
"""
from __future__ import annotations

import json
import math
import sysconfig
import time
from pathlib import Path

import torch

from ..assets import asset_path

SEQ = 256
PPL_CASES = (("bf16", None, False), ("nf4+dq", "nf4", True), ("nf4", "nf4", False), ("fp4", "fp4", False),
             ("int4", "int4", False))
"""(label, quant_type, double_quant): "bf16" is the shipped checkpoint (bf16 weights) unquantized."""


def heldout_ids(windows: int | None = None, seq: int = SEQ) -> torch.Tensor:
    """[windows, seq] token ids of the held-out stdlib files (all whole windows if None)."""
    from transformers import AutoTokenizer

    path = asset_path("tiny-llama")
    info = json.loads((path / "pretrain.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    missing = []
    for name in info["corpus"]["heldout_files"]:
        if (stdlib / name).exists():
            ids += tok((stdlib / name).read_text(encoding="utf-8", errors="replace"))["input_ids"]
        else:
            missing.append(name)
    n = len(ids) // seq if windows is None else windows
    if n == 0 or len(ids) < n * seq:
        raise FileNotFoundError(f"held-out files of {path / 'pretrain.json'} missing from {stdlib}: {missing}; "
                                f"found {len(ids)} tokens, need {n * seq}")
    return torch.tensor(ids[: n * seq]).view(n, seq)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token loss) over the rows of `ids` (every row has the same length)."""
    total = 0.0
    for i in range(0, ids.shape[0], batch):
        chunk = ids[i: i + batch]
        total += float(model(input_ids=chunk, labels=chunk).loss) * chunk.shape[0]
    return math.exp(total / ids.shape[0])


def demo_model(quant_type: str | None, double_quant: bool = False):
    """The shipped tiny Llama in fp32 compute: dense (quant_type None) or with 4-bit linears."""
    from transformers import AutoModelForCausalLM

    from ..model.load import load_model

    path = asset_path("tiny-llama")
    if quant_type is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load_model(path, quant_type, double_quant, torch.float32, progress=False).eval()


def demo_finetune(quant_type: str, output: str | Path, max_steps: int = -1) -> dict:
    """The tiny-model demo recipe (qlora/assets/demo_tiny.yaml) with `quant_type` ("nf4": QLoRA with
    DQ, "none": 16-bit LoRA), fp32 compute; returns eval loss before and after, time, steps."""
    import yaml

    from ..train import data as D
    from ..train.config import TrainConfig, validate
    from ..train.loop import _build_model, _default_paths, evaluate, train

    recipe = yaml.safe_load(asset_path("demo_tiny.yaml").read_text())
    recipe.update(output=str(output), quant_type=quant_type, compute_dtype="float32", demo=False,
                  max_steps=max_steps, save_every=0)
    cfg = validate(TrainConfig(**recipe))
    # eval loss before training: the same split the loop uses, the adapters at B = 0
    from transformers import AutoTokenizer

    model_path, data_path = _default_paths(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, _ = D.tokenize_rows(D.read_rows(data_path), tokenizer, cfg.max_length, cfg.train_on_prompt, False)
    _, eval_rows = D.split(examples, cfg.eval_split, cfg.seed)
    torch.manual_seed(cfg.seed)
    before, _ = evaluate(_build_model(cfg, model_path), eval_rows, cfg.batch_size, D.pad_id(tokenizer))
    start = time.perf_counter()
    summary = train(cfg)
    return {"quant_type": quant_type, "steps": summary["steps"], "eval_rows": len(eval_rows),
            "eval_loss_before": before, "eval_loss_after": summary["final_eval_loss"],
            "train_loss_first": summary["first_loss"], "train_loss_last": summary["final_loss"],
            "seconds": round(time.perf_counter() - start, 1)}
