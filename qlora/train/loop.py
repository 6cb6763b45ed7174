"""The training loop: one plain function, top to bottom.

    summary = qlora.finetune(qlora.TrainConfig(model="path", data="rows.jsonl", output="runs/x"))
    qlora train --model path --data rows.jsonl --output runs/x      # the same, from the shell

Per optimizer step: `grad_accum` micro-batches, the loss (model/loss.py: head and
cross-entropy fused, no full logits) averaged over all their target tokens; clip; AdamW;
schedule. `--method dpo|orpo` trains on preference pairs instead (preference.py: the
objective, its own denominators, reward margin and accuracy per step). A non-finite loss
or gradient skips the step (counted) and stops the run after `max_bad_steps` in a row; the
skipped update never reaches the optimizer state, so no checkpoint can hold it. The skip is
decided on the device (AdamW's `found_inf`); the host reads a step's loss and norm (its one
read) once the next step's forward and backward are queued, then logs the step or takes
back its count, lr and tokens: the same run as reading at once, without the device waiting
on the host. Eval, save and the last step read at once. Checkpoints (adapter in PEFT format,
optimizer, schedule, RNG, step) are written atomically every `save_every` steps, at the
end and on Ctrl-C; `--resume` continues from the newest one bit for bit (on CPU): the data
order is a function of (seed, micro-batch index), the index is saved, and so is the RNG.
Under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2 or replicated with DDP, each
rank takes its share of every micro-batch and only rank 0 reports: see distributed.py. One
process is the world of size 1: the same forward/backward, checkpoint and report code runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import TrainingError
from ..model.checkpoint_files import resolve
from ..model.attention import auto_attention, check_attention, set_attention
from ..model.gguf_model import gguf_source
from ..model.load import load_model
from ..memory import load_config
from ..model.loss import IGNORE, causal_lm_loss
from ..model.packing import PACKED_MODEL_TYPES, packs_exactly, unpadded_on_host
from ..model.prepare import compile_layers, prepare_model
from ..model.varlen import uses_varlen
from ..model.shard import shard_rows, wrap_ddp
from ..nn.lora import LoraConfig
from ..optim import AdamW, clip_grad_norm, scheduler, step_back
from . import data as D
from . import distributed as dist_
from . import memory as M
from . import preference as P
from .checkpoint import checkpoints, load_checkpoint, rng_state, save_adapter_gathered, save_checkpoint, set_rng_state
from .config import TrainConfig
from .config import compute_dtype as resolve_compute_dtype
from .config import device as resolve_device
from .report import Metrics, demo_generations, demo_prompts, peak_memory_mb, write_summary

__all__ = ["TrainingError", "evaluate", "forward_backward", "train"]


def _default_paths(cfg: TrainConfig) -> tuple[str, str]:
    if cfg.model and cfg.data:
        return cfg.model, cfg.data
    from ..assets import asset_path

    return cfg.model or str(asset_path("tiny-llama")), cfg.data or str(asset_path("instructions.jsonl"))


def _build_model(cfg: TrainConfig, model_path: str):
    compute_dtype = resolve_compute_dtype(cfg)
    targets = cfg.targets()
    if cfg.quant_type == "none" and gguf_source(resolve(model_path)) is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolve(model_path), dtype=compute_dtype,
                                                     trust_remote_code=cfg.trust_remote_code).to(resolve_device(cfg))
    elif requantized(cfg):
        model = _requantized_base(cfg, model_path, compute_dtype).to(resolve_device(cfg))
    else:
        model = load_model(model_path, cfg.quant_type, cfg.double_quant, compute_dtype, device=resolve_device(cfg),
                           blocksize=cfg.blocksize, trust_remote_code=cfg.trust_remote_code, target_modules=targets,
                           progress=False)
    lora = LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    return prepare_model(model, lora=lora, quant_type=None, compute_dtype=compute_dtype,
                         gradient_checkpointing=cfg.gradient_checkpointing, checkpoint_every=cfg.checkpoint_every,
                         keep_attention=cfg.keep_attention,
                         verbose=False)


BASE = "base-4bit"
"""Where a run whose base is not plain absmax (--calibrate, --init loftq, --keep-16bit) writes it."""


def requantized(cfg: TrainConfig) -> bool:
    return bool(cfg.calibrate or cfg.init == "loftq" or cfg.keep_16bit)


def _requantized_base(cfg: TrainConfig, model_path: str, compute_dtype: torch.dtype):
    """The base re-quantized from its 16-bit weights as the flags say, written once to
    <output>/base-4bit (the adapter names it as its base; a resumed run reads it back)."""
    from ..model.calibrate import load_calibrated
    from ..model.save import save_quantized

    base = Path(cfg.output) / BASE
    if cfg.resume and (base / "config.json").is_file():
        return load_model(base, compute_dtype=compute_dtype, progress=False)
    auto = cfg.keep_16bit == "auto"
    room = 0
    if auto:  # the room between this run's plan (every linear 4-bit) and the budget
        from ..memory import parse_bytes

        room = max(0, parse_bytes(cfg.memory_budget) - M.plan_for_run(cfg, model_path, compute_dtype).total_bytes)
    model = load_calibrated(model_path, cfg.calibrate, cfg.quant_type, cfg.double_quant, compute_dtype,
                            cfg.calibrate_rows, cfg.calibrate_seq, cfg.blocksize, cfg.trust_remote_code,
                            progress=False, loftq_rank=cfg.lora_r if cfg.init == "loftq" else 0,
                            loftq_iters=cfg.loftq_iters, keep_16bit="auto" if auto else M.kept_names(cfg),
                            keep_budget_bytes=room, target_modules=cfg.targets())
    if auto:
        kept = model.qlora_kept_16bit
        print(f"--keep-16bit auto: kept {len(kept)} linears 16-bit (+{sum(kept.values()) / 2**20:,.1f} MiB of "
              f"{room / 2**20:,.1f} MiB of room under --memory-budget {cfg.memory_budget})"
              + (f": {', '.join(kept)}" if kept else ""))
    save_quantized(model, base)
    return model


def _training_model(cfg: TrainConfig, model_path: str, ranks: dist_.Ranks):
    """The model this process trains: FSDP2 shards loaded shard by shard, else the whole QLoRA
    model (under --distributed ddp wrapped in DistributedDataParallel)."""
    if ranks.active and requantized(cfg):
        raise TrainingError("--calibrate, --init loftq and --keep-16bit re-quantize the whole base in one process: "
                            "run `qlora quantize --model M --calibrate DATA --output BASE` once, then train on BASE "
                            "under torchrun")
    if ranks.mode == "fsdp":
        if cfg.compile:
            raise TrainingError("--compile runs in one process or under --distributed ddp, not fsdp (yet)")
        model = dist_.build_sharded(cfg, ranks, model_path)
        set_attention(model, cfg.attn_implementation, ranks.device)
        return model
    model = _build_model(cfg, model_path)
    set_attention(model, cfg.attn_implementation, ranks.device)
    if cfg.compile:
        compile_layers(model)
    return wrap_ddp(model.to(ranks.device), ranks.device) if ranks.mode == "ddp" else model


def _packing(cfg: TrainConfig, model_path: str, say: bool, device: torch.device) -> TrainConfig:
    """cfg, with packing off (saying so) where the model cannot keep packed documents apart, and
    --attn-implementation auto resolved (model/attention.py: auto_attention)."""
    try:
        config = load_config(resolve(model_path))
    except Exception:  # the loader will raise the real error
        config = {}
    if cfg.packing and not packs_exactly(config):
        if say:
            print(f"packing: off for model type {config.get('model_type')!r} (exact only for "
                  f"{', '.join(PACKED_MODEL_TYPES)}); batches are padded")
        cfg = dataclasses.replace(cfg, packing=False)
    if cfg.attn_implementation == "auto":
        with warnings.catch_warnings():  # (_build_model warns about an emulated bf16, once)
            warnings.simplefilter("ignore")
            dtype = resolve_compute_dtype(cfg)
        cfg = dataclasses.replace(cfg, attn_implementation=auto_attention(config, device, dtype, cfg.packing))
    return cfg


class TokenLoss:
    """SFT's objective: the next-token loss, summed over the labelled tokens."""

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"tokens": int((batch["labels"][:, 1:] != IGNORE).sum())}

    def sums(self, model, batch: dict[str, torch.Tensor], counts: dict[str, int]
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return {"tokens": causal_lm_loss(model, batch).float() * counts["tokens"]}, {}


def forward_backward(model, micro: list[dict[str, torch.Tensor]], ranks: dist_.Ranks, objective=None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backward over this process's share of the micro-batches `micro`; returns the step's loss
    over all of them (and all ranks) and the objective's stats averaged over the step's pairs,
    as 0-dim tensors where the model is (nothing is read back here).

    The objective (default TokenLoss: SFT) gives each share loss sums per denominator (target
    tokens; preference.py: pairs, chosen tokens); each share's loss is the sum of (its sum) /
    (the step's count, over all ranks) x world_size: the gradient average FSDP2 / DDP take then
    equals the single process's gradient."""
    objective = objective or TokenLoss()
    boundaries = uses_varlen(model)  # varlen attention: each share carries its documents' boundaries
    # counts from the host-side rows of every rank's share (each rank builds the same global
    # micro-batches): no collective, no device read
    every = [[objective.counts({k: shard_rows(v, r, ranks.world_size) for k, v in b.items()})
              for r in range(ranks.world_size)] for b in micro]
    counts = [shares[ranks.rank] for shares in every]
    names = sorted(counts[0])
    step = {k: max(float(sum(c[k] for shares in every for c in shares)), 1.0) for k in names}
    loss_sum = torch.zeros((), dtype=torch.float32, device=ranks.device)  # a CPU sum += a CUDA loss fails
    stat_sums: dict[str, torch.Tensor] = {}
    for i, (b, c) in enumerate(zip(micro, counts)):
        last = i == len(micro) - 1
        with model.no_sync() if ranks.mode == "ddp" and not last else contextlib.nullcontext():
            # a share without target tokens still runs backward (collectives), with a zero loss
            terms, stats = objective.sums(model, dist_.share(b, ranks, boundaries), c)
            loss = sum(terms[k].float() / step[k] for k in names)
            (loss * ranks.world_size).backward()
        loss_sum += loss.detach()
        for k, v in stats.items():
            stat_sums[k] = stat_sums.get(k, 0) + v.detach().float()
    if not stat_sums:
        return dist_.all_reduce_sum(loss_sum, ranks), {}
    keys = sorted(stat_sums)
    reduced = dist_.all_reduce_sum(torch.stack([loss_sum] + [stat_sums[k] for k in keys]).double(), ranks)
    return reduced[0].float(), {k: v / step["pairs"] for k, v in zip(keys, reduced[1:])}


@torch.no_grad()
def evaluate(model, examples: list[D.Example], batch_size: int, pad: int, multiple: int = 1) -> tuple[float, float]:
    """(mean token loss, perplexity) over the eval rows."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in D.eval_batches(examples, batch_size, pad, multiple):
        n = int((batch["labels"][:, 1:] != IGNORE).sum())  # on the host
        batch = {k: v.to(device) for k, v in batch.items() if not (k == "attention_mask" and unpadded_on_host(v))}
        total += float(causal_lm_loss(model, batch)) * n
        count += n
    model.train()
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50))


def train(cfg: TrainConfig) -> dict:
    """Fine-tune with QLoRA as `cfg` says; returns the summary (also in <output>/summary.json)."""
    from transformers import AutoTokenizer

    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    ranks = dist_.setup(cfg)  # one process: Ranks(world_size=1) on --device, the collectives do nothing
    check_attention(cfg.attn_implementation, ranks.device)  # before anything loads
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model_path, data_path = _default_paths(cfg)

    # data
    tokenizer = AutoTokenizer.from_pretrained(resolve(model_path), trust_remote_code=cfg.trust_remote_code)
    pad = D.pad_id(tokenizer)
    objective = None if cfg.method == "sft" else P.Preference(cfg.method, cfg.beta, cfg.loss_type, cfg.train_on_prompt)
    if objective is None:
        examples, skipped = D.tokenize_rows(D.read_rows(data_path), tokenizer, cfg.max_length, cfg.train_on_prompt,
                                            cfg.skip_bad_rows, cfg.long_rows)
        train_rows, eval_rows = D.split(examples, cfg.eval_split, cfg.seed)  # held out first: never packed
        cfg = _packing(cfg, model_path, ranks.main, ranks.device)
        if cfg.packing:
            train_rows = D.pack(train_rows, cfg.max_length)
        batches = D.Batches(train_rows, cfg.batch_size, cfg.seed, cfg.group_by_length and not cfg.packing, pad,
                            cfg.pad_to_multiple)
    else:  # preference pairs: 2 x batch_size rows a micro-batch, never packed
        cfg = dataclasses.replace(cfg, packing=False)
        examples, skipped = P.tokenize_pairs(D.read_rows(data_path), tokenizer, cfg.max_length, cfg.skip_bad_rows)
        train_rows, eval_rows = D.split(examples, cfg.eval_split, cfg.seed)
        batches = P.PairBatches(train_rows, cfg.batch_size, cfg.seed, cfg.group_by_length, pad, cfg.pad_to_multiple)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * batches.per_epoch / cfg.grad_accum))

    # model, optimizer, schedule; the memory plan first, then the peak is measured from here
    plan = M.plan_run(cfg, model_path, train_rows, ranks.world_size) if ranks.main else None  # per process
    baseline = M.start_measure(model_path, cfg.release_host_memory, ranks.device)
    model = _training_model(cfg, model_path, ranks)
    if cfg.packing and not packs_exactly(getattr(model, "module", model)):
        raise TrainingError(f"--packing: this {type(model).__name__} (attention "
                            f"{getattr(model.config, '_attn_implementation', '?')}) cannot keep packed documents "
                            "apart; pass --no-packing")
    if cfg.keep_16bit == "auto" and ranks.main:  # plan again with the linears it chose
        kept = [n.replace(".base_layer", "") for n, m in model.named_modules()
                if type(m) is torch.nn.Linear and ".layers." in n and not n.endswith(("lora_A", "lora_B"))]
        plan = M.plan_run(dataclasses.replace(cfg, keep_16bit=",".join(kept) or None), model_path, train_rows,
                          ranks.world_size)
    if ranks.rank > 0:
        torch.manual_seed(cfg.seed + ranks.rank)  # the same init everywhere, then dropout masks of its own
    if cfg.precompute_ref:  # the reference is the base without adapters: the same before and after a resume
        P.precompute_reference(model, train_rows + eval_rows, cfg.batch_size, pad, cfg.pad_to_multiple,
                               progress=ranks.main)
    prompts = demo_prompts(cfg.data) if cfg.demo and not ranks.active else None
    demo = demo_generations(model, tokenizer, prompts) if prompts else None
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    optimizer = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      state_bits=8 if cfg.optim.endswith("8bit") else 32, paged=cfg.optim.startswith("paged"))
    warmup = round(cfg.warmup_ratio * total_steps) if cfg.schedule != "constant" else 0
    sched = scheduler(optimizer, cfg.schedule, warmup_steps=warmup, total_steps=total_steps)
    if ranks.main:
        cfg.to_yaml(output / "config.yaml")

    state = {"step": 0, "micro": 0, "bad_steps": 0, "skipped_steps": 0, "tokens": 0, "elapsed": 0.0, "best_eval": None}
    if cfg.resume:
        found = checkpoints(output)
        if not found:
            raise TrainingError(f"--resume: no checkpoint in {output / 'checkpoints'}; start without --resume")
        state = load_checkpoint(found[-1], model, optimizer, sched, ranks)
        if ranks.main:
            print(f"resumed from {found[-1]} (step {state['step']})")
    metrics = Metrics(output / "metrics.jsonl", truncate_after=state["step"]) if ranks.main else dist_.NoMetrics()
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
               disable=not ranks.main)
    start, eval_loss = time.perf_counter() - state["elapsed"], None
    stop = dist_.StopRequest(ranks)  # under torchrun: a signal stops every rank at the same step
    step_start = (state["micro"], rng_state(device))  # where an interrupted step restarts
    pending: dict | None = None  # the last step taken, its loss and norm not read yet

    def settle() -> None:
        """Read the pending step's loss and norm (the step's one host read: made once the next
        step is queued behind it, so the device never waits for the host) and log the step; if
        either is not finite, the device skipped its update: take back its count, lr and tokens."""
        nonlocal pending
        done = pending
        if done is None:
            return
        loss_v, norm_v, *stat_v = torch.stack([done["loss"], done["norm"], *done["stats"].values()]).tolist()
        taken = math.isfinite(loss_v) and math.isfinite(norm_v)
        with held_interrupt():  # all of it or none: a Ctrl-C here lands after it
            pending = None
            if not taken:
                optimizer.rewind()
                step_back(sched)
                state.update(step=done["step"] - 1, tokens=state["tokens"] - done["tokens"])
                state["bad_steps"] += 1
                state["skipped_steps"] += 1
            else:
                state["bad_steps"] = 0
                state["elapsed"] = time.perf_counter() - start
                stats = dict(zip(done["stats"], stat_v))
                row = {"step": done["step"], "loss": loss_v, "lr": done["lr"], "grad_norm": norm_v,
                       "tokens": state["tokens"], "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9),
                       "elapsed_s": state["elapsed"], "peak_mem_mb": done["peak_mem_mb"], **stats}
                metrics.write(row)
        if not taken:  # the step number is retried on the next micro-batches
            if state["bad_steps"] >= cfg.max_bad_steps:
                raise TrainingError(
                    f"step {done['step']}: loss {loss_v:.4g}, gradient norm {norm_v:.4g}: "
                    f"{state['bad_steps']} non-finite steps in a row. Lower --lr, check the data, or use "
                    "--compute-dtype float32; the last good checkpoint is untouched"
                )
            return
        shown = {"acc": f"{stats['reward_accuracy']:.2f}", "margin": f"{stats['reward_margin']:.3f}"} if stats else {}
        bar.set_postfix(loss=f"{row['loss']:.3f}", **shown, lr=f"{row['lr']:.2e}",
                        tok_s=f"{row['tokens_per_s']:.0f}", peak=f"{row['peak_mem_mb']:.0f}MB")
        bar.update(1)

    try:
        while state["step"] < total_steps:
            step_start = (state["micro"], rng_state(device))
            if stop.agreed():
                settle()
                bar.close()
                where = save_checkpoint(output, model, optimizer, sched, state, cfg.keep_last, ranks)
                if ranks.main:
                    print(f"\nstopped by a signal at step {state['step']}: saved {where}; continue with the same "
                          "command and --resume")
                dist_.shutdown(ranks)
                raise KeyboardInterrupt
            micro = [batches.batch(state["micro"] + i) for i in range(cfg.grad_accum)]
            baseline.before_step(max(b["input_ids"].numel() for b in micro))
            state["micro"] += cfg.grad_accum  # the data position moves on even if the step is skipped
            step_tokens = sum(int(b["attention_mask"].sum()) for b in micro)  # counted on the host: no device sync
            loss_sum, stats = forward_backward(model, micro, ranks, objective)  # each rank its share of each
            grad_norm = clip_grad_norm(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"),
                                       error_if_nonfinite=False).to(loss_sum.device, torch.float32)
            # a non-finite loss or norm skips the update on the device; the host learns it a step later
            found_inf = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
            settle()  # the step before this one
            step = state["step"] + 1
            with held_interrupt():  # the update and its bookkeeping together
                optimizer.step(found_inf=found_inf)
                sched.step()
                optimizer.zero_grad(set_to_none=True)
                pending = {"step": step, "loss": loss_sum, "norm": grad_norm, "stats": stats, "tokens": step_tokens,
                           "lr": sched.get_last_lr()[0], "peak_mem_mb": peak_memory_mb(device)}
                state.update(step=step, tokens=state["tokens"] + step_tokens)
                step_start = (state["micro"], rng_state(device))  # the step is taken: the next one starts here
            evaluating = bool(eval_rows) and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps
            saving = cfg.save_every and step % cfg.save_every == 0 and step < total_steps
            if evaluating or saving or step == total_steps:
                settle()  # at once: they need to know whether the step was taken
            if state["step"] != step:
                continue
            if evaluating:
                eval_loss = _eval(model, eval_rows, cfg, pad, state, metrics, objective)
            if saving:
                save_checkpoint(output, model, optimizer, sched, state, cfg.keep_last, ranks)
    except KeyboardInterrupt:
        try:
            settle()  # the last step taken: logged, or taken back if it was skipped, before saving
        finally:
            bar.close()
            metrics.close()
        if ranks.active:  # saved above, by every rank at the same step
            raise
        if state["micro"] != step_start[0]:  # mid-step: save the data position and RNG it started from
            state["micro"] = step_start[0]
            set_rng_state(step_start[1], device)
        where = save_checkpoint(output, model, optimizer, sched, state, cfg.keep_last, ranks)
        print(f"\ninterrupted at step {state['step']}: saved {where}; continue with the same command and --resume")
        raise
    except BaseException:
        metrics.close()
        raise
    finally:
        stop.restore()
    bar.close()
    if eval_rows:
        eval_loss = _eval(model, eval_rows, cfg, pad, state, metrics, objective)
    metrics.close()
    save_checkpoint(output, model, optimizer, sched, state, cfg.keep_last, ranks)
    base = str((output / BASE).resolve()) if requantized(cfg) else cfg.model
    save_adapter_gathered(model, output / "adapter", ranks, base_model_name_or_path=base)
    after = demo_generations(model, tokenizer, prompts) if prompts else None
    measured = dist_.peak_over_ranks(M.measure(baseline), ranks)
    dist_.shutdown(ranks)
    if not ranks.main:
        return {"steps": state["step"], "rank": ranks.rank}
    M.write_run_memory(output, plan, measured)
    return write_summary(output, cfg, state, eval_loss, skipped, demo, after, device)


@contextlib.contextmanager
def held_interrupt() -> Iterator[None]:
    """Ctrl-C held off inside (raised as KeyboardInterrupt on the way out), so that the
    bookkeeping inside is done whole. Only where SIGINT raises (Python's default handler,
    in the main thread); other handlers (torchrun's StopRequest sets a flag) are left."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    got: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if got:
        raise KeyboardInterrupt


def _eval(model, eval_rows, cfg: TrainConfig, pad: int, state: dict, metrics, objective=None) -> float:
    if objective is None:
        loss, ppl = evaluate(model, eval_rows, cfg.batch_size, pad, cfg.pad_to_multiple)
        row = {"eval_loss": loss, "eval_ppl": ppl}
    else:
        row = P.evaluate_pairs(model, objective, eval_rows, cfg.batch_size, pad, cfg.pad_to_multiple)
        loss = row["eval_loss"]
    state["best_eval"] = loss if state["best_eval"] is None else min(state["best_eval"], loss)
    metrics.write({"step": state["step"], **row})
    return loss
