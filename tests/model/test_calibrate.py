"""qlora/model/calibrate.py on the shipped tiny Llama (pretrained on Python's standard library):
a calibrated checkpoint is a plain bitsandbytes one, and it is closer to the 16-bit model.

    pytest tests/model/test_calibrate.py
"""
import inspect
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora
from qlora.assets import asset_path
from qlora.model.calibrate import calibration_ids, load_calibrated
from qlora.rows import DataError

from tiny_models import bnb_dequantize_path

MODEL = str(asset_path("tiny-llama"))


def test_calibrated_checkpoint_loads_in_bitsandbytes_and_beats_absmax(tmp_path):
    import collections
    import json as js

    calib = tmp_path / "calib.txt"
    calib.write_text(inspect.getsource(collections))
    held_out = inspect.getsource(js.decoder) + inspect.getsource(js.encoder)
    model = load_calibrated(MODEL, str(calib), rows=8, seq=128, compute_dtype=torch.float32, progress=False)
    assert all(isinstance(model.get_submodule(f"model.layers.0.{n}"), qlora.Linear4bit)
               for n in ("self_attn.q_proj", "mlp.down_proj"))
    qlora.save_quantized(model, tmp_path / "cal")
    config = json.loads((tmp_path / "cal" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    peer = bnb_dequantize_path(AutoModelForCausalLM.from_pretrained(tmp_path / "cal", device_map="cpu",
                                                                    dtype=torch.float32).eval())
    import bitsandbytes.functional as bnbF

    # bitsandbytes decodes the file to our weights (layers whose rows are whole blocks: its CPU
    # decode is wrong for 688-wide rows, formats.md section 10; those keep absmax codes here anyway)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"):
        theirs = peer.get_submodule(f"model.layers.1.{name}").weight
        ours = model.get_submodule(f"model.layers.1.{name}").weight.dequantize(torch.float32)
        assert torch.equal(bnbF.dequantize_4bit(theirs.data, theirs.quant_state).float(), ours)
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = tok(held_out, return_tensors="pt").input_ids[:, :256]
    dense = qlora.load_model(MODEL, quant_type="none", compute_dtype=torch.float32, progress=False)
    absmax = qlora.load_model(MODEL, compute_dtype=torch.float32, progress=False)
    with torch.no_grad():  # held-out text: the calibrated model's logits are closer to the 16-bit model's
        want = dense(ids).logits
        calibrated, plain = (float((m(ids).logits - want).norm() / want.norm()) for m in (model, absmax))
    assert calibrated < 0.9 * plain, (calibrated, plain)
    same = qlora.load_model(tmp_path / "cal", compute_dtype=torch.float32, progress=False)
    assert torch.equal(same.model.layers[1].mlp.down_proj._packed, model.model.layers[1].mlp.down_proj._packed)


def test_calibration_windows_from_data_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"say {i}", "output": "word " * 30}) + "\n" for i in range(20)))
    ids = calibration_ids(AutoTokenizer.from_pretrained(MODEL), str(rows), rows=4, seq=32)
    assert ids.shape == (4, 32) and ids.dtype == torch.long
    with pytest.raises(DataError, match="rows.jsonl.*calibration needs"):
        calibration_ids(AutoTokenizer.from_pretrained(MODEL), str(rows), rows=400, seq=512)


BAD_CALIBRATION = {
    "rows.jsonl": ('{"text": "a b c"}\n{"id": 3}\n', r"rows.jsonl:2: no text in this row"),  # a row with no text field
    "cut.jsonl": ('{"text": "a b c"}\n{"text": "d e', r"cut.jsonl:2: not valid JSON"),  # truncated mid-row
    "list.json": ('[{"text": "a"}, 7]', r"list.json\[1\]: no text in this row \(int"),
    "model.txt": (b"GGUF\x03\x00\x00\x00\xff\xfe" + bytes(range(256)), r"model.txt: cannot read calibration text"),
    "data.jsonl": (b"\xff\xfe{}", r"data.jsonl: not UTF-8"),  # mislabelled: binary named .jsonl
    "missing.txt": (None, r"missing.txt: cannot read calibration text"),
}


@pytest.mark.parametrize("name", BAD_CALIBRATION)
def test_bad_calibration_data_is_named(tmp_path, name):
    content, match = BAD_CALIBRATION[name]
    if isinstance(content, str):
        (tmp_path / name).write_text(content)
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        calibration_ids(AutoTokenizer.from_pretrained(MODEL), str(tmp_path / name), rows=1, seq=2)


