"""Fuzz the data and recipe readers: mutated files give the seed's rows or a QloraError.

    python -m pytest tests/fuzz/test_data_fuzz.py -q

Seeds: one row of each shape (alpaca, input/output, prompt/completion, messages, text) as
JSONL, JSON and CSV, and a YAML recipe. Mutations: truncate at row boundaries or anywhere,
flip bits, insert non-UTF-8 bytes, swap a value for another JSON type. The property: reading
and tokenizing returns the seed's examples when the bytes are the seed's, else examples or a
QloraError, never another exception; the read allocates less than the file size + 1 MiB
beyond the tokenizer's own work (tracemalloc peak of read_rows alone).
"""
import csv
import io
import json
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from qlora.assets import asset_path
from qlora.errors import QloraError
from qlora.train import data as D
from qlora.train.config import TrainConfig, read_recipe, validate

ROWS = [
    {"instruction": "Add one.", "input": "x", "output": "return x + 1"},
    {"input": "2+2=", "output": "4"},
    {"prompt": "Say hi:", "completion": " hi"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"text": "plain text"},
]
CSV_ROWS = [ROWS[0], {"instruction": "Say hi.", "input": "", "output": "hi"}]  # a CSV file holds one row shape


def _csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


SEEDS = {
    ".jsonl": "".join(json.dumps(r) + "\n" for r in ROWS).encode(),
    ".json": json.dumps(ROWS, indent=1).encode(),
    ".csv": _csv(CSV_ROWS),
}
RECIPE = yaml.safe_dump({"lora_r": 8, "lr": 1e-4, "epochs": 2.0, "packing": True, "model": None,
                         "target_modules": "q_proj,v_proj"}).encode()
_DIR = Path(tempfile.mkdtemp(prefix="qlora-fuzz-"))
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def tok():
    t = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    t.chat_template = TEMPLATE
    return t


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    kind = draw(st.sampled_from(["same", "truncate_line", "truncate", "flip", "utf8", "retype"]))
    if kind == "same":
        return seed
    if kind == "truncate_line":
        ends = [i + 1 for i, b in enumerate(seed) if b == ord("\n")]
        return seed[: draw(st.sampled_from(ends or [0]))]
    if kind == "truncate":
        return seed[: draw(st.integers(0, len(seed)))]
    if kind == "flip":
        data = bytearray(seed)
        for i in draw(st.lists(st.integers(0, len(seed) * 8 - 1), min_size=1, max_size=6)):
            data[i // 8] ^= 1 << (i % 8)
        return bytes(data)
    if kind == "utf8":
        at = draw(st.integers(0, len(seed)))
        return seed[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\r"])) + seed[at:]
    token = draw(st.sampled_from([b'"x"', b'"', b"1", b"null", b"[", b"{}", b"[]", b"1e999", b"9" * 5000, b"true"]))
    starts = [i for i, b in enumerate(seed) if b in b'":,']
    at = draw(st.sampled_from(starts or [0]))
    return seed[: at + 1] + token + seed[at + 1:]


def _tokenized(path: Path, tok) -> tuple[list | QloraError, int]:
    tracemalloc.start()
    try:
        rows = D.read_rows(path)
        peak = tracemalloc.get_traced_memory()[1]
    except QloraError as e:
        return e, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        examples, _ = D.tokenize_rows(rows, tok, 64)
    except QloraError as e:
        return e, peak
    return [(e.input_ids, e.labels) for e in examples], peak


@pytest.mark.parametrize("suffix", SEEDS)
def test_the_seeds_read_exactly(tok, suffix):
    path = _DIR / f"seed{suffix}"
    path.write_bytes(SEEDS[suffix])
    assert [r for _, r in D.read_rows(path)] == (CSV_ROWS if suffix == ".csv" else ROWS)


@pytest.mark.parametrize("suffix", SEEDS)
def test_mutated_data_files_read_or_raise_a_qlora_error(tok, suffix):
    path = _DIR / f"seed{suffix}"
    path.write_bytes(SEEDS[suffix])
    expected, _ = _tokenized(path, tok)
    assert isinstance(expected, list) and len(expected) == len(CSV_ROWS if suffix == ".csv" else ROWS)

    @settings(max_examples=70, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(SEEDS[suffix]))
    def check(data):
        file = _DIR / f"m{suffix}"
        file.write_bytes(data)
        got, peak = _tokenized(file, tok)  # anything but a QloraError propagates and fails
        assert peak < len(data) * 8 + (1 << 20)  # rows as Python objects: a few times the text
        if data == SEEDS[suffix]:
            assert got == expected
        if isinstance(got, QloraError):
            assert str(file) in str(got)

    check()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(mutated(RECIPE))
def test_mutated_recipes_read_or_raise_a_qlora_error(data):
    file = _DIR / "recipe.yaml"
    file.write_bytes(data)
    try:
        cfg = validate(TrainConfig(**read_recipe(file)))
    except QloraError as e:
        assert str(file) in str(e) or str(e).startswith("--")  # the file, or the flag validate names
        return
    if data == RECIPE:
        assert (cfg.lora_r, cfg.lr, cfg.packing) == (8, 1e-4, True)
