"""Preference tuning: DPO and ORPO on rows {"prompt", "chosen", "rejected"}.

    qlora train --method dpo --data pairs.jsonl --beta 0.1 [--loss-type sigmoid|ipo] [--precompute-ref]
    qlora train --method orpo --data pairs.jsonl --beta 0.1

Rows: "prompt" is a string, or a list of {"role", "content"} messages rendered by the
tokenizer's chat template (with the generation prompt); "chosen" and "rejected" are strings,
or lists of assistant messages (rendered after the prompt, the completion is what the template
adds). Each completion ends with eos, like an SFT row; the prompt is tokenized once and
shared. A pair longer than --max-length keeps its start (the completions are cut); a pair
whose prompt leaves no completion token, or a malformed row, raises DataError naming
file:line, or is skipped and counted with --skip-bad-rows.

A micro-batch of B pairs is 2B rows, chosen and rejected interleaved (c0, r0, c1, r1, ...), so
a rank's contiguous share under torchrun holds whole pairs. A sequence's log-probability is
the sum of its completion tokens' log-probs, from the fused head (model/loss.py
token_log_probs: no [tokens, vocab] logits). With pi the policy and ref the reference:

- DPO (sigmoid): -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) per pair; IPO:
  ((pi_c - ref_c) / |c| - (pi_r - ref_r) / |r| - 1 / (2 beta))^2 (TRL's length-normalized
  form). The reference is the same 4-bit base with the adapters switched off
  (nn/lora.py adapters_disabled): one model in memory. Its log-probs are computed without
  gradients in eval mode, per micro-batch, or once before training (--precompute-ref).
  Rewards: beta (pi - ref).
- ORPO: NLL of the chosen completion - beta log sigmoid(log odds), with per-token average
  log-probs a_c, a_r and log odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)); no
  reference. With --train-on-prompt the NLL also covers the chosen rows' prompt tokens, as
  TRL's ORPOTrainer computes it. Rewards: beta a (TRL's).

Normalization across micro-batches and ranks, as SFT's token mean: the pair terms are divided
by the step's pairs and the NLL by the step's chosen tokens. Metrics per step, over its
pairs: reward margin (chosen - rejected), reward accuracy (share with chosen > rejected),
chosen and rejected rewards. Tests: tests/train/test_preference.py (against TRL's
DPOTrainer and ORPOTrainer on a fixed batch).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.loss import IGNORE, flat_positions, token_log_probs
from ..nn.lora import adapters_disabled
from ..rows import DataError
from . import data as D

METHODS = ("sft", "dpo", "orpo")
LOSS_TYPES = ("sigmoid", "ipo")
STATS = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")


@dataclass
class Pair:
    """A tokenized preference row: the shared prompt, both completions (eos included), and the
    reference log-probabilities of the completions once precomputed."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None

    @property
    def input_ids(self) -> list[int]:
        """The longer of the two sequences (its length groups pairs by length)."""
        return self.prompt + max(self.chosen, self.rejected, key=len)


# ---- rows -> pairs -------------------------------------------------------------------------------
def _messages(where: str, value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise DataError(f"{where}: field {key!r} must be a string or a non-empty list of "
                        "{'role': str, 'content': str} messages")
    return value


def render_pair(where: str, row, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of a preference row; chat rows through the template."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise DataError(f"{where}: a preference row needs 'prompt', 'chosen' and 'rejected'; missing {missing} "
                        f"(keys {sorted(map(str, row))})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        texts = [D._text(where, row, k) for k in ("prompt", "chosen", "rejected")]
        return texts[0], texts[1], texts[2]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: a 'prompt' of messages needs a tokenizer with a chat template")
    prompt = _messages(where, prompt, "prompt")
    head = D._chat(where, tokenizer, prompt, add_generation_prompt=True)
    out = [head]
    for key in ("chosen", "rejected"):
        value = row[key]
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"{where}: field {key!r} is missing or empty")
            out.append(value)
            continue
        full = D._chat(where, tokenizer, prompt + _messages(where, value, key))
        if not full.startswith(head):
            raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the "
                            f"conversation with {key!r}")
        out.append(full[len(head):])
    return out[0], out[1], out[2]


