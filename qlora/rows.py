"""Data files -> rows: JSONL, JSON or CSV, or a Hub dataset (needs `datasets`).

    rows = read_rows("data.jsonl")      # [(where, dict)], where = "file:line" (or "file[i]")

A line of a JSONL file that is not JSON becomes (where, DataError) in its place, so that the
caller decides whether to stop or skip and count it; a file that cannot be read at all raises
DataError naming the file. Used by the training data (train/data.py) and the calibration text
(model/calibrate.py). Tests: tests/train/test_data.py, tests/fuzz/test_data_fuzz.py.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import QloraError


class DataError(QloraError, ValueError):
    """A row or file that cannot be used; the message starts with file:line."""


def read_rows(source: str | Path) -> list[tuple[str, dict]]:
    """(where, row) pairs from a .jsonl/.json/.csv file, or a Hub dataset (needs `datasets`)."""
    path = Path(source)
    if not path.exists():
        if str(source).count("/") == 1 and not str(source).startswith((".", "/")):
            return _hub_rows(str(source))
        raise DataError(f"{source}: no such file (expected .jsonl, .json or .csv, or a Hub dataset id)")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")
    try:
        rows = _file_rows(path, suffix)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise DataError(f"{path}: no usable rows (the file holds none)")
    return rows


def _file_rows(path: Path, suffix: str) -> list[tuple[str, dict]]:
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"{path}:{i}", DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})")))
            except (ValueError, RecursionError) as e:  # a number too long, nesting too deep
                rows.append((f"{path}:{i}", DataError(f"{path}:{i}: not usable JSON ({e})")))
        return rows
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # a number too long, nesting too deep
            raise DataError(f"{path}: not usable JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}:1: expected a JSON list of rows (or {{\"data\": [...]}})")
        return [(f"{path}[{i}]", row) for i, row in enumerate(data)]
    with open(path, newline="", encoding="utf-8") as f:
        return [(f"{path}:{i}", dict(row)) for i, row in enumerate(csv.DictReader(f), 2)]


def _hub_rows(name: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: not a local file; Hub datasets need `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown dataset
        raise DataError(f"{name}: could not load the Hub dataset ({type(e).__name__}: {e}); pass a local file") from None
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)]
