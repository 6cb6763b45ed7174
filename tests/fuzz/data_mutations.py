"""The data-row and recipe fuzz strategy (tests/fuzz/test_data_fuzz.py and benchmarks/fuzz.py).

Seeds: one row of each shape (alpaca, input/output, prompt/completion, messages, text) as JSONL
and JSON, alpaca rows as CSV, and a YAML recipe. `mutate` truncates at a line or anywhere, flips
bits, inserts non-UTF-8 or NUL bytes, or puts another JSON token after a quote, colon or comma.
The property (`DataCase`, `RecipeCase`): reading (and tokenizing) the seed's bytes gives the
seed's rows; any other bytes give rows or a QloraError naming the file (a recipe may name the
flag instead), never another exception; under 5 s, and read_rows' traced allocations under 8x
the file size + 1 MiB (rows as Python objects: a few times the text).
"""
from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import yaml
from fuzzing import MIB, bounded, flip_bits

from qlora.errors import QloraError
from qlora.rows import read_rows
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
SEED_ROWS = {".jsonl": ROWS, ".json": ROWS, ".csv": CSV_ROWS}
RECIPE = yaml.safe_dump({"lora_r": 8, "lr": 1e-4, "epochs": 2.0, "packing": True, "model": None,
                         "target_modules": "q_proj,v_proj"}).encode()
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"


def mutate(seed: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a text seed: its kind and the bytes."""
    kind = rng.choice(["same", "truncate-line", "truncate", "flip", "non-utf8", "retype"])
    if kind == "same":
        return kind, seed
    if kind == "truncate-line":
        ends = [i + 1 for i, b in enumerate(seed) if b == ord("\n")]
        return kind, seed[: rng.choice(ends or [0])]
    if kind == "truncate":
        return kind, seed[: rng.randrange(len(seed) + 1)]
    if kind == "flip":
        return kind, flip_bits(seed, rng, most=6)
    if kind == "non-utf8":
        at = rng.randrange(len(seed) + 1)
        return kind, seed[:at] + rng.choice([b"\xff", b"\xc3", b"\x00", b"\r"]) + seed[at:]
    token = rng.choice([b'"x"', b'"', b"1", b"null", b"[", b"{}", b"[]", b"1e999", b"9" * 5000, b"true"])
    at = rng.choice([i for i, b in enumerate(seed) if b in b'":,'] or [0])
    return kind, seed[: at + 1] + token + seed[at + 1:]


def tokenizer():
    """The tiny model's tokenizer with a chat template (for the messages row)."""
    from transformers import AutoTokenizer

    from qlora.assets import asset_path

    tok = AutoTokenizer.from_pretrained(asset_path("tiny-llama"))
    tok.chat_template = TEMPLATE
    return tok


class DataCase:
    """One mutated data file per call, cycling .jsonl / .json / .csv; returns the outcome."""

    def __init__(self, workdir: Path, tok=None) -> None:
        self.workdir, self.tok = workdir, tok or tokenizer()
        self.expected = {}
        for suffix, seed in SEEDS.items():
            path = workdir / f"seed{suffix}"
            path.write_bytes(seed)
            assert [r for _, r in read_rows(path)] == SEED_ROWS[suffix]
            self.expected[suffix] = self.tokenized(path)
            assert len(self.expected[suffix]) == len(SEED_ROWS[suffix])

    def tokenized(self, path: Path) -> list | QloraError:
        rows = bounded(lambda: read_rows(path), path.stat().st_size * 8 + MIB)
        if isinstance(rows, QloraError):
            return rows
        try:
            examples, _ = D.tokenize_rows(rows, self.tok, 64)
        except QloraError as e:
            return e
        return [(e.input_ids, e.labels) for e in examples]

    def __call__(self, rng: random.Random) -> str:
        suffix = rng.choice(list(SEEDS))
        kind, data = mutate(SEEDS[suffix], rng)
        return f"{suffix} {kind}: {self.check(suffix, data)}"

    def check(self, suffix: str, data: bytes) -> str:
        path = self.workdir / f"case{suffix}"
        path.write_bytes(data)
        got = self.tokenized(path)  # anything but a QloraError propagates: a finding
        if data == SEEDS[suffix]:
            assert got == self.expected[suffix], "the seed's bytes read differently"
        if isinstance(got, QloraError):
            assert str(path) in str(got), got
            return "rejected"
        return "read"


class RecipeCase:
    """One mutated YAML recipe per call; returns the outcome."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "recipe.yaml"

    def __call__(self, rng: random.Random) -> str:
        kind, data = mutate(RECIPE, rng)
        return f"{kind}: {self.check(data)}"

    def check(self, data: bytes) -> str:
        self.path.write_bytes(data)
        got = bounded(lambda: validate(TrainConfig(**read_recipe(self.path))), len(data) * 8 + MIB)
        if isinstance(got, QloraError):
            assert str(self.path) in str(got) or str(got).startswith("--"), got  # the file, or the flag validate names
            return "rejected"
        if data == RECIPE:
            assert (got.lora_r, got.lr, got.packing) == (8, 1e-4, True)
        return "read"