def tokenize_pairs(rows: list[tuple[str, dict]], tokenizer, max_length: int,
                   skip_bad_rows: bool = False) -> tuple[list[Pair], int]:
    """(pairs, skipped rows). The prompt starts with bos if the tokenizer adds one to plain
    text; each completion ends with eos; prompt + completion is cut to max_length."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    pairs, skipped = [], 0
    for where, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            prompt, chosen, rejected = render_pair(where, row, tokenizer)
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, chosen, rejected)]
            p = ([bos] if adds_bos else []) + ids[0]
            room = max_length - len(p)
            completions = [(c + ([eos] if eos is not None else []))[:max(room, 0)] for c in ids[1:]]
            if not p:
                raise DataError(f"{where}: the prompt is empty once tokenized")
            if room <= 0 or not all(completions):
                raise DataError(f"{where}: nothing to learn once cut to --max-length {max_length} "
                                f"(the prompt has {len(p)} tokens)")
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        pairs.append(Pair(p, completions[0], completions[1]))
    if not pairs:
        source = re.sub(r"(:\d+|\[\d+\])$", "", rows[0][0]) if rows else "the data"
        raise DataError(f"{source}: no usable preference rows ({skipped} skipped as malformed)")
    return pairs, skipped


def collate_pairs(batch: list[Pair], pad: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """2B right-padded rows, chosen and rejected interleaved: input_ids, attention_mask,
    labels (the completion tokens; -100 on prompts and padding), prompt_mask (1 on prompt
    tokens), and ref_logps [2B] once the pairs hold them."""
    rows = [(e.prompt, c) for e in batch for c in (e.chosen, e.rejected)]
    width = -(-max(len(p) + len(c) for p, c in rows) // multiple) * multiple
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p):n] = torch.tensor(c)
        mask[i, :n] = 1
        prompt_mask[i, :len(p)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_mask": prompt_mask}
    if all(e.ref is not None for e in batch):
        out["ref_logps"] = torch.tensor([r for e in batch for r in e.ref], dtype=torch.float32)
    return out


class PairBatches(D.Batches):
    """D.Batches over pairs: the same seeded order (grouped by the longer sequence), collated
    into interleaved chosen / rejected rows."""

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_order(epoch)
        return collate_pairs([self.examples[j] for j in self._order[i]], self.pad, self.multiple)


def split(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) pairs: the seeded share of data.split."""
    return D.split(pairs, fraction, seed)


