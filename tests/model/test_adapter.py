"""PEFT-format adapter files: the exact layout, and interop with peft in both directions on
the dequantized base (fp32 compute, so logits agree to 1e-4), plus clear errors."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import dequantized_twin, tiny_model
from torch import nn

import qlora
from qlora import LoraConfig, LoraLinear

peft = pytest.importorskip("peft")


def prepared(arch="llama", seed=0, lora=LoraConfig(r=4, alpha=8, dropout=0.0), **kw):
    model = tiny_model(arch, torch.float32, seed=seed)
    qlora.prepare_model(model, lora=lora, compute_dtype=torch.float32, gradient_checkpointing=False,
                        verbose=False, **kw)
    return model


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)


def logits(model, seed=2):
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_files_follow_the_peft_layout(tmp_path):
    model = prepared()
    randomize_adapters(model)
    qlora.save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["modules_to_save"] is None
    assert config["base_model_name_or_path"] == "tiny-llama" and config["use_rslora"] is False
    assert config["inference_mode"] is True and config["init_lora_weights"] is True
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    assert len(keys) == 2 * 7 * 2
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == torch.float32
    assert torch.equal(a, model.model.layers[0].self_attn.q_proj.lora_A.weight)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_qlora_adapter_loads_in_peft_with_the_same_logits(arch, tmp_path):
    model = prepared(arch)
    randomize_adapters(model)
    qlora.save_adapter(model, tmp_path)
    if arch == "gpt2":
        assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    dense = dequantized_twin(model, arch, torch.float32)
    before = logits(dense)
    theirs = peft.PeftModel.from_pretrained(dense, str(tmp_path))
    ours = logits(model)
    assert (logits(theirs) - before).abs().max() > 1e-2, "the adapter must matter"
    torch.testing.assert_close(ours, logits(theirs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_loads_in_qlora_with_the_same_logits(arch, tmp_path):
    model = prepared(arch, lora=None)  # quantized, no adapters yet
    dense = dequantized_twin(model, arch, torch.float32)
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    cfg = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                          task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2")
    theirs = peft.get_peft_model(dense, cfg)
    randomize_adapters_peft(theirs)
    theirs.save_pretrained(str(tmp_path))
    qlora.load_adapter(model, tmp_path)
    adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(adapted) == 2 * len(targets) and all(m.r == 8 and m.scaling == 4 for m in adapted)
    assert all(m.lora_A.weight.requires_grad for m in adapted)
    torch.testing.assert_close(logits(model), logits(theirs), rtol=1e-4, atol=1e-4)


def randomize_adapters_peft(peft_model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_round_trip_into_an_existing_adapter_and_rank_change(tmp_path):
    src = prepared()
    randomize_adapters(src)
    qlora.save_adapter(src, tmp_path)
    dst = prepared(lora=LoraConfig(r=4, alpha=1, dropout=0.0))  # same base (seed), other alpha
    qlora.load_adapter(dst, tmp_path)
    torch.testing.assert_close(logits(dst), logits(src), rtol=0, atol=0)
    dst16 = prepared(lora=LoraConfig(r=16, alpha=8, dropout=0.0))  # rebuilt at the file's rank
    qlora.load_adapter(dst16, tmp_path)
    assert dst16.model.layers[0].mlp.up_proj.r == 4
    torch.testing.assert_close(logits(dst16), logits(src), rtol=0, atol=0)


def test_partial_targets_are_written_as_full_paths(tmp_path):
    model = prepared(lora=LoraConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    qlora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_mismatched_adapters_get_errors_naming_the_tensor(tmp_path):
    src = prepared()
    randomize_adapters(src)
    qlora.save_adapter(src, tmp_path / "ok")

    other = tiny_model("llama", torch.float32, hidden_size=32, intermediate_size=64, head_dim=8)
    qlora.prepare_model(other, lora=None, compute_dtype=torch.float32, gradient_checkpointing=False, verbose=False)
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight' "
                       r"has shape \(4, 128\); module 'model.layers.0.mlp.down_proj' needs \[r, 64\]"):
        qlora.load_adapter(other, tmp_path / "ok")

    gpt2 = prepared("gpt2", lora=None)
    with pytest.raises(ValueError, match=r"names module 'model.layers.0.mlp.down_proj'.*another base model"):
        qlora.load_adapter(gpt2, tmp_path / "ok")

    # a tensor missing from the file
    bad = tmp_path / "missing"
    bad.mkdir()
    tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    del tensors[key]
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    (bad / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    dst = prepared(lora=None)
    with pytest.raises(ValueError, match=f"tensor '{key}' is missing"):
        qlora.load_adapter(dst, bad)
    # the model's own adapters not covered by the file
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    full = prepared()
    with pytest.raises(ValueError, match=r"lacks tensor base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"):
        qlora.load_adapter(full, bad)
    # B with the wrong shape
    tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    tensors[key] = torch.zeros(64, 5)
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(64, 5\)"):
        qlora.load_adapter(full, bad)
    # nothing was changed by the failed loads
    assert not any(isinstance(m, LoraLinear) for m in dst.modules())


def test_unsupported_or_broken_files(tmp_path):
    model = prepared(lora=None)
    with pytest.raises(qlora.CheckpointError, match="adapter_config.json"):
        qlora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="LORA adapters only"):
        qlora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        qlora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 256)},
              str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lora_embedding_A' is not a LoRA weight"):
        qlora.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        qlora.save_adapter(model, tmp_path / "out")
    with pytest.raises(qlora.CheckpointError, match="Embedding, not a linear layer"):
        save_file({"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 256),
                   "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(64, 4)},
                  str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
        qlora.load_adapter(model, tmp_path)
    assert isinstance(model.model.embed_tokens, nn.Embedding)


# ---- DoRA (nn/dora.py) in PEFT's format, against peft's DoRA on a bitsandbytes base -------------
def _bnb_base(tmp_path):
    """A tiny Llama checkpoint, qlora's NF4 model of it (fp32 compute), and transformers +
    bitsandbytes loading qlora's saved 4-bit checkpoint (fp32 compute): the same base weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    from test_load import TOKENS, save_tiny, tiny_llama_config
    from tiny_models import bnb_dequantize_path

    _, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    model = qlora.load_model(path, compute_dtype=torch.float32, progress=False)
    qlora.save_quantized(model, tmp_path / "nf4")
    fp32 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    peer = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu", quantization_config=fp32,
                                                dtype=torch.float32)
    return model, bnb_dequantize_path(peer), TOKENS