def _fp32_peer(path):
    """transformers + bitsandbytes on `path`, computing in float32 like the qlora side."""
    peer = bnb_dequantize_path(AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32))
    for p in peer.parameters():  # the norms and embeddings it keeps in the checkpoint dtype (bf16)
        if p.is_floating_point():
            p.data = p.data.float()
    for m in peer.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.float32
    return peer.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_loftq_base_and_adapter_reproduce_in_transformers_bitsandbytes_and_peft(tmp_path):
    """`qlora quantize --init loftq`: the 4-bit base + loftq_init/ (PEFT's layout: init_lora_weights
    true, base_model_name_or_path = the base) give the same logits in transformers + bitsandbytes
    + PEFT as in qlora, and start closer to the 16-bit model than absmax does."""
    import inspect as ins

    import peft

    from qlora.cli import main

    main(["quantize", "--model", MODEL, "--output", str(tmp_path / "base"), "--init", "loftq", "--lora-r", "8",
          "--lora-alpha", "32", "--loftq-iters", "2", "--keep-16bit", "mlp.down_proj"])
    # (down_proj stays 16-bit: its 688-wide rows are not whole blocks, which bitsandbytes' CPU
    # decode gets wrong, formats.md section 10)
    config = json.loads((tmp_path / "base" / "loftq_init" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8 and config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = tok(ins.getsource(json.decoder), return_tensors="pt").input_ids[:, :128]

    ours = qlora.load_model(tmp_path / "base", compute_dtype=torch.float32, progress=False)
    qlora.load_adapter(ours, tmp_path / "base" / "loftq_init")
    peer = _fp32_peer(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(peer, str(tmp_path / "base" / "loftq_init")).eval()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-4, atol=1e-4)

    dense = qlora.load_model(MODEL, quant_type="none", compute_dtype=torch.float32, progress=False)
    absmax = load_calibrated(MODEL, None, keep_16bit=["mlp.down_proj"], compute_dtype=torch.float32, progress=False)
    want = _logits(dense, ids)
    err = {k: float((_logits(m, ids) - want).norm() / want.norm()) for k, m in (("loftq", ours), ("absmax", absmax))}
    assert err["loftq"] < 0.9 * err["absmax"], err


def test_keep_16bit_layers_stay_exact_and_load_in_transformers(tmp_path):
    model = load_calibrated(MODEL, None, keep_16bit=["mlp.down_proj"], compute_dtype=torch.float32, progress=False)
    dense = qlora.load_model(MODEL, quant_type="none", compute_dtype=torch.float32, progress=False)
    for i, layer in enumerate(model.model.layers):
        assert type(layer.mlp.down_proj) is torch.nn.Linear and isinstance(layer.mlp.up_proj, qlora.Linear4bit)
        assert torch.equal(layer.mlp.down_proj.weight, dense.model.layers[i].mlp.down_proj.weight)
    qlora.save_quantized(model, tmp_path / "kept")
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["llm_int8_skip_modules"]
    ids = torch.arange(3, 67).view(1, -1)
    peer = _fp32_peer(tmp_path / "kept")
    again = qlora.load_model(tmp_path / "kept", compute_dtype=torch.float32, progress=False)
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=0, atol=0)
    torch.testing.assert_close(_logits(peer, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def test_calibration_streams_one_layer_at_a_time(tmp_path):
    """The 16-bit weights are read one decoder layer at a time; when layer i's arrive, every
    other layer holds only 4-bit linears (the peak: one layer in float32)."""
    from qlora.model.calibrate import calibrate_model, checkpoint_weights

    model = qlora.load_model(MODEL, compute_dtype=torch.float32, progress=False)
    fetch = checkpoint_weights(MODEL, model)
    asked = []

    def weights(names):
        layer = {n.split(".")[2] for n in names}
        assert len(layer) == 1, names
        dense = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith("model.layers")]
        assert not dense, dense
        asked.append(layer.pop())
        return fetch(names)

    ids = torch.randint(3, 4000, (4, 32))
    results = calibrate_model(model, ids, weights, progress=False, batch_size=4)
    assert asked == [str(i) for i in range(len(model.model.layers))]
    assert set(results) == {n for n, m in model.named_modules() if isinstance(m, qlora.Linear4bit)
                            and n.startswith("model.layers")}


def test_keep_16bit_auto_fills_the_budget_with_the_most_sensitive_per_byte(tmp_path):
    from qlora.model.calibrate import calibrate_model, checkpoint_weights, keep_most_sensitive

    calib = tmp_path / "calib.txt"
    import collections

    calib.write_text(inspect.getsource(collections))
    ids = calibration_ids(AutoTokenizer.from_pretrained(MODEL), str(calib), rows=4, seq=64)
    model = qlora.load_model(MODEL, compute_dtype=torch.float32, progress=False)
    sens: dict = {}
    calibrate_model(model, ids, checkpoint_weights(MODEL, model), progress=False, batch_size=4, sensitivity=sens)
    linears = {n for n, m in model.named_modules() if isinstance(m, qlora.Linear4bit) and ".layers." in n}
    assert set(sens) == linears and all(v > 0 for v in sens.values())
    cost = {n: model.get_submodule(n).weight.numel() * 4 - model.get_submodule(n).weight.nbytes for n in sens}
    ranked = sorted(sens, key=lambda n: sens[n] / cost[n], reverse=True)
    budget = cost[ranked[0]] + cost[ranked[1]]
    kept = keep_most_sensitive(model, sens, budget, checkpoint_weights(MODEL, model))
    assert list(kept)[:2] == ranked[:2] and sum(kept.values()) <= budget
    dense = qlora.load_model(MODEL, quant_type="none", compute_dtype=torch.float32, progress=False)
    for name in kept:
        assert torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight)



def test_self_generated_calibration_text_is_the_models_own_and_reproducible():
    from qlora.model.calibrate import generated_ids

    model = qlora.load_model(MODEL, compute_dtype=torch.float32, progress=False)
    a, b, c = generated_ids(model, 3, 48), generated_ids(model, 3, 48), generated_ids(model, 3, 48, seed=1)
    assert a.shape == (3, 48) and torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():  # the model finds its own samples far likelier than random tokens
        own = model(a, labels=a).loss
        noise = model(torch.randint_like(a, 3, 4000), labels=torch.randint_like(a, 3, 4000)).loss
    assert own < noise - 1.0, (own, noise)
