"""`qlora explain memory`: where the bytes of a fine-tune go, per parameter and per model.

    from qlora.explain.memory import explain_memory, explain_memory_plan
    explain_memory()["per_param"]     # bytes/param of the 4-bit weight, gradients, AdamW m and v
    explain_memory_plan()             # the memory planner's full plan (None before it exists)

Per-parameter bytes are measured on qlora's own objects: bits_per_param of an NF4 + DQ
weight, element sizes of bf16 / fp32 tensors, and the state qlora.optim.AdamW allocates
after one step (32-bit and 8-bit). The LLaMA-65B totals multiply them by the parameter
counts of qlora.explain.double_quant.LLAMA_SHAPES. `explain_memory_plan` is the only
part that needs qlora.memory.plan_memory (the planner); it is imported lazily.
Tests: tests/test_explain.py.
"""
from __future__ import annotations

import torch

from ..nn.lora import LoraConfig
from ..optim import AdamW
from ..quant.tensor import quantize
from .double_quant import LLAMA_SHAPES, llama_params
from .text import table


def adamw_state_bytes(state_bits: int, n: int = 1 << 16) -> dict[str, float]:
    """Bytes per parameter of each AdamW state tensor (scales included), after one real step."""
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = torch.ones(n)
    opt = AdamW([p], state_bits=state_bits, paged=False)
    opt.step()
    state = opt.state[p]
    if state_bits == 32:
        return {"m": state["exp_avg"].nbytes / n, "v": state["exp_avg_sq"].nbytes / n}
    return {"m": (state["exp_avg_q"].nbytes + state["exp_avg_absmax"].nbytes) / n,
            "v": (state["exp_avg_sq_q"].nbytes + state["exp_avg_sq_absmax"].nbytes) / n}


def lora_params(hidden: int, intermediate: int, layers: int, rank: int) -> int:
    """LoRA parameters r * (in + out) on q, k, v, o, gate, up, down of every layer."""
    return layers * rank * (4 * 2 * hidden + 3 * (hidden + intermediate))


def explain_memory(model: str = "65B", rank: int = 64) -> dict:
    """Per-parameter bytes, the "state is 16x the weight" arithmetic, and LLaMA-`model` totals."""
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    weight_4bit = quantize(w, "nf4", 64, double_quant=True).bits_per_param / 8
    bf16 = torch.empty(0, dtype=torch.bfloat16).element_size()
    adapter = torch.empty(0, dtype=LoraConfig().dtype).element_size()
    s32, s8 = adamw_state_bytes(32), adamw_state_bytes(8)
    per_param = {
        "weight_4bit_nominal": 4 / 8, "weight_4bit": weight_4bit, "weight_bf16": bf16, "grad_bf16": bf16,
        "adamw32_m": s32["m"], "adamw32_v": s32["v"], "adamw8_m": s8["m"], "adamw8_v": s8["v"],
        "lora_param": adapter, "lora_grad": adapter,
    }
    state32 = s32["m"] + s32["v"]
    hidden, inter, layers = LLAMA_SHAPES[model]
    linear, total = llama_params(hidden, inter, layers)
    lora = lora_params(hidden, inter, layers, rank)
    full16_per_param = bf16 + bf16 + state32  # weight + gradient + m + v
    qlora_parts = {
        "4-bit linear weights (NF4 + DQ)": linear * weight_4bit,
        "16-bit embeddings, lm_head, norms": (total - linear) * bf16,
        "LoRA parameters": lora * adapter,
        "LoRA gradients": lora * adapter,
        "AdamW 32-bit m and v of LoRA": lora * state32,
    }
    return {
        "per_param": per_param,
        "state_over_weight_nominal": state32 / per_param["weight_4bit_nominal"],
        "state_over_weight": state32 / weight_4bit,
        "model": f"LLaMA-{model}", "rank": rank, "params": total, "linear": linear, "lora_params": lora,
        "lora_fraction": lora / total,
        "full16_per_param": full16_per_param, "full16_bytes": total * full16_per_param,
        "full16_state_bytes": total * state32,
        "qlora_parts": qlora_parts, "qlora_bytes": sum(qlora_parts.values()),
    }


def render_per_param(d: dict, markdown: bool = False) -> str:
    p = d["per_param"]
    rows = [
        ("base weight, 4-bit NF4 + DQ (codes + constants)", f"{p['weight_4bit']:.4f}"),
        ("base weight, 16-bit (bf16)", f"{p['weight_bf16']:g}"),
        ("gradient of a 16-bit weight (bf16)", f"{p['grad_bf16']:g}"),
        ("AdamW m, 32-bit", f"{p['adamw32_m']:g}"),
        ("AdamW v, 32-bit", f"{p['adamw32_v']:g}"),
        ("AdamW m, 8-bit (codes + a float32 scale per 256)", f"{p['adamw8_m']:.6g}"),
        ("AdamW v, 8-bit (codes + a float32 scale per 256)", f"{p['adamw8_v']:.6g}"),
        ("LoRA parameter (qlora's default fp32 adapters)", f"{p['lora_param']:g}"),
        ("LoRA gradient (same dtype as the adapter)", f"{p['lora_grad']:g}"),
    ]
    return table(["what", "bytes per parameter"], rows, markdown)


def render_totals(d: dict, markdown: bool = False) -> str:
    rows = [(f"full 16-bit fine-tuning: {d['full16_per_param']:g} B x {d['params'] / 1e9:.2f}B parameters",
             f"{d['full16_bytes'] / 1e9:.1f}")]
    rows += [(f"QLoRA: {name}", f"{b / 1e9:.2f}") for name, b in d["qlora_parts"].items()]
    rows.append(("QLoRA total before activations", f"{d['qlora_bytes'] / 1e9:.2f}"))
    return table([f"{d['model']}, LoRA r={d['rank']} on all linear layers", "GB"], rows, markdown)


def explain_memory_plan(model: str = "llama-65b", device_memory: str = "48GB") -> dict | None:
    """The memory planner's plan for `model` at its defaults (the QLoRA recipe), or None
    when this build has no planner (qlora.memory). Keys: total_bytes, fits, parts, table."""
    try:
        from ..memory import plan_memory
    except ImportError:
        return None
    plan = plan_memory(model, device_memory=device_memory)
    return {"model": model, "device_memory": device_memory, "total_bytes": plan.total_bytes, "fits": plan.fits,
            "parts": dict(plan.parts), "paged_bytes": plan.paged_bytes, "table": plan.table()}
