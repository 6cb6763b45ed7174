"""Training data: rows from JSONL / JSON / CSV (or a Hub dataset) -> token ids and labels.

    rows = read_rows("data.jsonl")                      # [(where, dict)], where = "file:line" (qlora/rows.py)
    examples, skipped = tokenize_rows(rows, tokenizer, max_length=512)
    train, held = split(examples, 0.05, seed=42)         # the eval rows are held out before packing
    rows = pack(train, max_length=512)                  # documents side by side, kept apart (below)
    batches = Batches(rows, batch_size=4, seed=42, group_by_length=False, pad=pad_id(tokenizer))

Row shapes (detected per row):
    {"instruction", "input"?, "output"}   Alpaca: prompt rendered with ALPACA templates
    {"input", "output"}, {"prompt", "completion"}
    {"messages": [{"role", "content"}, ...]}  the tokenizer's chat template; loss on assistant turns
    {"text"}                              plain language modelling
Labels are -100 on prompts (unless train_on_prompt) and on padding. A malformed row raises
DataError naming file:line and the reason, or is skipped and counted with skip_bad_rows.
Padding uses the pad token, else eos, else 0: no new token, no embedding resize.
A row longer than --max-length is truncated, split into max-length documents, or dropped
(`long_rows`).

Packing (`pack`, the default of `qlora train`): rows are placed side by side in rows of at
most max_length tokens (best fit, longest first: a deterministic function of the rows, so a
resumed run finds the same rows). Each keeps its own documents apart: `collate` gives
position ids that restart at every document, the model confines attention to each document
(model/packing.py), and the first label of every document is -100, so no label is predicted
across a boundary. Only the padding at a row's end remains.
"""
from __future__ import annotations

import bisect
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..model.loss import IGNORE
from ..rows import DataError, read_rows

ALPACA = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


LONG_ROWS = ("truncate", "split", "drop")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    lengths: tuple[int, ...] = ()
    """A packed row: the lengths of its documents, in order (they sum to len(input_ids)); () for one."""


