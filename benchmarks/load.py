"""Peak memory and time of loading a 16-bit checkpoint into 4 bits: qlora vs transformers + bitsandbytes.

    .venv/bin/python benchmarks/load.py [--sizes 170m,1b] [--workdir /tmp/qlora-load-bench]

Writes random-weight bf16 Llama checkpoints in 200 MB shards (~170M parameters: hidden
1024, 8 layers, vocab 32000; ~1B: hidden 2048, 16 layers, intermediate 5632), then loads
each with both tools in fresh subprocesses. Peak = growth of VmHWM over the process after
its imports (model code included). qlora's bound: quantized model + largest 16-bit tensor + 100 MB.
"""
from __future__ import annotations

import argparse
import json
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
    start = reset_peak()
    t = time.perf_counter()
    if tool == "qlora":
        model = qlora.load_model(path, progress=False)
    else:
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu")
    seconds = time.perf_counter() - t
    size = sum(x.numel() * x.element_size() for x in [*model.parameters(), *model.buffers()])
    print(json.dumps({"grown": peak_bytes() - start, "seconds": seconds, "model_bytes": size}))
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="170m,1b")
    ap.add_argument("--workdir", default="/tmp/qlora-load-bench")
    args = ap.parse_args()
    from transformers import LlamaConfig

    from qlora.model.random_checkpoint import write_random_checkpoint

    mib = 2**20
    print(f"{'model':<8}{'params':>9}{'bf16 MiB':>10}{'tool':>27}{'peak growth MiB':>17}{'model MiB':>11}"
          f"{'load s':>8}{'bound MiB':>11}")
    for size in args.sizes.split(","):
        config = LlamaConfig(tie_word_embeddings=False, **CONFIGS[size])
        path = Path(args.workdir) / size
        if not (path / "config.json").exists():
            write_random_checkpoint(config, path, shard_bytes=200 * 10**6)
        import torch

        with torch.device("meta"):
            from transformers import LlamaForCausalLM

            params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        largest = config.vocab_size * config.hidden_size * 2
        for tool, label in (("qlora", "qlora"), ("bnb", "transformers+bitsandbytes")):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), tool], capture_output=True, text=True)
            if out.returncode:
                print(f"{size}: {tool} failed:\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            bound = (r["model_bytes"] + largest) / mib + 100 if tool == "qlora" else float("nan")
            print(f"{size:<8}{params / 1e6:>8.0f}M{params * 2 / mib:>10.0f}{label:>27}{r['grown'] / mib:>17.0f}"
                  f"{r['model_bytes'] / mib:>11.0f}{r['seconds']:>8.1f}{bound:>11.0f}")


if __name__ == "__main__":
    main()
