"""Pretrain the tiny Llama that ships in qlora/assets/tiny-llama/, on the Python standard library's source.

    .venv/bin/python scripts/pretrain.py                     # 20-27 min on one CPU core (800 steps)
    .venv/bin/python scripts/pretrain.py --steps 20 --out /tmp/tiny-llama   # a smoke run

It is the base model of `qlora train` with no arguments and the real-weights fixture of the
quantization tests, so it must be really pretrained yet small enough to ship and to
fine-tune in a couple of minutes on a laptop. Design choices:
- Text every machine has: the .py files under `sysconfig.get_paths()["stdlib"]`, sorted,
  without test directories, site-packages and the codec tables of encodings/. A file is
  held out for evaluation when sha1(its relative path) % 50 == 0 (~2% of the files), so the
  split does not depend on which other files this Python version ships; the held-out list
  is saved in pretrain.json.
- Its own byte-level BPE tokenizer (tokenizers library, trained on the training files only):
  4096 tokens, `<|pad|>`=0 `<|bos|>`=1 `<|eos|>`=2, bos prepended by the post-processor like
  Llama's. Byte level, so any text round-trips exactly (indentation, newlines, unicode).
- A 4.2M-parameter LlamaForCausalLM: hidden 256, 4 layers, 4 heads, MLP 688, tied embeddings,
  so the bf16 safetensors file is ~8.4 MB. All linear in-features are multiples of 64, the
  quantizers' block size.
- Plain PyTorch: AdamW (betas 0.9/0.95, wd 0.1 on matrices), linear warmup then cosine decay
  to 10%, grad-norm clip 1.0, random 256-token windows of the concatenated files
  (`<|bos|> file <|eos|>`), fixed seeds and a fixed number of steps, so a rerun gives the
  same weights up to the float reduction order of the machine's BLAS.
- One torch thread by default: on 2 cores shared with other jobs, 2 threads oversubscribe
  (measured 4x slower per step); a fixed thread count also fixes the reduction order.
- fp32 compute by default: on a CPU without native bf16 (AVX2 only) bf16 autocast measured
  ~10x slower here; `--bf16` turns it on. The weights are saved in bf16, and the held-out
  perplexity is reported both for the fp32 weights and for the saved bf16 weights.
Writes config.json, model.safetensors, generation_config.json, tokenizer files,
pretrain.json (metrics, samples) and pretrain.log (this script's log) to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]
# encodings/ is mostly codec tables ("'\xe7'  #  0x87 -> LATIN SMALL LETTER C WITH CEDILLA"):
# 12% of the text, and a model trained on it completes "def " with such tables.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
REPO = Path(__file__).resolve().parent.parent
# No trailing space or newline: byte-level BPE glues whitespace to the next token ("Ġreturn",
# "ĊĠĠĠ"), so a prompt ending in " " or "\n" asks for a split the model never saw.
SAMPLE_PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self", "    for i in range(", "import"]


# ----------------------------------------------------------------------------- data

def stdlib_files(root: Path) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted, without tests, site-packages and config-*."""
    files = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if set(parts[:-1]) & SKIP_DIRS or parts[0].startswith("config-"):
            continue
        files.append(p.relative_to(root).as_posix())
    return sorted(files)


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 50 == 0


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 pre-tokenization, no prefix space) that prepends <|bos|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    return tok


