"""save_quantized and merge_adapter: checkpoints that plain transformers (+ bitsandbytes) loads."""
import json
import shutil
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

import qlora
from qlora import load_model, merge_adapter, save_quantized
from qlora.cli import main
from qlora.model.save import atomic_directory
from qlora.quant.report import minilm_path

from test_load import TOKENS, save_tiny, tiny_gpt2_config, tiny_llama_config
from tiny_models import bnb_dequantize_path

ARCHS = [(LlamaForCausalLM, tiny_llama_config()), (GPT2LMHeadModel, tiny_gpt2_config())]


@pytest.mark.parametrize("cls, config", ARCHS)
def test_save_quantized_loads_in_transformers_with_same_logits(tmp_path, cls, config):
    _, path = save_tiny(tmp_path, cls, config)
    tokenizer_dir = minilm_path().parent  # any real tokenizer files: they must be copied along
    shutil.copy(tokenizer_dir / "tokenizer.json", path)
    shutil.copy(tokenizer_dir / "tokenizer_config.json", path)
    model = load_model(path, progress=False)
    save_quantized(model, tmp_path / "q")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "q" / name).exists(), name
    peer = bnb_dequantize_path(AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu").eval())
    assert type(peer.get_submodule("lm_head")) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(peer(TOKENS).logits, model(TOKENS).logits)


def test_save_quantized_refuses_int4_and_dense(tmp_path):
    _, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    with pytest.raises(ValueError, match="int4 is qlora's own format"):
        save_quantized(load_model(path, quant_type="int4", progress=False), tmp_path / "q")
    with pytest.raises(ValueError, match="no Linear4bit"):
        save_quantized(LlamaForCausalLM(tiny_llama_config()), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def _trained_adapter(tmp_path, path, seed=0):
    model = qlora.prepare_model(load_model(path, progress=False), lora=qlora.LoraConfig(r=8, alpha=16, dropout=0.0),
                                gradient_checkpointing=False, verbose=False)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter is an identity: give it a real update
            p.data = torch.randn(p.shape, generator=g) * 0.02
    qlora.save_adapter(model, tmp_path / "adapter")
    return model.eval()


@pytest.mark.parametrize("cls, config", ARCHS)
def test_merge_matches_the_unmerged_qlora_model(tmp_path, cls, config):
    _, path = save_tiny(tmp_path, cls, config)
    qlora_model = _trained_adapter(tmp_path, path)
    merge_adapter(path, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert json.loads((tmp_path / "merged" / "config.json").read_text()).get("quantization_config") is None
    with torch.no_grad():
        a, b = qlora_model(TOKENS).logits.float(), merged(TOKENS).logits.float()
    # Stated tolerance: bf16(W + sBA) x vs bf16(W) x + s B A x differ by bf16 rounding of weights and
    # activations, about 2^-8 relative: 2% of the logit range bounds it with room.
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    assert (a - b).abs().max() > 0  # it really is a different computation path


def test_merge_requantize_warns_with_the_measured_error(tmp_path):
    _, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    _trained_adapter(tmp_path, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_adapter(path, tmp_path / "adapter", tmp_path / "m4", requantize=True)
    messages = [str(w.message) for w in caught if "re-quantizing" in str(w.message)]
    assert messages and "x the size of the LoRA update" in messages[0]
    assert json.loads((tmp_path / "m4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "m4", device_map="cpu")


def test_merge_with_an_adapter_of_another_base_writes_nothing(tmp_path):
    _, small = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config(), name="small")
    _trained_adapter(tmp_path, small)
    big_config = tiny_llama_config()
    big_config.intermediate_size = 96
    _, other = save_tiny(tmp_path, LlamaForCausalLM, big_config, name="other")
    with pytest.raises(ValueError, match="lora_B.weight.*another base|needs"):
        merge_adapter(other, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_merge(tmp_path, capsys):
    _, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    _trained_adapter(tmp_path, path)
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m2")]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "m2").exists()


def test_atomic_directory_keeps_the_old_output_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "half.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert (out / "keep.txt").read_text() == "old" and not (out / "half.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_merge_folds_a_dora_adapter(tmp_path):
    _, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    model = qlora.prepare_model(load_model(path, compute_dtype=torch.float32, progress=False),
                                lora=qlora.LoraConfig(r=8, alpha=16, dropout=0.0, use_dora=True),
                                compute_dtype=torch.float32, gradient_checkpointing=False, verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qlora.DoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
                m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(m.out_features, generator=g))
    qlora.save_adapter(model, tmp_path / "dora")
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "dora"), "--output",
                 str(tmp_path / "m16")]) == 0
    merge_adapter(path, tmp_path / "dora", tmp_path / "m32", dtype=torch.float32)
    with torch.no_grad():
        want = model.eval()(TOKENS).logits
        base = load_model(path, compute_dtype=torch.float32, progress=False)(TOKENS).logits
        exact = AutoModelForCausalLM.from_pretrained(tmp_path / "m32", dtype=torch.float32)(TOKENS).logits
        bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16").eval()(TOKENS).logits.float()
    assert (want - base).abs().max() > 0.05  # the adapter matters
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-4)  # g (W + s B A) folded in float32
    assert (bf16 - want).abs().max() <= 0.02 * want.abs().max()  # the 16-bit merge: bf16 rounding only