# ---- the objective -------------------------------------------------------------------------------
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def sequence_log_probs(model, batch: dict[str, torch.Tensor], keep: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row sum of the completion tokens' log-probs [rows], per-token log-probs at `keep`
    (default: the completion tokens), row-major, and the row of each). The completion tokens
    are picked by the trainer's host-built `target_index` where the batch has one (no device
    sync); another `keep` by its positions (a device sync)."""
    labels = batch["labels"]
    index = batch.get("target_index") if keep is None else None
    logps = token_log_probs(model, batch, keep)
    if index is None:
        index = flat_positions(labels[:, 1:] != IGNORE if keep is None else keep)
    index = index.to(logps.device)
    rows = index // labels.shape[1]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logps.device)
    if keep is None:  # every kept token is a completion token
        return sums.index_add(0, rows, logps), logps, rows
    scored = labels.to(logps.device).reshape(-1).index_select(0, index + 1) != IGNORE
    return sums.index_add(0, rows, torch.where(scored, logps, 0.0)), logps, rows


@torch.no_grad()
def reference_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference model's completion log-probs per row [rows]: the same model with its
    adapters switched off, in eval mode (no dropout), without gradients."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(inner):
            return sequence_log_probs(model, batch)[0]
    finally:
        model.train(was_training)


@dataclass
class Preference:
    """DPO or ORPO as a training objective of the loop (see the module docstring)."""

    method: str = "dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    train_on_prompt: bool = False

    def _nll_keep(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """ORPO's NLL positions (after the shift): the chosen rows' completion tokens, and their
        prompt tokens with train_on_prompt."""
        keep = batch["labels"][:, 1:] != IGNORE
        if self.train_on_prompt:
            keep = keep | (batch["prompt_mask"][:, 1:] == 1)
        keep = keep.clone()
        keep[1::2] = False
        return keep

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """The denominators this share adds to (host tensors, no device sync)."""
        counts = {"pairs": batch["input_ids"].shape[0] // 2}
        if self.method == "orpo":
            counts["nll_tokens"] = int(self._nll_keep(batch).sum())
        return counts

    def sums(self, model, batch: dict[str, torch.Tensor], counts: dict[str, int] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({denominator: loss sum over this share}, {stat: sum over its pairs}) for a micro-batch
        share (`counts`, this share's `counts()`, is not needed here)."""
        completion = batch["labels"][:, 1:] != IGNORE
        lengths = completion.sum(1).to(batch["input_ids"].device).float()
        if self.method == "dpo":
            ref = batch.get("ref_logps")
            ref = reference_log_probs(model, batch) if ref is None else ref.to(lengths.device)
            policy = sequence_log_probs(model, batch)[0]
            ratio = policy - ref
            chosen, rejected = ratio[0::2], ratio[1::2]
            if self.loss_type == "ipo":
                delta = chosen / lengths[0::2].clamp(min=1) - rejected / lengths[1::2].clamp(min=1)
                losses = (delta - 1 / (2 * self.beta)) ** 2
            else:
                losses = -F.logsigmoid(self.beta * (chosen - rejected))
            terms = {"pairs": losses.sum()}
            rewards = self.beta * ratio.detach()
        else:
            # the NLL's tokens: every kept token of a chosen (even) row (its completion, and with
            # train_on_prompt its prompt, which only then is kept: picked by its positions)
            keep = completion | self._nll_keep(batch) if self.train_on_prompt else None
            sums, token_logps, rows = sequence_log_probs(model, batch, keep)
            nll = -(token_logps * (rows % 2 == 0)).sum()
            average = sums / lengths.clamp(min=1)
            a_c, a_r = average[0::2], average[1::2]
            log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
            terms = {"nll_tokens": nll, "pairs": -self.beta * F.logsigmoid(log_odds).sum()}
            rewards = self.beta * average.detach()
        chosen_r, rejected_r = rewards[0::2], rewards[1::2]
        stats = {"reward_margin": (chosen_r - rejected_r).sum(), "reward_accuracy": (chosen_r > rejected_r).sum().float(),
                 "chosen_reward": chosen_r.sum(), "rejected_reward": rejected_r.sum()}
        return terms, stats


@torch.no_grad()
def precompute_reference(model, pairs: list[Pair], batch_size: int, pad: int, multiple: int = 1,
                         progress: bool = False) -> None:
    """Set each pair's `ref` to the reference log-probs of its completions, batch_size pairs a
    forward. Under torchrun every rank computes every pair (FSDP2 needs every rank in every
    forward), so all ranks hold the same values without a gather."""
    from tqdm import tqdm

    for s in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", unit="batch", disable=not progress):
        chunk = pairs[s:s + batch_size]
        batch = collate_pairs([Pair(p.prompt, p.chosen, p.rejected) for p in chunk], pad, multiple)
        device = next(p for p in model.parameters()).device
        ref = reference_log_probs(model, {k: v.to(device) for k, v in batch.items()}).cpu().tolist()
        for i, p in enumerate(chunk):
            p.ref = (ref[2 * i], ref[2 * i + 1])


@torch.no_grad()
def evaluate_pairs(model, objective: Preference, pairs: list[Pair], batch_size: int, pad: int,
                   multiple: int = 1) -> dict[str, float]:
    """Mean loss and stats over held-out pairs: {"eval_loss", "eval_reward_accuracy", ...}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for s in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[s:s + batch_size], pad, multiple).items()}
        for k, n in objective.counts(batch).items():
            counts[k] = counts.get(k, 0) + n
        terms, stats = objective.sums(model, batch)
        for k, v in {**{f"term_{k}": v for k, v in terms.items()}, **stats}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    model.train(was_training)
    out = {"eval_loss": sum(totals[f"term_{k}"] / max(counts[k], 1) for k in counts)}
    out.update({f"eval_{k}": totals[k] / max(counts["pairs"], 1) for k in STATS})
    return out

