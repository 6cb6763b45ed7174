"""The memory planner: a run's peak memory from the model config alone (no weights read).

    plan = qlora.plan_memory("llama-65b", seq_len=512, batch_size=1, device_memory="48GB")
    print(plan.table()); plan.total_bytes; plan.fits; plan.suggestions
    qlora memory --model llama-7b --seq-len 512 --device-memory 24GiB [--json]

    shape.py        the model's shape from its config (a shipped name, config.json, .gguf, Hub id)
    activations.py  the activation model: what autograd keeps, op by op, at the peak of backward
    plan.py         plan_memory: the parts, the total, whether it fits, suggestions when not
The trainer's side (the plan of a run, measuring its peak, memory.json) is qlora/train/memory.py.

Every part is counted from first principles, for what this trainer actually holds (HF
model + qlora Linear4bit/LoraLinear, SDPA attention, logits upcast to fp32, cross-entropy,
per-decoder-layer non-reentrant checkpointing as prepare_model enables it). No constant is
fitted to measurements; where a term is an estimate the comment says so.

- weights_4bit: ceil(n/2) bytes per quantized linear weight (two codes a byte).
- quant_constants: per block of `blocksize`, a float32 absmax; with double quantization an
  uint8 absmax + one float32 per 256 blocks; + the code books (16 and 256 float32) per layer.
- kept_16bit: linears --keep-16bit leaves unquantized, in the unquantized params' dtype.
- unquantized_params: embeddings, lm_head (once if tied), biases in the compute dtype if that
  is fp32 else 16-bit (load_model); norms in fp32 (prepare_model).
- lora_params / lora_grads: r * (in + out) fp32 per adapted linear.
- optimizer_state: AdamW m and v: 8 B/param (32-bit) or 2 B + 8 B per 256 (8-bit, tensors
  of >= 4096 elements). Paged on CUDA: only the two 32 MiB staging pages must be on the
  device; the rest can live on the host (`paged_bytes`). On CPU paged state stays in place.
- activations: what autograd saves, per decoder layer, walked op by op (activations.py),
  plus the transient gradients at the peak of backward; with checkpointing one layer is
  saved (recomputed) and every layer keeps only its input (and, with keep_attention, its
  attention kernel's output and logsumexp: selective checkpointing, model/prepare.py).
- decode_workspace: one buffer of the largest quantized weight in the compute dtype; twice on
  CPUs whose 16-bit backward uses a transposed copy (linear4bit.transposed_backward).
- runtime_overhead: CUDA: context + cuBLAS workspace (estimates: CUDA_CONTEXT_BYTES). CPU:
  the measured peak (train/memory.py `measure`) is the peak of live tensor bytes, so
  only the micro-batch's int64 token tensors are counted here. The resident set's peak is
  reported beside it, with what it holds beyond the tensors (code, glibc's kept heap, oneDNN's
  primitive cache, Python objects): not modelled.
- world_size N (FSDP): parameters, gradients and optimizer state divided by N (rounded up);
  activations, workspace and overhead stay per rank; + two all-gathered layers, and the
  root's embeddings and head whole (they stay gathered through the step) with their
  all-gather buffers (overhead).
- method "full16": every weight trainable in 16 bits, AdamW state on all of them; each linear
  saves its input; the norms' and head's extra saves for their weight gradients are not
  counted (small). Paged state on CUDA is counted at its minimum (two staging pages): on a
  card with room to spare the pager keeps it resident and the measured peak is higher.

The total is the sum of the parts, a slight over-estimate by design: LoRA gradients and the
peak activations are counted together (with grad_accum > 1 they do coexist). Not counted:
the loading peak (load_model holds one extra tensor at a time), GPT-2's attention and
residual dropouts (its static parts are exact).
Tests: tests/memory/test_plan_memory.py; measured against the trainer: benchmarks/memory.py.
"""
from .plan import LABELS, PART_NAMES, MemoryPlan, keep_budget, parse_bytes, plan_memory
from .shape import SHIPPED, MemoryPlanError, Shape, load_config, model_shape

__all__ = ["LABELS", "PART_NAMES", "SHIPPED", "MemoryPlan", "MemoryPlanError", "Shape", "load_config", "model_shape",
           "keep_budget", "parse_bytes", "plan_memory"]
