"""Packed vs padded training on instruction data: real tokens/s (padding not counted) and peak.

    flock /tmp/qlora-bench.lock .venv/bin/python benchmarks/packing.py [--docs 160] [--max-length 512] [--batch 4]
        [--repeat 1] [--dtype bfloat16|float32] [--setups packed,padded,padded-b16,peer-flatten[,padded-ungrouped,packed-sdpa,packed-flex,packed-varlen]]
        [--device cpu|cuda]

The documents: a synthetic instruction set with Alpaca's length histogram (`alpaca_like`):
random token ids in the lengths the Alpaca template gives its rows (instruction about 15
tokens, 40% with an input of about 25, a response with a long tail: lognormal, median 45,
mean about 67), the prompt's labels -100. Every setup trains the same documents, LoRA r=64 /
alpha 16 / dropout 0.05 on all linear layers of the 58M Llama of benchmarks/train.py (random
bf16 weights), NF4 + DQ, gradient checkpointing, an optimizer step per micro-batch:
- packed       qlora: `qlora train` (default): data.pack into rows of at most --max-length, --batch rows
               a micro-batch, documents kept apart by their position ids (model/packing.py)
- packed-sdpa  the same with `--attn-implementation sdpa`: SDPA with the block-diagonal mask over the
               whole row (what `packed` runs too, except for fp32 on a CPU, where auto picks varlen)
- packed-flex  the same with `--attn-implementation flex_attention` (torch's flex attention, whose block
               mask skips the blocks between documents; it trains on CUDA only)
- packed-varlen  the same with `--attn-implementation varlen` (torch's varlen flash kernels over the
               documents' boundaries: no mask, no work across documents; on the CPU, SDPA's CPU flash
               kernels once per document)
- padded       qlora: `qlora train --no-packing`: --batch documents a micro-batch, grouped by length,
               padded to a multiple of 16
- padded-b16   the same with 4 x --batch documents a micro-batch (about as many real tokens as packed)
- padded-ungrouped  `--no-packing --no-group-by-length`: batches in random order, padded to their
               longest row (what the HF Trainer does by default: group_by_length=False)
- peer-flatten transformers + peft + bitsandbytes (nf4 + DQ, prepare_model_for_kbit_training, bf16
               autocast, PagedAdamW32bit) fed by transformers' DataCollatorWithFlattening: each packed
               micro-batch's documents as one row with restarting position ids (its padding-free path)
Each setup runs in a fresh subprocess, passes over its micro-batches twice and times the
second pass (every batch shape seen once before: the GEMM libraries' first-shape costs are not
counted for any setup). tokens/s = the real tokens of the pass / its seconds; peak = VmHWM
growth over the process after its imports. `first loss` is the first micro-batch's loss: the
packed and peer rows see the same documents there, with the same 4-bit base and B = 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, time, torch, transformers
    from qlora.train.peak import reset_peak, peak_bytes
    path, setup, docs_file, max_length, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    dtype, device = getattr(torch, sys.argv[6]), torch.device(sys.argv[7])
    cuda = device.type == "cuda"
    transformers.LlamaForCausalLM
    if setup.startswith("peer"):
        import bitsandbytes, peft
    import qlora
    from qlora.model.loss import causal_lm_loss
    from qlora.train import data as D
    docs = [D.Example(d["input_ids"], d["labels"]) for d in json.loads(open(docs_file).read())]
    packed = D.Batches(D.pack(docs, max_length), batch, seed=0, group_by_length=False, pad=0, multiple=16)
    if setup.startswith(("packed", "peer")):
        micro = [packed.batch(k) for k in range(packed.per_epoch)]
    else:
        padded = D.Batches(docs, batch * (4 if setup == "padded-b16" else 1), seed=0,
                           group_by_length=setup != "padded-ungrouped", pad=0, multiple=16)
        micro = [padded.batch(k) for k in range(padded.per_epoch)]
    if setup.startswith("peer"):  # the same documents per micro-batch, flattened by transformers' own collator
        collator = transformers.DataCollatorWithFlattening()
        def documents(b):
            out = []
            for row, pos in zip(b["input_ids"].tolist(), b["position_ids"].tolist()):
                starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
                out += [row[s:e] for s, e in zip(starts, starts[1:])]
            return out
        by_ids = {tuple(d.input_ids): d for d in docs}
        micro = [collator([{"input_ids": d.input_ids, "labels": d.labels}
                           for ids in documents(b) if tuple(ids) in by_ids for d in [by_ids[tuple(ids)]]])
                 for b in micro]
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro)
    attention = {"packed-sdpa": "sdpa", "packed-flex": "flex_attention", "packed-varlen": "varlen"}.get(setup, "auto")
    if setup == "packed":  # what `qlora train` runs for --attn-implementation auto
        from qlora.memory import load_config
        from qlora.model.attention import auto_attention
        attention = auto_attention(load_config(path), device, dtype, True)
    if setup.startswith("peer"):
        micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
    else:  # as the trainer hands them over: masks of all ones dropped, the target index made on the host
        from qlora.train.distributed import Ranks, share
        micro = [share(b, Ranks(device=device), boundaries=attention == "varlen") for b in micro]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = reset_peak()
    if setup.startswith("peer"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype,
                                                                  device_map=str(device))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        opt = bitsandbytes.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        step_loss = lambda b: model(**b).loss
    else:
        model = qlora.load_model(path, compute_dtype=dtype, device=device, progress=False)
        model = qlora.prepare_model(model, lora=qlora.LoraConfig(r=64, alpha=16, dropout=0.05), compute_dtype=dtype,
                                    verbose=False)
        from qlora.model.attention import set_attention
        set_attention(model, attention, device)  # --attn-implementation
        opt = qlora.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
        autocast = torch.autocast("cpu", enabled=False)
        step_loss = lambda b: causal_lm_loss(model, b)
    model.train()
    first = None
    for timed in (False, True):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for b in micro:
            with autocast:
                loss = step_loss(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            first = float(loss) if first is None else first
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    shapes = sorted({tuple(b["input_ids"].shape) for b in micro})
    print(json.dumps({"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "micro": len(micro),
                      "slots": sum(b["input_ids"].numel() for b in micro), "shapes": len(shapes),
                      "peak_mb": ((torch.cuda.max_memory_allocated() if cuda else peak_bytes()) - start) / 2**20,
                      "first_loss": first}))
""")

