"""The causal-LM loss without full logits: output head and cross-entropy fused, chunk by chunk.

    loss = causal_lm_loss(model, batch)     # the value and gradients of model(**batch).loss
    logps = token_log_probs(model, batch)   # per labelled token log p, for sequence log-probs (DPO)

transformers computes logits [batch, seq, vocab] for every position, a float32 copy, the
log-softmax and, in backward, their gradients: at vocab 32000 and 4 x 512 tokens that is
about 1 GB at the peak of a step, and the head's matmuls run for prompt tokens whose label
is -100 too. Here:
- only target positions (label != -100 after the one-token shift) go through the head, picked
  by index (`target_index`): the trainer builds the index on the host from the CPU batch, so
  the device never reports a count back (a boolean mask would: a sync per micro-batch);
- they go in chunks of `chunk_tokens` rows, so one chunk of logits exists at a time;
- the gradient w.r.t. the hidden states, (softmax - onehot) W / n, is computed in the
  forward pass while the chunk's logits are at hand. Backward only scales it: no logits
  are saved and none are recomputed (the idea of Liger-Kernel's fused linear
  cross-entropy), so the head costs the same matmuls as before, minus the prompt rows.
The arithmetic follows transformers': logits in the head's dtype, upcast to float32,
mean over target tokens. `token_log_probs` runs the same chunks but keeps each token's
log-probability (its gradient row saved unscaled, scaled in backward by what the caller's loss
makes of it). Models whose head does more than a plain frozen linear map
(soft-capping, logit scaling, LoRA or training on the head) use `model(**batch).loss`.
Under torchrun (DDP, FSDP2) the model's forward is swapped for this loss during the call,
so the wrappers' hooks run around it (FSDP2's root gathers the head first).
Tests: tests/model/test_loss.py.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .packing import model_inputs

IGNORE = -100
FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
"""Architectures whose logits are exactly lm_head(final hidden states); others fall back."""
CHUNK_BYTES = 64 << 20
"""Float32 logits per chunk, at most (64 MiB: 512 rows at vocab 32000)."""


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
              grad_div: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE(h W^T + b, y) per row [c] (float32) and, unless grad_div is None, its gradient
    w.r.t. h divided by grad_div, (softmax - onehot) W / grad_div [c, hidden]: one chunk of
    float32 logits, the softmax computed in place."""
    logits = F.linear(h, weight, bias).float()
    picked = logits.gather(1, y)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()  # in place: no second [chunk, vocab] tensor (torch.logsumexp makes one)
    sums = probs.sum(dim=-1, keepdim=True)
    ce = (top + sums.log() - picked).squeeze(1)
    if grad_div is None:
        return ce, None
    probs.div_(sums)  # softmax
    probs.scatter_add_(1, y, torch.full_like(y, -1, dtype=probs.dtype))
    return ce, probs.div_(grad_div).to(weight.dtype) @ weight


class _HeadCrossEntropy(torch.autograd.Function):
    """loss = mean_i CE(h_i W^T + b, y_i) over the rows of h [n, hidden].

    d loss / d h_i = (softmax(h_i W^T + b) - onehot(y_i)) W / n, computed in forward.
    Saves: that gradient [n, hidden] (only when h requires grad); W and b get none (frozen).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, n, chunk):
            ce, g = _chunk_ce(h[s:s + chunk], weight, bias, targets[s:s + chunk, None],
                              None if grad_h is None else n)
            total += ce.sum()
            if grad_h is not None:
                grad_h[s:s + chunk] = g
        ctx.save_for_backward(grad_h)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None, None


class _HeadLogProbs(torch.autograd.Function):
    """logp_i = log softmax(h_i W^T + b)[y_i] for each row of h [n, hidden] (float32 [n]).

    d logp_i / d h_i = (onehot(y_i) - softmax(h_i W^T + b)) W, computed in forward; backward
    scales row i by the incoming gradient of logp_i (a sequence's log-probability is a sum of
    rows, a preference loss weighs each sequence). Saves: those rows [n, hidden] (only when h
    requires grad); W and b get none (frozen).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = h.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, n, chunk):
            ce, g = _chunk_ce(h[s:s + chunk], weight, bias, targets[s:s + chunk, None],
                              None if grad_h is None else -1)
            logps[s:s + chunk] = ce.neg_()
            if grad_h is not None:
                grad_h[s:s + chunk] = g
        ctx.save_for_backward(grad_h)
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_logps.to(grad_h.dtype)[:, None], None, None, None, None