def _text(where: str, row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise DataError(f"{where}: field {key!r} is missing or empty")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def render(where: str, row: dict, tokenizer) -> list[tuple[str, bool]]:
    """The row as (text, trained) segments in order; trained=False segments are prompts."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _render_chat(where, row["messages"], tokenizer)
    if "instruction" in row:
        instruction, extra = _text(where, row, "instruction"), _text(where, row, "input", required=False)
        prompt = (ALPACA_INPUT if extra else ALPACA).format(instruction=instruction, input=extra)
        return [(prompt, False), (_text(where, row, "output"), True)]
    if "prompt" in row or "completion" in row:
        return [(_text(where, row, "prompt"), False), (_text(where, row, "completion"), True)]
    if "input" in row or "output" in row:
        return [(_text(where, row, "input"), False), (_text(where, row, "output"), True)]
    if "text" in row:
        return [(_text(where, row, "text"), True)]
    raise DataError(
        f"{where}: unknown row shape with keys {sorted(map(str, row))}; expected instruction/output, input/output, "
        "prompt/completion, messages or text"
    )


def _render_chat(where: str, messages, tokenizer) -> list[tuple[str, bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' rows need a tokenizer with a chat template")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = _chat(where, tokenizer, messages[:i], add_generation_prompt=True)
            after = _chat(where, tokenizer, messages[: i + 1])
            if not before.startswith(done) or not after.startswith(before):
                raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
            segments += [(before[len(done):], False), (after[len(before):], True)]
            done = after
    full = _chat(where, tokenizer, messages)
    if len(full) > len(done) and full.startswith(done):
        segments.append((full[len(done):], False))
    return segments


def _chat(where: str, tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template is code: its raise_exception (jinja2), a role or key it lacks
        raise DataError(f"{where}: the chat template rejects these messages ({type(e).__name__}: {e})") from None


def tokenize_rows(rows: list[tuple[str, dict]], tokenizer, max_length: int, train_on_prompt: bool = False,
                  skip_bad_rows: bool = False, long_rows: str = "truncate") -> tuple[list[Example], int]:
    """(examples, skipped rows). Each example starts with bos if the tokenizer adds one to
    plain text and ends with eos. A row longer than max_length is cut to max_length
    (long_rows="truncate"), cut into pieces of max_length, each its own example, those with
    something to learn kept ("split"), or dropped and counted as skipped ("drop")."""
    if long_rows not in LONG_ROWS:
        raise ValueError(f"long_rows must be one of {', '.join(LONG_ROWS)}, got {long_rows!r}")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]  # do what the tokenizer does for text
    examples, skipped = [], 0
    for where, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            ids: list[int] = []
            labels: list[int] = []
            if adds_bos:
                ids.append(bos)
                labels.append(IGNORE)
            for text, trained in render(where, row, tokenizer):
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if trained or train_on_prompt else [IGNORE] * len(piece)
            if eos is not None:
                ids.append(eos)
                labels.append(eos)
            if len(ids) > max_length and long_rows == "drop":
                skipped += 1
                continue
            cut = len(ids) if long_rows == "split" else max_length
            pieces = [Example(ids[i: i + max_length], labels[i: i + max_length]) for i in range(0, cut, max_length)]
            pieces = [p for p in pieces if any(label != IGNORE for label in p.labels[1:])]
            if not pieces:
                raise DataError(f"{where}: nothing to learn once cut to --max-length {max_length} (the prompt fills it)")
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        examples += pieces
    if not examples:
        source = re.sub(r"(:\d+|\[\d+\])$", "", rows[0][0]) if rows else "the data"  # where = file:line or file[i]
        raise DataError(f"{source}: no usable rows ({skipped} skipped as malformed"
                        f"{' or longer than --max-length' if long_rows == 'drop' else ''})")
    return examples, skipped


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Packed rows of at most max_length tokens: best fit, longest first (each example goes
    into the fullest row it fits in, else a new row; ties by position), so the rows are a
    deterministic function of `examples`. A row keeps its documents' lengths, and the first
    label of each document is -100: no label is predicted from the document before it."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted: the fullest row that fits is found by bisection
    for i in order:
        n = len(examples[i].input_ids)
        if not 0 < n <= max_length:
            raise ValueError(f"pack: example {i} has {n} tokens; every example must have 1 to {max_length}")
        j = bisect.bisect_left(room, (n, -1))
        if j == len(room):
            rows.append([i])
            left, r = max_length - n, len(rows) - 1
        else:
            left, r = room.pop(j)
            rows[r].append(i)
            left -= n
        if left:
            bisect.insort(room, (left, r))
    return [_join([examples[i] for i in row]) for row in rows]


def _join(docs: list[Example]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for d in docs:
        ids += d.input_ids
        labels += [IGNORE, *d.labels[1:]]
    return Example(ids, labels, tuple(len(d.input_ids) for d in docs))


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded, fixed share held out for eval (at least one row when fraction > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def collate(batch: list[Example], pad: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding), the length rounded
    up to a multiple of `multiple`: fewer distinct shapes for the GEMM libraries to cache
    primitives for (on the demo, bf16 on oneDNN: 924 -> 269 MiB peak, 12% more tokens/s).
    Packed rows also get position_ids, restarting at each document (and at the padding, which
    is a document of its own): the model keeps the documents apart by them (model/packing.py)."""
    width = -(-max(len(e.input_ids) for e in batch) // multiple) * multiple
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.lengths for e in batch):
        out["position_ids"] = torch.stack([torch.cat([torch.arange(n) for n in (
            *(e.lengths or (len(e.input_ids),)), width - len(e.input_ids)) if n]) for e in batch])
    return out


class Batches:
    """Micro-batches in a seeded order, epoch after epoch; `batch(k)` is the k-th overall.

    The order depends only on (seed, epoch), so a resumed run finds micro-batch k again
    without replaying the data. group_by_length sorts each shuffled window of 50 batches
    by length (less padding, still random across windows).
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, group_by_length: bool, pad: int,
                 multiple: int = 1):
        self.examples, self.batch_size, self.seed, self.group, self.pad = examples, batch_size, seed, group_by_length, pad
        self.multiple = multiple
        self.per_epoch = max(1, len(examples) // batch_size)
        self._epoch, self._order = -1, []

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        idx = list(range(len(self.examples)))
        rng.shuffle(idx)
        # the rows left out of this epoch (fewer than a batch) are a random few: cut before sorting,
        # or the longest rows of the last window would be left out of every epoch
        idx = idx[: self.per_epoch * self.batch_size]
        if self.group:
            window = self.batch_size * 50
            for s in range(0, len(idx), window):
                idx[s: s + window] = sorted(idx[s: s + window], key=lambda i: len(self.examples[i].input_ids))
        batches = [idx[i: i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_order(epoch)
        return collate([self.examples[j] for j in self._order[i]], self.pad, self.multiple)


def eval_batches(examples: list[Example], batch_size: int, pad: int, multiple: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i: i + batch_size], pad, multiple)
