"""Data pipeline: row shapes, masking, chat templates, malformed rows, packing, batching."""
import csv
import json

import pytest
from transformers import AutoTokenizer

from qlora.train import data as D

from conftest import write_rows


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _decode_trained(tok, e):
    return tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != D.IGNORE])


def test_alpaca_loss_only_on_response(tok, tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"instruction": "Add one.", "input": "x", "output": "return x + 1"}])
    (e,), skipped = D.tokenize_rows(D.read_rows(path), tok, 512)
    assert skipped == 0
    assert tok.decode(e.input_ids).startswith("### Instruction:\nAdd one.\n\n### Input:\nx\n\n### Response:\n")
    assert _decode_trained(tok, e) == "return x + 1<|eos|>"
    (e2,), _ = D.tokenize_rows(D.read_rows(path), tok, 512, train_on_prompt=True)
    assert e2.labels == e2.input_ids


@pytest.mark.parametrize("row, trained", [
    ({"input": "2+2=", "output": "4"}, "4<|eos|>"),
    ({"prompt": "Say hi:", "completion": " hi"}, " hi<|eos|>"),
    ({"text": "plain text"}, "plain text<|eos|>"),
])
def test_other_shapes(tok, tmp_path, row, trained):
    (e,), _ = D.tokenize_rows(D.read_rows(write_rows(tmp_path / "r.jsonl", [row])), tok, 512)
    assert _decode_trained(tok, e) == trained


def test_json_and_csv_files(tok, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([{"prompt": "a", "completion": "b"}] * 3))
    with open(tmp_path / "r.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "output"])
        w.writeheader()
        w.writerows([{"instruction": "i", "output": "o"}] * 4)
    assert len(D.tokenize_rows(D.read_rows(tmp_path / "r.json"), tok, 64)[0]) == 3
    assert len(D.tokenize_rows(D.read_rows(tmp_path / "r.csv"), tok, 64)[0]) == 4


def test_chat_rows_train_on_assistant_turns_only(tok, tmp_path):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}]
    (e,), _ = D.tokenize_rows(D.read_rows(write_rows(tmp_path / "c.jsonl", rows)), tok, 512)
    assert _decode_trained(tok, e) == "hello\nciao\n<|eos|>"


def test_chat_rows_need_a_template(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(D.DataError, match=r"c\.jsonl:1: 'messages' rows need a tokenizer with a chat template"):
        D.tokenize_rows(D.read_rows(write_rows(tmp_path / "c.jsonl", rows)), tok, 64)


def test_malformed_rows_name_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n{"instruction": "", "output": "b"}\n'
                    '{"foo": 1}\n{"instruction": "a", "output": 3}\n')
    with pytest.raises(D.DataError, match=r"bad\.jsonl:2: not valid JSON"):
        D.tokenize_rows(D.read_rows(path), tok, 64)
    examples, skipped = D.tokenize_rows(D.read_rows(path), tok, 64, skip_bad_rows=True)
    assert len(examples) == 1 and skipped == 4
    for line, reason in [(3, "'instruction' is missing or empty"), (4, "unknown row shape"), (5, "must be a string")]:
        rows = [r for r in D.read_rows(path) if r[0].endswith(f":{line}")]
        with pytest.raises(D.DataError, match=rf"bad\.jsonl:{line}: .*{reason}"):
            D.tokenize_rows(rows, tok, 64)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        D.read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(D.DataError, match="unsupported file type"):
        D.read_rows(tmp_path / "x.txt")


def test_truncation_and_prompt_filling_everything(tok, tmp_path):
    rows = [{"instruction": "word " * 100, "output": "x"}]
    with pytest.raises(D.DataError, match="nothing to learn once cut to --max-length 16"):
        D.tokenize_rows(D.read_rows(write_rows(tmp_path / "t.jsonl", rows)), tok, 16)
    (e,), _ = D.tokenize_rows(D.read_rows(write_rows(tmp_path / "t.jsonl", [{"text": "word " * 100}])), tok, 16)
    assert len(e.input_ids) == 16


def test_no_pad_token_uses_eos_without_resizing(tok):
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.pad_token = None
    assert D.pad_id(tok2) == tok2.eos_token_id and len(tok2) == len(tok)
    batch = D.collate([D.Example([1, 2, 3], [1, 2, 3]), D.Example([4], [4])], D.pad_id(tok2))
    assert batch["input_ids"][1].tolist() == [4, tok2.eos_token_id, tok2.eos_token_id]
    assert batch["labels"][1].tolist() == [4, D.IGNORE, D.IGNORE] and batch["attention_mask"][1].tolist() == [1, 0, 0]


def test_packing_split_and_batches_are_deterministic():
    examples = [D.Example(list(range(n)), list(range(n))) for n in range(1, 30)]
    packed = D.pack(examples, 16)
    assert all(len(e.input_ids) == 16 for e in packed[:-1]) and sum(len(e.input_ids) for e in packed) == 435
    train, held = D.split(examples, 0.1, seed=3)
    assert len(held) == 3 and len(train) == 26 and D.split(examples, 0.1, seed=3)[1] == held
    b1, b2 = D.Batches(train, 4, 7, True, 0), D.Batches(train, 4, 7, True, 0)
    for k in (5, 0, 13, 6):  # random access gives the same batches in any order
        assert b1.batch(k)["input_ids"].equal(b2.batch(k)["input_ids"])
    widths = [b1.batch(k)["input_ids"].shape[1] for k in range(6)]
    assert max(widths) < 29  # grouped by length: not every batch padded to the longest row


def test_collate_pads_to_a_multiple():
    batch = D.collate([D.Example([1, 2, 3], [1, 2, 3]), D.Example([4], [4])], pad=0, multiple=16)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 4 and (batch["labels"] != D.IGNORE).sum().item() == 4
    assert D.collate([D.Example(list(range(16)), list(range(16)))], pad=0, multiple=16)["input_ids"].shape == (1, 16)
