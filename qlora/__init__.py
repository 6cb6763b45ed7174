"""qlora: fine-tune large language models with a frozen 4-bit base and LoRA adapters.

The data flow, one folder a step, each floor importing only from itself and the floors
above it in this list (docs/architecture.md; tests/test_architecture.py checks it):
    errors.py, rows.py, assets/   the ground: the error family, data files -> rows, shipped files
    kernels/   native (C) and Triton kernels: 4-bit decode / quantize, seeded dropout, fused GEMMs
    quant/     numbers -> 4 bits (NF4/FP4/INT4, double quantization, 8-bit codes, GPTQ, LoftQ)
    nn/        4 bits -> a trainable layer (Linear4bit, LoraLinear, seeded dropout)
    model/     a transformers model -> a QLoRA model (prepare, load, adapters, save, merge, shard)
    optim/     the update (AdamW 32/8-bit, paged state, schedules)
    memory/    `qlora memory`: a run's peak memory, planned from the config alone
    train/     the loop (config, data, checkpoints, torchrun, memory.json, reports, generate)
    explain/, cli.py, threads.py   the front door: `qlora explain`, the `qlora` command, OpenMP
               workers that sleep when idle (threads.py: set on import, before torch loads)
"""
from .threads import prefer_passive_openmp

prefer_passive_openmp()  # before anything imports torch: libgomp reads it once, at load

from . import explain, optim  # noqa: E402
from .errors import CheckpointError, QloraError, TrainingError
from .memory import MemoryPlan, plan_memory
from .model.adapter import load_adapter, save_adapter
from .model.attention import set_attention
from .model.load import load_model
from .model.prepare import compile_layers, memory_report, prepare_model
from .model.save import merge_adapter, save_quantized
from .model.shard import load_sharded
from .nn.dora import DoraLinear
from .nn.linear4bit import Linear4bit
from .nn.lora import LoraConfig, LoraLinear
from .quant.codebooks import FP4, INT4, NF4, derive_nf4, dynamic_map
from .quant.tensor import QuantizedTensor, quantize
from .train import TrainConfig
from .train.loop import train as finetune  # `qlora.train` stays the subpackage

__version__ = "0.1.0"

__all__ = [
    "FP4", "INT4", "NF4", "CheckpointError", "DoraLinear", "Linear4bit", "LoraConfig", "LoraLinear", "MemoryPlan",
    "QloraError", "QuantizedTensor", "TrainConfig", "TrainingError", "compile_layers", "derive_nf4", "dynamic_map",
    "explain", "finetune",
    "load_adapter", "load_model", "load_sharded", "memory_report", "merge_adapter", "optim", "plan_memory",
    "prepare_model", "quantize", "save_adapter", "save_quantized", "set_attention",
]
