"""`qlora` on hostile input: one line `qlora CMD: error: ...` on stderr, exit 2; --debug: the traceback.

    python -m pytest tests/test_cli.py -q
"""
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora import Linear4bit, load_model, prepare_model, save_adapter
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


# ---- SIGKILL mid-way: nothing half-written at the output, and a rerun works ---------------------
PAUSE_AT = """
import importlib, sys, time
module, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
mod, calls = importlib.import_module(module), [0]
real = getattr(mod, name)
def paused(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        print("PAUSED", flush=True)
        time.sleep(600)
    return real(*args, **kwargs)
setattr(mod, name, paused)
from qlora.cli import main
sys.exit(main(sys.argv[4:]))
"""


def kill_midway(module: str, name: str, nth: int, argv: list[str]) -> None:
    """Run `qlora ARGV` in a subprocess and SIGKILL it at its `nth` call of `module.name`."""
    child = subprocess.Popen([sys.executable, "-c", PAUSE_AT, module, name, str(nth), *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in child.stdout:
        if line.startswith("PAUSED"):
            break
    child.kill()
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before the kill point"


def test_sigkill_during_calibration_leaves_nothing_and_a_rerun_works(tmp_path):
    from transformers import LlamaConfig

    from qlora.model.random_checkpoint import write_random_checkpoint

    # tiny-llama's tokenizer on 4 layers of width 64 (GPTQ's time grows with the widths: 256 took 8 s)
    base, work = tmp_path / "base", tmp_path / "work"
    write_random_checkpoint(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                        vocab_size=4096), base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(asset_path("tiny-llama") / name, base)
    work.mkdir()
    out = work / "q"
    argv = ["quantize", "--model", str(base), "--calibrate", str(asset_path("instructions.jsonl")),
            "--calibrate-rows", "4", "--calibrate-seq", "64", "--output", str(out)]
    kill_midway("qlora.model.calibrate", "gptq_quantize", 9, argv)  # layer 2 of 4
    assert list(work.iterdir()) == []
    assert main(argv) == 0
    assert sorted(p.name for p in work.iterdir()) == ["q"]
    model = load_model(out, progress=False)
    assert isinstance(model.model.layers[3].mlp.down_proj, Linear4bit)


def test_sigkill_during_gguf_export_leaves_the_old_file_and_a_rerun_works(tmp_path):
    from qlora.model.gguf_file import read_gguf

    sys.path.insert(0, str(Path(__file__).parent / "model"))
    from tiny_gguf import write_tiny_gguf

    (tmp_path / "base").mkdir()
    _, base = write_tiny_gguf("llama", tmp_path / "base", num_hidden_layers=4)  # 39 tensors
    model = prepare_model(load_model(base, progress=False), quant_type=None, verbose=False)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the previous export")
    argv = ["export", "--gguf", str(out), "--model", str(base), "--adapter", str(tmp_path / "adapter")]
    kill_midway("qlora.model.gguf_file", "_encode_tensor", 20, argv)  # 19 tensors written to the temp file
    left = sorted(p.name for p in tmp_path.iterdir())
    assert out.read_bytes() == b"the previous export"
    assert len(left) == 4 and left[0].startswith(".out.gguf.tmp-"), left  # the killed writer's temp file
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out.gguf"]  # the rerun removed it
    written = read_gguf(out)
    assert written.tensors.keys() == read_gguf(base).tensors.keys()


# ---- every subcommand: bad input is a typed error, printed as one line -----------------------------
BAD_INPUT = {  # {tiny}: the tiny model, {gguf}: a text file named .gguf, {data}: one data row, {tmp}: a fresh dir
    "report: missing model": ("quantize-report --model {tmp}/none", "no such file"),
    "report: not safetensors": ("quantize-report --model {tmp}/header.safetensors", "not a readable safetensors file"),
    "report: blocksize": ("quantize-report --model {tiny} --blocksize 48", "unsupported blocksize 48"),
    "quantize: mislabelled gguf": ("quantize --model {gguf} --output {tmp}/q", "text.gguf: magic is not b'GGUF'"),
    "quantize: int4 for bitsandbytes": ("quantize --model {tiny} --quant-type int4 --output {tmp}/q",
                                        "int4 is qlora's own format"),
    "quantize: calibrate rows": ("quantize --model {tiny} --calibrate {data} --calibrate-rows 0 --output {tmp}/q",
                                 "--calibrate-rows 0"),
    "quantize: output under a file": ("quantize --model {tiny} --output {data}/q", "cannot write a directory there"),
    "merge: no adapter": ("merge --model {tiny} --adapter {tmp} --output {tmp}/m", "adapter_config.json not found"),
    "export: mislabelled gguf": ("export --gguf {tmp}/o.gguf --model {gguf} --adapter {tmp}", "magic is not b'GGUF'"),
    "generate: max tokens": ("generate --model {tiny} --prompt hi --max-new-tokens 0", "--max-new-tokens >= 1"),
    "generate: no adapter": ("generate --model {tiny} --prompt hi --adapter {tmp}", "adapter_config.json not found"),
    "explain: topic": ("explain nonsense", "unknown topic(s) ['nonsense']"),
    "memory: model": ("memory --model {gguf}", "magic is not b'GGUF'"),
    "memory: seq len": ("memory --model llama-7b --seq-len 0", "must be >= 1"),
    "train: targets": ("train --model {tiny} --data {data} --target-modules zzz --output {tmp}/t",
                       "['zzz'] match no linear layer"),
    "train: schedule": ("train --model {tiny} --data {data} --schedule zzz", "--schedule must be one of"),
    "train: blocksize": ("train --model {tiny} --data {data} --blocksize 48", "--blocksize must be"),
    "train: data is a model": ("train --model {tiny} --data {gguf}", "unsupported file type '.gguf'"),
}


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_a_typed_error_on_one_line(tmp_path, capsys, name):
    (tmp_path / "header.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    (tmp_path / "text.gguf").write_bytes(b"this is no GGUF file, whatever its name")
    (tmp_path / "rows.jsonl").write_text('{"text": "hello"}\n')
    command, needle = BAD_INPUT[name]
    argv = command.format(tiny=asset_path("tiny-llama"), gguf=tmp_path / "text.gguf", data=tmp_path / "rows.jsonl",
                          tmp=tmp_path).split()
    assert main(argv) == 2
    _one_error_line(capsys, argv[0], needle)
    with pytest.raises(QloraError, match=re.escape(needle)):
        main(["--debug", *argv])
