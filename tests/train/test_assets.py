"""The shipped tiny Llama is really pretrained, and NF4 + DQ keeps its held-out perplexity."""
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora import load_model
from qlora.assets import asset_path

WINDOWS, SEQ = 12, 256


@pytest.fixture(scope="module")
def heldout_ids():
    """Token windows of the held-out stdlib files named in pretrain.json (never trained on)."""
    info = json.loads((asset_path("tiny-llama") / "pretrain.json").read_text())
    tok = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in info["corpus"]["heldout_files"]:
        if (stdlib / name).exists():
            ids += tok((stdlib / name).read_text(encoding="utf-8", errors="replace"))["input_ids"]
    assert len(ids) >= WINDOWS * SEQ, "held-out files of this Python are missing"
    return torch.tensor(ids[: WINDOWS * SEQ]).view(WINDOWS, SEQ)


@torch.no_grad()
def perplexity(model, ids) -> float:
    return math.exp(float(model(input_ids=ids, labels=ids).loss))


def test_shipped_model_is_small_and_pretrained(heldout_ids):
    path = asset_path("tiny-llama")
    assert (path / "model.safetensors").stat().st_size <= 10 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ppl = perplexity(model, heldout_ids)
    assert ppl < 200, ppl  # random init scores about 4000 (ln 4096 = 8.3 nats)


def test_nf4_dq_within_2_percent_of_bf16_and_below_fp4(heldout_ids):
    path = asset_path("tiny-llama")
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # bf16 weights, fp32 math
    base = perplexity(dense, heldout_ids)
    ppl = {q: perplexity(load_model(path, q, q == "nf4", torch.float32, progress=False).eval(), heldout_ids)
           for q in ("nf4", "fp4", "int4")}
    print(f"held-out perplexity: bf16 {base:.3f}, " + ", ".join(f"{q} {v:.3f}" for q, v in ppl.items()))
    assert ppl["nf4"] <= base * 1.02
    assert ppl["nf4"] < ppl["fp4"]
