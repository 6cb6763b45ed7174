"""What the user sees of a run: metrics.jsonl, the summary, the loss plot, demo generations.

    <output>/metrics.jsonl   one JSON object per optimizer step (step, loss, lr, grad_norm,
                             tokens, tokens_per_s, elapsed_s, peak_mem_mb; dpo/orpo also
                             reward_margin, reward_accuracy, chosen_reward, rejected_reward)
                             and per eval (step, eval_loss, eval_ppl; dpo/orpo: eval_loss and
                             eval_reward_*); TensorBoard too when installed
    <output>/summary.json    final/best eval loss, tokens/s, peak memory, adapter path (dpo/orpo:
                             the final reward accuracy and margin, train and eval)
    <output>/loss.png        training and eval loss curves (dpo/orpo: reward accuracy and margin
                             below)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .data import ALPACA


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of a run on `device`: that GPU's allocator peak, else the process high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from .peak import peak_bytes

    return peak_bytes() / 2**20


class Metrics:
    """Append-only metrics.jsonl (lines after `truncate_after` are dropped, for resume)."""

    def __init__(self, path: Path, truncate_after: int = 0):
        self.path = path
        kept = []
        if path.exists() and truncate_after > 0:
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= truncate_after]
        path.write_text("".join(line + "\n" for line in kept))
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:  # tensorboard not installed
            self._tb = None

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        """Flush the TensorBoard events (its writer buffers them on a thread)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_loss(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    preference = any("reward_accuracy" in r for r in rows)
    fig, axes = plt.subplots(2 if preference else 1, 1, figsize=(7, 7 if preference else 4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss" if preference else "loss (nats/token)", title="qlora train")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        _plot_rewards(axes[1, 0], rows)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_rewards(ax, rows: list[dict]) -> None:
    """Reward accuracy (left axis) and margin (right axis) per step, and at each eval."""
    for key, style, label in (("reward_accuracy", "-", "accuracy"), ("eval_reward_accuracy", "o-", "eval accuracy")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, lw=1, color="tab:green")
    ax.set(xlabel="optimizer step", ylabel="reward accuracy", ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    right = ax.twinx()
    for key, style, label in (("reward_margin", "-", "margin"), ("eval_reward_margin", "o-", "eval margin")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            right.plot(*zip(*points), style, label=label, lw=1, color="tab:purple")
    right.set(ylabel="reward margin (chosen - rejected)")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="lower right")


DEMO_PROMPTS = {"instructions.jsonl": "instructions_prompts.json", "demo_chat.jsonl": "demo_prompts.json"}


def demo_prompts(data: str | None) -> list[str] | None:
    """The before/after prompts of a shipped data set (None: the default instructions), else None."""
    from ..assets import ASSETS

    path = ASSETS / "instructions.jsonl" if data is None else Path(data).resolve()
    if path.parent != ASSETS or path.name not in DEMO_PROMPTS:
        return None
    return json.loads((ASSETS / DEMO_PROMPTS[path.name]).read_text())


@torch.no_grad()
def demo_generations(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> dict[str, str]:
    """Greedy completions of `prompts`: as a user turn of the tokenizer's chat template when it
    has one, else in the Alpaca format. All prompts in one left-padded batch: one decode of each
    4-bit weight per new token for the whole batch, not per prompt."""
    from .data import pad_id

    was_training = model.training
    model.eval()
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        special = False  # the template writes its own
    else:
        texts, special = [ALPACA.format(instruction=p) for p in prompts], True
    pad = pad_id(tokenizer)
    ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=model.device)
    with torch.compiler.set_stance("force_eager"):  # --compile's layers: a token at a time with a growing
        # cache would recompile them at every new shape
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    model.train(was_training)
    return {p: tokenizer.decode(row[width:], skip_special_tokens=True) for p, row in zip(prompts, gen)}


def write_summary(output: Path, cfg, state: dict, eval_loss: float | None, skipped_rows: int,
                  before: dict | None, after: dict | None, device: torch.device) -> dict:
    rows = read_metrics(output / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    summary = {
        "steps": state["step"],
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_eval_loss": eval_loss,
        "final_eval_ppl": math.exp(eval_loss) if eval_loss is not None and cfg.method == "sft" else None,
        "best_eval_loss": state.get("best_eval"),
        "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9),
        "peak_mem_mb": peak_memory_mb(device),
        "skipped_rows": skipped_rows,
        "skipped_steps": state["skipped_steps"],
        "adapter": str(output / "adapter"),
    }
    preference = [r for r in rows if "reward_accuracy" in r]
    if preference:
        summary["final_reward_accuracy"] = preference[-1]["reward_accuracy"]
        summary["final_reward_margin"] = preference[-1]["reward_margin"]
        evals = [r for r in rows if "eval_reward_accuracy" in r]
        summary["final_eval_reward_accuracy"] = evals[-1]["eval_reward_accuracy"] if evals else None
        summary["final_eval_reward_margin"] = evals[-1]["eval_reward_margin"] if evals else None
    if before is not None:
        summary["demo"] = {p: {"before": before[p], "after": (after or {}).get(p)} for p in before}
    tmp = output / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(output / "summary.json")
    plotted = plot_loss(rows, output / "loss.png")
    print("\nsummary")
    for key in ("steps", "first_loss", "final_loss", "final_eval_loss", "final_eval_ppl", "best_eval_loss",
                "tokens_per_s", "peak_mem_mb", "skipped_rows", "skipped_steps", "adapter", "final_reward_accuracy",
                "final_reward_margin", "final_eval_reward_accuracy", "final_eval_reward_margin"):
        if key not in summary:
            continue
        value = summary[key]
        print(f"  {key:<16} {value:.4g}" if isinstance(value, float) else f"  {key:<16} {value}")
    if plotted:
        print(f"  {'loss plot':<16} {output / 'loss.png'}")
    for prompt, pair in summary.get("demo", {}).items():
        print(f"\n### {prompt}\n--- before ---\n{pair['before'].strip()}\n--- after ---\n{(pair['after'] or '').strip()}")
    return summary