def head_cross_entropy(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                       chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `head(h)` [n, vocab] against `targets` [n], one chunk of logits at a time."""
    if h.shape[0] == 0:
        return h.sum() * 0.0  # no target in the batch: zero loss, zero gradient
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (4 * head.out_features))
    return _HeadCrossEntropy.apply(h, head.weight, head.bias, targets, chunk)


def head_log_probs(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """log softmax(head(h))[targets] per row of h [n, hidden] -> float32 [n], one chunk of logits at a time."""
    if h.shape[0] == 0:
        return h.sum(dim=-1).float() * 0.0  # no row: an empty result, still in the graph
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (4 * head.out_features))
    return _HeadLogProbs.apply(h, head.weight, head.bias, targets, chunk)


def fusable(model: nn.Module) -> bool:
    """True when the model's logits are a plain frozen linear map of its final hidden states."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        getattr(config, "model_type", None) in FUSED_MODEL_TYPES
        and type(head) is nn.Linear
        and not any(p.requires_grad for p in head.parameters())
        and not getattr(config, "final_logit_softcapping", None)
        and hasattr(model, getattr(model, "base_model_prefix", "") or "-")
    )


def _wrapped(model: nn.Module) -> bool:
    """DDP-wrapped or FSDP2-sharded: the loss must be computed inside the model's own forward,
    so that DDP sees the call and FSDP2's root hooks gather the head (and the embeddings)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden states [b, t, hidden]."""
    base = getattr(model, model.base_model_prefix)
    return base(**model_inputs(batch, model.config))[0]


def flat_positions(keep: torch.Tensor) -> torch.Tensor:
    """Flat positions i * t + j where keep[i, j], for `keep` [b, t - 1] over rows of t tokens (the
    positions that predict a next token), int64 in row-major order, on keep's device (there a
    device sync: the count comes back)."""
    rows, cols = keep.nonzero().unbind(1)
    return rows * (keep.shape[1] + 1) + cols


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """`flat_positions` of labels [b, t] whose next token is a target (labels[i, j + 1] != -100)
    (made on the host for a CPU batch)."""
    return flat_positions(labels[:, 1:] != IGNORE)


def _fused_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None) -> torch.Tensor:
    hidden = _hidden(model, batch)
    labels = batch["labels"].to(hidden.device)
    index = batch.get("target_index")  # the trainer's, made on the host (distributed.share)
    index = target_index(labels) if index is None else index.to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    return head_cross_entropy(rows, model.get_output_embeddings(), labels.reshape(-1).index_select(0, index + 1),
                              chunk_tokens)


def _fused_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None) -> torch.Tensor:
    hidden = _hidden(model, batch)
    index = batch.get("target_index")
    index = flat_positions(batch["keep"].to(hidden.device)) if index is None else index.to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    targets = batch["input_ids"].to(hidden.device).reshape(-1).index_select(0, index + 1)
    return head_log_probs(rows, model.get_output_embeddings(), targets, chunk_tokens)


@contextmanager
def _as_forward(model: nn.Module, compute):
    """While open, `model(**batch)` returns `compute(model, batch)` (the hooks around forward
    still run). A forward set on the instance before (e.g. by accelerate's hooks) is put back after."""
    own = vars(model).get("forward")
    model.forward = lambda input_ids, attention_mask=None, **rest: compute(
        model, {"input_ids": input_ids, "attention_mask": attention_mask, **rest})
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token loss over the labelled tokens of `batch` (input_ids, attention_mask, labels;
    a packed batch also position_ids, model/packing.py).

    A DDP-wrapped or FSDP2-sharded model computes it inside its own forward. A batch without
    labelled tokens gives a zero loss (zero gradients), not NaN."""
    inner = _unwrap(model)
    if not fusable(inner):
        out = model(**model_inputs(batch, inner.config), labels=batch["labels"])
        if not bool((batch["labels"][:, 1:] != IGNORE).any()):
            return out.logits.float().sum() * 0.0  # still through the graph: collectives, if any, run
        return out.loss
    compute = lambda m, b: _fused_loss(m, b, chunk_tokens)  # noqa: E731
    if not _wrapped(model):
        return compute(model, batch)
    with _as_forward(inner, compute):
        return model(**batch)


def token_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor | None = None,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(input_ids[i, t+1] | input_ids[i, :t+1]) at each position where keep[i, t] (default:
    labels[:, 1:] != -100, picked by the batch's `target_index` where the trainer made one on
    the host), float32 [kept positions] in row-major order: through the fused head (one chunk
    of logits at a time) like causal_lm_loss, whose per-token terms these are.

    Sum them per row for a sequence's log-probability (preference losses, train/preference.py).
    A DDP-wrapped or FSDP2-sharded model computes them inside its own forward."""
    index = batch.get("target_index") if keep is None else None
    keep = batch["labels"][:, 1:] != IGNORE if keep is None else keep
    inner = _unwrap(model)
    if not fusable(inner):
        logits = model(**model_inputs(batch, inner.config)).logits[:, :-1]
        picked = logits[keep.to(logits.device)].float().log_softmax(-1)
        return picked.gather(1, batch["input_ids"][:, 1:].to(logits.device)[keep][:, None]).squeeze(1)
    compute = lambda m, b: _fused_log_probs(m, b, chunk_tokens)  # noqa: E731
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "keep": keep,
              "target_index": index, **{k: batch[k] for k in ("position_ids", "cu_seq_lens", "max_length") if k in batch}}
    if not _wrapped(model):
        return compute(model, inputs)
    with _as_forward(inner, compute):
        return model(**inputs)
