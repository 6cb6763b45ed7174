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


def test_split_and_batches_are_deterministic():
    examples = [D.Example(list(range(n)), list(range(n))) for n in range(1, 30)]
    train, held = D.split(examples, 0.1, seed=3)
    assert len(held) == 3 and len(train) == 26 and D.split(examples, 0.1, seed=3)[1] == held
    b1, b2 = D.Batches(train, 4, 7, True, 0), D.Batches(train, 4, 7, True, 0)
    for k in (5, 0, 13, 6):  # random access gives the same batches in any order
        assert b1.batch(k)["input_ids"].equal(b2.batch(k)["input_ids"])
    widths = [b1.batch(k)["input_ids"].shape[1] for k in range(6)]
    assert min(widths) < max(widths) // 2  # grouped by length: not every batch padded to the longest row


def test_grouped_batches_leave_out_random_rows_not_the_longest():
    """Rows that do not fill a last batch sit out one epoch at random; grouping by length must
    not make them always the longest (it did: sorted before the cut, the longest never trained)."""
    examples = [D.Example(list(range(n)), list(range(n))) for n in range(1, 56)]  # 55 rows, batch 8: 7 out
    batches = D.Batches(examples, 8, 0, True, 0)
    seen: dict[int, int] = {}
    for epoch in range(8):
        rows = [i for b in batches._epoch_order(epoch) for i in b]
        assert len(rows) == len(set(rows)) == 48
        for i in rows:
            seen[i] = seen.get(i, 0) + 1
    assert len(seen) == 55  # every row, the longest included, trained in some epoch
    longest = [b.batch(k)["input_ids"].shape[1] for b in [batches] for k in range(8 * batches.per_epoch)]
    assert max(longest) == 55


def _docs(lengths, seed=0):
    import random

    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(3, 300) for _ in range(n)]
        out.append(D.Example(ids, [D.IGNORE] * (n // 2) + ids[n // 2:]))
    return out


def test_pack_keeps_every_document_whole_and_apart():
    import random

    rng = random.Random(1)
    lengths = [rng.randint(2, 64) for _ in range(300)]
    docs = _docs(lengths)
    rows = D.pack(docs, 64)
    assert all(len(r.input_ids) <= 64 and sum(r.lengths) == len(r.input_ids) == len(r.labels) for r in rows)
    # every document once, whole; its first label -100 (nothing predicted across a boundary), the rest as it was
    found = []
    for r in rows:
        start = 0
        for n in r.lengths:
            ids, labels = r.input_ids[start: start + n], r.labels[start: start + n]
            match = [i for i, d in enumerate(docs) if d.input_ids == ids]
            assert match and labels == [D.IGNORE, *docs[match[0]].labels[1:]]
            found.append(match[0])
            start += n
    assert sorted(found) == list(range(len(docs)))
    # best fit: a document opens a row only when no row has room, so no two rows are both half empty
    assert sum(len(r.input_ids) <= 32 for r in rows) <= 1
    assert sum(lengths) / (64 * len(rows)) > 0.95  # on this set: 169 rows of 64 for 10376 tokens
    assert D.pack(docs, 64) == rows  # a function of the rows alone: a resumed run packs the same
    with pytest.raises(ValueError, match="1 to 64"):
        D.pack(_docs([65]), 64)


def test_collate_packed_rows_restarts_positions_at_each_document():
    rows = [D.Example([5, 6, 7, 8, 9], [D.IGNORE, 6, D.IGNORE, 8, 9], (2, 3)), D.Example([1, 2, 3], [D.IGNORE, 2, 3], (3,))]
    batch = D.collate(rows, pad=0, multiple=4)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4]]  # padding: its own
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    assert batch["labels"][0].tolist() == [D.IGNORE, 6, D.IGNORE, 8, 9, D.IGNORE, D.IGNORE, D.IGNORE]
    assert "position_ids" not in D.collate([D.Example([1, 2], [1, 2])], pad=0)


@pytest.mark.parametrize("mode", ["truncate", "split", "drop"])
def test_long_rows_are_truncated_split_or_dropped(tok, tmp_path, mode):
    path = write_rows(tmp_path / "t.jsonl", [{"text": "word " * 40}, {"text": "short"}])
    bos = [tok.bos_token_id] if tok("x")["input_ids"][:1] == [tok.bos_token_id] else []
    whole = [*bos, *tok("word " * 40, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(whole) > 3 * 16 + 1
    examples, skipped = D.tokenize_rows(D.read_rows(path), tok, 16, long_rows=mode)
    pieces = [e.input_ids for e in examples[:-1]]
    assert [len(e.input_ids) for e in examples[-1:]] == [len(tok("short", add_special_tokens=False)["input_ids"]) + len(bos) + 1]
    if mode == "truncate":
        assert pieces == [whole[:16]] and skipped == 0
    elif mode == "split":  # the pieces are the row, cut at every 16 tokens (a last piece of one token has no target)
        assert sum(pieces, []) == whole[: len(whole) - (len(whole) % 16 == 1)] and skipped == 0
        assert all(len(p) == 16 for p in pieces[:-1])
    else:
        assert pieces == [] and skipped == 1
    with pytest.raises(ValueError, match="long_rows"):
        D.tokenize_rows(D.read_rows(path), tok, 16, long_rows="wrap")
