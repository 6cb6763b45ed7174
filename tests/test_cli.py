"""`qlora` on hostile input: one line `qlora CMD: error: ...` on stderr, exit 2; --debug: the traceback.

    python -m pytest tests/test_cli.py -q
"""
import os
import shutil
import struct

import pytest
import torch

from qlora.assets import asset_path
from qlora.cli import main
from qlora.errors import QloraError


def _one_error_line(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1:]
    assert len(err) == 1 and err[0].startswith(f"qlora {command}: error: "), err
    for needle in needles:
        assert needle in err[0]
    return err[0]


def _model_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(asset_path("tiny-llama") / "config.json", model)
    return model


def test_corrupt_safetensors(tmp_path, capsys, monkeypatch):
    model = _model_dir(tmp_path)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]")
    argv = ["quantize", "--model", str(model), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    _one_error_line(capsys, "quantize", "model.safetensors", "not an object")
    with pytest.raises(QloraError):
        main(["--debug", *argv])
    monkeypatch.setenv("QLORA_DEBUG", "1")
    with pytest.raises(QloraError):
        main(argv)


class _Code:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_pickle_holding_code(tmp_path, capsys):
    model = _model_dir(tmp_path)
    torch.save({"w": torch.zeros(2), "x": _Code()}, model / "pytorch_model.bin")
    assert main(["quantize", "--allow-pickle", "--model", str(model), "--output", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys, "quantize", "pytorch_model.bin", "convert the checkpoint to safetensors")
    assert "weights_only=False" not in line


@pytest.mark.parametrize("text, needles", [
    ("lora_r: 8\nlr: [0.1\n", ["bad.yaml:3:1: not valid YAML"]),
    ("- lora_r\n", ["bad.yaml", "a YAML list"]),
    ("lora_rank: 8\n", ["bad.yaml", "unknown key(s) ['lora_rank']"]),
    ("lora_r: eight\n", ["bad.yaml", "lora_r: expected int, got str 'eight'"]),
])
def test_bad_recipe(tmp_path, capsys, text, needles):
    (tmp_path / "bad.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    _one_error_line(capsys, "train", *needles)


def test_missing_recipe(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    _one_error_line(capsys, "train", "none.yaml: no such file")


def test_empty_data_file_is_named(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["train", "--data", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, "train", "empty.jsonl: no usable rows")


def test_bad_row_is_named_by_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    assert main(["train", "--data", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, "train", "bad.jsonl:2: field 'text' must be a string")


def test_export_needs_a_gguf_base(tmp_path, capsys):
    from qlora.assets import asset_path

    out = tmp_path / "out.gguf"
    assert main(["export", "--gguf", str(out), "--model", str(asset_path("tiny-llama")), "--adapter",
                 str(tmp_path)]) == 2
    _one_error_line(capsys, "export", "needs a GGUF base")
    assert not out.exists()


def test_calibration_text_too_short_is_named(tmp_path, capsys):
    from qlora.assets import asset_path

    (tmp_path / "few.txt").write_text("a few words")
    assert main(["quantize", "--model", str(asset_path("tiny-llama")), "--calibrate", str(tmp_path / "few.txt"),
                 "--output", str(tmp_path / "q")]) == 2
    _one_error_line(capsys, "quantize", "few.txt", "the calibration needs 128 x 512")
    assert not (tmp_path / "q").exists()
