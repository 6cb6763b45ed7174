"""Step 2, 4 bits -> a trainable layer.

    linear4bit.py   Linear4bit: frozen 4-bit weight, decoded on the fly (autograd Function)
    lora.py         LoraLinear + LoraConfig: the trainable low-rank update, merge / unmerge
    lora4bit.py     LoRA over a Linear4bit in one autograd Function (LoraLinear's default path there)
    dora.py         DoraLinear: DoRA (a trained magnitude per output) on the 4-bit base
    dropout.py      seeded dropout: the mask is a hash of (seed, index), regenerated in backward
    fused_lora.py   the opt-in CUDA path: Linear4bit + LoRA in one Triton GEMM per direction
    ops.py          torch.library custom ops (decode, seeded dropout) for torch.compile
"""
from .dora import DoraLinear
from .linear4bit import Linear4bit
from .lora import LoraConfig, LoraLinear

__all__ = ["DoraLinear", "Linear4bit", "LoraConfig", "LoraLinear"]
