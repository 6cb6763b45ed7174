"""Learning-rate schedules and gradient clipping: the two knobs applied around each step.

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule("cosine", 100, 10_000))
    # or: sched = scheduler(opt, "cosine", warmup_steps=100, total_steps=10_000)
    total_norm = clip_grad_norm(model.parameters(), 0.3)   # the QLoRA recipe's max norm
    opt.step(); sched.step()
    step_back(sched)   # only for a step the optimizer skipped: undoes sched.step()

Tested by `pytest tests/optim/test_schedule.py` (transformers' schedules are the oracle).

`lr_schedule(name, warmup_steps, total_steps)` returns the multiplier of the base lr at
step s (what LambdaLR wants), with the same formulas as transformers' get_*_schedule:
- "constant": 1. A warmup with it is an error: the reference QLoRA scripts asked for a
  3% warmup with a constant schedule and silently got none (formats.md section 7).
- "constant_with_warmup": s / warmup while s < warmup, then 1.
- "linear": warmup, then (total - s) / (total - warmup), never below 0.
- "cosine": warmup, then 0.5 * (1 + cos(pi * progress)), progress 0 -> 1 over the rest.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..errors import InputError

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def lr_schedule(name: str, warmup_steps: int = 0, total_steps: int | None = None) -> Callable[[int], float]:
    """The lr multiplier at step s for schedule `name` (see the module docstring)."""
    if name not in SCHEDULES:
        raise InputError(f"lr_schedule: unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise InputError(f"lr_schedule: warmup_steps must be >= 0, got {warmup_steps}")
    if name == "constant":
        if warmup_steps:
            raise ValueError(
                f"lr_schedule: 'constant' takes no warmup (got warmup_steps={warmup_steps}); "
                "use 'constant_with_warmup'"
            )
        return _constant
    if name in ("linear", "cosine") and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(
            f"lr_schedule: {name!r} needs total_steps > warmup_steps, got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps}"
        )

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if name == "constant_with_warmup":
            return 1.0
        assert total_steps is not None
        if name == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return multiplier


def _constant(step: int) -> float:
    return 1.0


def scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int = 0, total_steps: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer` following `lr_schedule(name, warmup_steps, total_steps)`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(name, warmup_steps, total_steps))


def step_back(sched: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Undo `sched.step()`: the last step's learning rates again (for a step the optimizer
    skipped on the device: train/loop.py), bit for bit what LambdaLR set then."""
    sched.last_epoch -= 1
    sched._step_count -= 1
    lrs = [base_lr * lmbda(sched.last_epoch) for lmbda, base_lr in zip(sched.lr_lambdas, sched.base_lrs)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def clip_grad_norm(
    params: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = True,
) -> torch.Tensor:
    """Scale all gradients so their global `norm_type` norm is at most `max_norm`.

    The same scaling as torch.nn.utils.clip_grad_norm_ (grad *= min(1, max_norm /
    (norm + 1e-6))). Returns the norm before clipping. Parameters without a gradient are
    skipped. With `error_if_nonfinite` (default) a NaN or infinite norm raises, naming how
    many gradients are not finite, since a step on them would corrupt the optimizer state.
    """
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if hasattr(total, "full_tensor"):  # FSDP2: DTensor gradients give a DTensor norm; take the global value
        total = total.full_tensor()
    if error_if_nonfinite and not torch.isfinite(total):
        bad = sum(int(not torch.isfinite(g).all()) for g in grads)
        raise RuntimeError(
            f"clip_grad_norm: total gradient norm is {total.item()}; {bad} of {len(grads)} gradients hold "
            "NaN or inf (check the loss, the learning rate, or pass error_if_nonfinite=False)"
        )
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