def hf_tokenizer(tok, max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", model_max_length=max_length)


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable by AutoTokenizer
    in transformers 4.x and 5.x (5.x would name its own class, TokenizersBackend, which 4.x lacks)."""
    tokenizer.save_pretrained(out)
    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("backend", None)
    config.update(special, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
                  clean_up_tokenization_spaces=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def encode_files(tok, texts: list[str]) -> torch.Tensor:
    """One stream: <|bos|> file <|eos|> <|bos|> file <|eos|> ..."""
    eos = tok.token_to_id("<|eos|>")
    ids = []
    for enc in tok.encode_batch(texts):  # the post-processor adds <|bos|>
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def heldout_windows(stream: torch.Tensor, seq_len: int, limit: int) -> torch.Tensor:
    """Non-overlapping (seq_len + 1)-token windows from the start of the held-out stream."""
    n = min((len(stream) - 1) // seq_len, limit)
    return torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


# ----------------------------------------------------------------------------- model

def make_model(args, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.02,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int = 16, autocast: bool = False) -> float:
    """Mean next-token loss (nats) over all predicted tokens of the windows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=w[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was)
    return total / count


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict[str, str]:
    model.eval()
    out = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out[prompt] = prompt + tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "qlora" / "assets" / "tiny-llama"))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--eval-windows", type=int, default=160, help="held-out 256-token windows to score (cap)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (slow on CPUs without native bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 measured 4x faster than 2 on 2 cores shared with another job")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "pretrain.log", "w", encoding="utf-8")

    def log(msg: str) -> None:
        tqdm.write(msg)
        log_file.write(msg + "\n")
        log_file.flush()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    log(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    log(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}")

    # data + tokenizer
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    train_files = [f for f in files if not is_heldout(f)]
    held_files = [f for f in files if is_heldout(f)]
    train_texts = [read(root, f) for f in train_files]
    held_texts = [read(root, f) for f in held_files]
    log(f"stdlib {root}: {len(files)} .py files, {len(train_files)} train "
        f"({sum(map(len, train_texts)) / 1e6:.1f}M chars), {len(held_files)} held out "
        f"({sum(map(len, held_texts)) / 1e3:.0f}k chars)")
    tok = train_tokenizer(train_texts, args.vocab_size)
    tokenizer = hf_tokenizer(tok, max_length=512)
    save_tokenizer(tokenizer, out)
    train_ids, held_ids = encode_files(tok, train_texts), encode_files(tok, held_texts)
    windows = heldout_windows(held_ids, args.seq_len, args.eval_windows)
    log(f"tokenizer: {tok.get_vocab_size()} tokens, {len(train_ids) / 1e6:.2f}M train tokens "
        f"({sum(map(len, train_texts)) / len(train_ids):.2f} chars/token), {len(held_ids) / 1e3:.0f}k held-out tokens, "
        f"scoring {windows.shape[0]} windows = {windows[:, 1:].numel()} tokens [{time.time() - t0:.0f}s]")

    # model + optimizer
    model = make_model(args, tok.get_vocab_size())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters ({n_params} with tied embeddings), {args.layers} layers, "
        f"hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv, MLP {args.intermediate}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    init_loss = heldout_loss(model, windows)
    log(f"held-out loss at init {init_loss:.3f} (ln vocab = {math.log(tok.get_vocab_size()):.3f})")

    # train
    g = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    model.train()
    t_train, recent, history = time.time(), [], []
    bar = tqdm(range(args.steps), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch_size,), generator=g)
        batch = torch.stack([train_ids[s: s + args.seq_len + 1] for s in starts.tolist()])
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        if step == 9:
            per_step = (time.time() - t_train) / 10
            log(f"throughput after 10 steps: {tokens_per_step / per_step:.0f} tokens/s, "
                f"{per_step:.2f} s/step -> ~{per_step * args.steps / 60:.1f} min for {args.steps} steps")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = sum(recent) / len(recent)
            history.append({"step": step + 1, "loss": round(mean, 4), "lr": lr, "grad_norm": round(gnorm, 3)})
            log(f"step {step + 1:5d}/{args.steps}  loss {mean:.3f}  lr {lr:.2e}  grad-norm {gnorm:.2f}  "
                f"[{time.time() - t_train:.0f}s]")
            recent = []
    train_s = time.time() - t_train
    train_loss = history[-1]["loss"]

    # save in bf16; score the fp32 weights here and the saved bf16 ones after reloading
    loss_fp32 = heldout_loss(model, windows)
    model.to(torch.bfloat16)
    model.generation_config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out)
    os.chmod(out / "model.safetensors", 0o644)  # transformers writes it 0600

    # check the saved directory the way users load it
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # whole files are longer than model_max_length: expected here
    loaded_tok = AutoTokenizer.from_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    dtype_on_disk = str(next(loaded.parameters()).dtype)
    assert dtype_on_disk == "torch.bfloat16", dtype_on_disk
    loaded.float()  # exact: bf16 -> fp32; CPUs without native bf16 matmul are ~10x slower in bf16
    loss_bf16 = heldout_loss(loaded, windows)
    log(f"held-out loss: fp32 weights {loss_fp32:.4f} (ppl {math.exp(loss_fp32):.2f}), "
        f"saved bf16 weights {loss_bf16:.4f} (ppl {math.exp(loss_bf16):.2f})")
    for rel, text in zip(held_files, held_texts):
        ids = loaded_tok(text)["input_ids"]
        assert ids[0] == loaded_tok.bos_token_id, rel
        back = loaded_tok.decode(ids, skip_special_tokens=True)
        assert back == text, f"tokenizer does not round-trip {rel}"
    assert (loaded_tok.bos_token_id, loaded_tok.eos_token_id, loaded_tok.pad_token_id) == (1, 2, 0)
    samples = greedy_samples(loaded, loaded_tok, SAMPLE_PROMPTS, max_new_tokens=40)
    for prompt, text in samples.items():
        log(f"--- greedy sample, prompt {prompt!r}:\n{text}")
    log(f"reloaded with AutoModelForCausalLM ({dtype_on_disk}) and AutoTokenizer ({type(loaded_tok).__name__}); "
        f"the tokenizer round-trips all {len(held_files)} held-out files exactly")

    size = (out / "model.safetensors").stat().st_size
    wall = time.time() - t0
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(), "torch": torch.__version__,
        "corpus": {"stdlib": str(root), "files": len(files), "train_files": len(train_files),
                   "heldout_files": held_files, "heldout_rule": "sha1(relative path) % 50 == 0",
                   "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
                   "eval_windows": int(windows.shape[0]), "eval_tokens": int(windows[:, 1:].numel())},
        "args": vars(args) | {"out": str(out)},
        "parameters": n_params, "safetensors_bytes": size,
        "safetensors_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
        "steps": args.steps, "tokens_seen": args.steps * tokens_per_step,
        "train_loss": train_loss, "init_heldout_loss": round(init_loss, 4),
        "heldout_loss_fp32": round(loss_fp32, 4), "heldout_ppl_fp32": round(math.exp(loss_fp32), 3),
        "heldout_loss_bf16": round(loss_bf16, 4), "heldout_ppl_bf16": round(math.exp(loss_bf16), 3),
        "train_seconds": round(train_s, 1), "tokens_per_s": round(args.steps * tokens_per_step / train_s),
        "wall_seconds": round(wall, 1),
        "samples": samples, "history": history,
    }
    (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"saved {out}: model.safetensors {size / 1e6:.2f} MB; wall time {wall / 60:.1f} min")
    log_file.close()


if __name__ == "__main__":
    main()