def test_qlora_dora_adapter_loads_in_peft_on_bitsandbytes_with_the_same_logits(tmp_path):
    model, peer, TOKENS = _bnb_base(tmp_path)
    qlora.prepare_model(model, lora=LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True), quant_type=None,
                        compute_dtype=torch.float32, gradient_checkpointing=False, verbose=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qlora.DoraLinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
                m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m.out_features, generator=g))
    qlora.save_adapter(model, tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    with safe_open(str(tmp_path / "dora" / "adapter_model.safetensors"), "pt") as f:
        magnitude = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector")
    assert config["use_dora"] is True and magnitude.shape == (64,)
    with torch.no_grad():
        base = peer(TOKENS).logits
    theirs = peft.PeftModel.from_pretrained(peer, str(tmp_path / "dora")).eval()
    with torch.no_grad():
        ours, got = model.eval()(TOKENS).logits, theirs(TOKENS).logits
    assert (got - base).abs().max() > 1e-2, "the adapter must matter"
    torch.testing.assert_close(ours, got, rtol=1e-4, atol=1e-4)


def test_peft_dora_adapter_on_bitsandbytes_loads_in_qlora_with_the_same_logits(tmp_path):
    model, peer, TOKENS = _bnb_base(tmp_path)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                          use_dora=True, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(peer, cfg)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(str(tmp_path / "peft"))
    qlora.load_adapter(model, tmp_path / "peft")
    adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(adapted) == 6 and all(isinstance(m, qlora.DoraLinear) for m in adapted)
    assert all(m.lora_magnitude_vector.requires_grad for m in adapted)
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(TOKENS).logits, theirs(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_dora_files_that_disagree_with_their_config_are_refused(tmp_path):
    model = prepared(lora=LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True))
    qlora.save_adapter(model, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    target = prepared(lora=None)
    save_file({**tensors, key: torch.ones(3)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"needs tensor '{key}' of shape \(64,\); it has \(3,\)"):
        qlora.load_adapter(target, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="is a DoRA magnitude, but adapter_config.json does not say use_dora"):
        qlora.load_adapter(target, tmp_path)
    assert not any(isinstance(m, LoraLinear) for m in target.modules())
