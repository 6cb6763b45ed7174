"""qlora: fine-tune large language models with a frozen 4-bit base and LoRA adapters.

The data flow, one folder a step:
    quant/   numbers -> 4 bits (NF4/FP4/INT4, double quantization, native kernels)
    nn/      4 bits -> a trainable layer (Linear4bit, LoraLinear)
    model/   a transformers model -> a QLoRA model (prepare, adapters, load, save, merge)
    optim/   the update (AdamW 32/8-bit, paged state, schedules)
    train/   the loop (config, data, checkpoints, resume, reports, generate)
    explain/ `qlora explain`: how it all works, with numbers computed on the spot
    memory.py  `qlora memory`: a run's peak memory, planned from the config alone
"""
from . import explain, optim
from .errors import CheckpointError, QloraError, TrainingError
from .memory import MemoryPlan, plan_memory
from .model.adapter import load_adapter, save_adapter
from .model.load import load_model
from .model.prepare import memory_report, prepare_model
from .model.save import merge_adapter, save_quantized
from .model.shard import load_sharded
from .nn.linear4bit import Linear4bit
from .nn.lora import LoraConfig, LoraLinear
from .quant.codebooks import FP4, INT4, NF4, derive_nf4, dynamic_map
from .quant.tensor import QuantizedTensor, quantize
from .train import TrainConfig
from .train.loop import train as finetune  # `qlora.train` stays the subpackage

__version__ = "0.1.0"

__all__ = [
    "FP4", "INT4", "NF4", "CheckpointError", "Linear4bit", "LoraConfig", "LoraLinear", "MemoryPlan",
    "QloraError", "QuantizedTensor", "TrainConfig", "TrainingError", "derive_nf4", "dynamic_map", "explain", "finetune",
    "load_adapter", "load_model", "load_sharded", "memory_report", "merge_adapter", "optim", "plan_memory",
    "prepare_model", "quantize", "save_adapter", "save_quantized",
]
