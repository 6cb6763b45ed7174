"""Peak memory of loading a 16-bit checkpoint into a QLoRA model: one process (load_model +
prepare_model) vs each rank of an FSDP2 run (load_sharded: stream, quantize, keep the shard).

    python benchmarks/fsdp_load.py --make runs/bench-llama151m            # write the random checkpoint once
    python benchmarks/fsdp_load.py runs/bench-llama151m                   # one process
    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_load.py runs/bench-llama151m

Peak = growth of the process high-water mark (VmHWM) over the RSS just before the load, after
a warm-up load of a tiny model (so code pages and imports are not counted). Run on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora.train.peak import peak_bytes, reset_peak  # noqa: E402
from qlora.nn.lora import LoraConfig  # noqa: E402


def make(path: Path, hidden: int = 1024, layers: int = 8) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=8192, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    print(f"wrote {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--make", action="store_true", help="write the random checkpoint to PATH and stop")
    args = parser.parse_args()
    if args.make:
        return make(Path(args.path))
    lora = LoraConfig(r=8)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as tiny:
        make(Path(tiny) / "tiny", hidden=64, layers=1)
        if world == 1:
            from qlora.model.load import load_model
            from qlora.model.prepare import prepare_model

            def load(p):
                return prepare_model(load_model(p, progress=False), lora=lora, quant_type=None, verbose=False)
        else:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh

            from qlora.model.shard import load_sharded

            dist.init_process_group("gloo")
            mesh = init_device_mesh("cpu", (world,))

            def load(p):
                return load_sharded(p, lora, rank=dist.get_rank(), world_size=world, device=torch.device("cpu"),
                                    mesh=mesh)
        load(Path(tiny) / "tiny")  # warm-up
    base = reset_peak()
    model = load(args.path)
    growth = peak_bytes() - base
    kept = sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
               for t in list(model.parameters()) + list(model.buffers()))
    print(f"world size {world}, rank {os.environ.get('RANK', '0')}: keeps {kept / 2**20:.0f} MiB, "
          f"peak growth while loading {growth / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
