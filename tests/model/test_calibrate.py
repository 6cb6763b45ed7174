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