LABELS = {"packed": "qlora packed (default)", "packed-sdpa": "qlora packed, sdpa (block mask)",
          "packed-flex": "qlora packed, flex attention", "packed-varlen": "qlora packed, varlen attention",
          "padded": "qlora padded (--no-packing)",
          "padded-b16": "qlora padded, 4x the rows", "padded-ungrouped": "qlora padded, not grouped by length",
          "peer-flatten": "peft+bnb, DataCollatorWithFlattening"}


def alpaca_like(n: int, seed: int = 0, vocab: int = 32000) -> list[dict]:
    """`n` documents in the lengths Alpaca's rows take under the Alpaca template (see the
    module docstring): {"input_ids", "labels"}, the prompt's labels -100, bos first, eos last."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        instruction = max(3, round(rng.lognormvariate(math.log(14), 0.4)))
        extra = max(2, round(rng.lognormvariate(math.log(18), 0.8))) + 6 if rng.random() < 0.4 else 0
        prompt = 1 + 12 + instruction + extra  # bos, the template's own tokens, instruction, input
        response = max(1, round(rng.lognormvariate(math.log(45), 0.9))) + 1  # + eos
        ids = [rng.randrange(3, vocab) for _ in range(prompt + response)]
        docs.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=160, help="documents every setup trains on")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of each setup")
    ap.add_argument("--repeat", type=int, default=1, help="run the setups this many times, interleaved; the median")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--setups", default="packed,padded,padded-b16,peer-flatten")
    ap.add_argument("--workdir", default="/tmp/qlora-train-bench")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (peak: torch's allocated bytes there)")
    args = ap.parse_args()
    from transformers import LlamaConfig

    from qlora.model.random_checkpoint import write_random_checkpoint

    path = Path(args.workdir) / "llama-58m"  # the model of benchmarks/train.py
    if not (path / "config.json").exists():
        write_random_checkpoint(LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                            num_attention_heads=8, vocab_size=32000, tie_word_embeddings=False), path)
    docs = [d for d in alpaca_like(args.docs) if len(d["input_ids"]) <= args.max_length]
    docs_file = Path(args.workdir) / "packing-docs.json"
    docs_file.write_text(json.dumps(docs))
    lengths = sorted(len(d["input_ids"]) for d in docs)
    q = {p: lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] for p in (10, 50, 90, 99)}
    print(f"{len(docs)} documents, {sum(lengths)} tokens: mean {sum(lengths) / len(lengths):.0f}, "
          + ", ".join(f"p{p} {v}" for p, v in q.items()) + f", max {lengths[-1]}")
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):  # interleaved: a slow spell of the machine hits every setup alike
        for setup in args.setups.split(","):
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), setup, str(docs_file), str(args.max_length),
                                  str(args.batch), args.dtype, args.device], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{setup} failed:\n{out.stderr[-3000:]}")
                continue
            runs.setdefault(setup, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in runs.items()}
    print(f"\n--batch {args.batch}, --max-length {args.max_length}, {args.dtype} compute on {args.device}; "
          "the second pass timed"
          + (f"; median of {args.repeat} interleaved runs" if args.repeat > 1 else ""))
    if args.repeat > 1:
        for setup, rs in runs.items():
            print(f"  {setup}: tokens/s of each run " + ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs))
    base = results.get("padded")
    print(f"{'setup':<38}{'real tok/s':>11}{'vs padded':>10}{'peak MiB':>10}{'micro':>7}{'shapes':>7}"
          f"{'fill':>7}{'first loss':>11}")
    for setup, r in results.items():
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"{LABELS[setup]:<38}{r['tokens_per_s']:>11.0f}{ratio:>10}{r['peak_mb']:>10.0f}{r['micro']:>7}"
              f"{r['shapes']:>7}{r['tokens'] / r['slots']:>7.0%}{r['first_loss']:>11.4f}")


if __name__ == "__main__":
    main()
