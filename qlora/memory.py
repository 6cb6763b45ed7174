"""The memory planner: a run's peak memory from the model config alone (no weights read).

    plan = qlora.plan_memory("llama-65b", seq_len=512, batch_size=1, device_memory="48GB")
    print(plan.table()); plan.total_bytes; plan.fits; plan.suggestions
    qlora memory --model llama-7b --seq-len 512 --device-memory 24GiB [--json]

Every part is counted from first principles, for what this trainer actually holds (HF
model + qlora Linear4bit/LoraLinear, SDPA attention, logits upcast to fp32, cross-entropy,
per-decoder-layer non-reentrant checkpointing as prepare_model enables it). No constant is
fitted to measurements; where a term is an estimate the comment says so.

- weights_4bit: ceil(n/2) bytes per quantized linear weight (two codes a byte).
- quant_constants: per block of `blocksize`, a float32 absmax; with double quantization an
  uint8 absmax + one float32 per 256 blocks; + the code books (16 and 256 float32) per layer.
- unquantized_params: embeddings, lm_head (once if tied), biases in the compute dtype if that
  is fp32 else 16-bit (load_model); norms in fp32 (prepare_model).
- lora_params / lora_grads: r * (in + out) fp32 per adapted linear.
- optimizer_state: AdamW m and v: 8 B/param (32-bit) or 2 B + 8 B per 256 (8-bit, tensors
  of >= 4096 elements). Paged on CUDA: only the two 32 MiB staging pages must be on the
  device; the rest can live on the host (`paged_bytes`). On CPU paged state stays in place.
- activations: what autograd saves, per decoder layer, walked op by op (see `_layer_saves`),
  plus the transient gradients at the peak of backward; with checkpointing one layer is
  saved (recomputed) and every layer keeps only its input (and, with keep_attention, its
  attention kernel's output and logsumexp: selective checkpointing, model/prepare.py).
- decode_workspace: one buffer of the largest quantized weight in the compute dtype; twice on
  CPUs whose 16-bit backward uses a transposed copy (linear4bit.transposed_backward).
- runtime_overhead: CUDA: context + cuBLAS workspace (estimates: CUDA_CONTEXT_BYTES). CPU:
  the measured peak (`measure`) is the peak of live tensor bytes (model/live_bytes.py), so
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
Tests: tests/test_plan_memory.py; measured against the trainer: benchmarks/memory.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QloraError
from .optim.adamw import MIN_8BIT_SIZE
from .quant.blockwise8 import BLOCK as STATE_BLOCK
from .model.loss import CHUNK_BYTES as CE_CHUNK_BYTES
from .optim.paging import DEFAULT_PAGE_BYTES
from .model.live_bytes import LiveTensorPeak

if TYPE_CHECKING:
    import torch

PART_NAMES = ("weights_4bit", "quant_constants", "unquantized_params", "lora_params", "lora_grads",
              "optimizer_state", "activations", "decode_workspace", "runtime_overhead")
LABELS = {"weights_4bit": "4-bit weights", "quant_constants": "quantization constants",
          "unquantized_params": "unquantized params (embeddings, lm_head, norms, biases)",
          "lora_params": "LoRA parameters", "lora_grads": "LoRA gradients", "optimizer_state": "optimizer state",
          "activations": "activations (peak of backward)", "decode_workspace": "decode workspace",
          "runtime_overhead": "runtime overhead"}
SHIPPED = ("llama-7b", "llama-13b", "llama-33b", "llama-65b")
OPTIMS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
METHODS = ("qlora", "lora16", "full16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NESTED_BLOCK = 256  # blocks per float32 scale of the double quantization (formats.md section 3)

CUDA_CONTEXT_BYTES = 512 << 20
"""CUDA context, kernels and cuBLAS handle outside PyTorch's allocator: an estimate (nvidia-smi
minus torch.cuda.memory_reserved is typically 0.3-0.6 GiB on Ampere/Hopper with CUDA 12 lazy
module loading; not measured here, the build machine has no GPU)."""
CUBLAS_WORKSPACE_BYTES = 32 << 20
"""cuBLAS workspace PyTorch allocates per handle/stream on Hopper (:4096:8 + 32 MiB config)."""


class MemoryPlanError(QloraError, ValueError):
    """The planner cannot read the model or a setting is invalid; the message says what to do."""


# ---- reading a config ----------------------------------------------------------------------------
def parse_bytes(value: int | str | None) -> int | None:
    """Bytes of "24GiB", "48GB", "512MiB", "1e9" or an int; None stays None."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(value))
    if not m:
        raise MemoryPlanError(f"device memory {value!r}: write e.g. 24GiB, 48GB, 80000MB or a number of bytes")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(float(m.group(1)) * scale[unit])


def load_config(model: Any) -> dict:
    """The config dict of a shipped name, config.json path, model directory, Hub id, dict or
    transformers PretrainedConfig (only config.json is read)."""
    if isinstance(model, dict):
        return dict(model)
    if hasattr(model, "to_dict"):
        return model.to_dict()
    name = str(model)
    if name in SHIPPED:
        from .assets import asset_path

        return json.loads((asset_path("configs") / f"{name}.json").read_text())
    path = Path(name)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()):
        from .model.checkpoint_files import resolve

        path = resolve(path)  # its config.json, translated from the GGUF metadata (model/gguf_model.py)
    if path.is_file():
        return json.loads(path.read_text())
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MemoryPlanError(f"{path}: no config.json in this directory")
        return json.loads((path / "config.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except Exception as e:  # offline, unknown repo, gated
        raise MemoryPlanError(f"--model {name!r}: not a shipped config ({', '.join(SHIPPED)}), a file or a directory, "
                              f"and its config.json could not be fetched from the Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); pass a local config.json") from None


@dataclass
class Shape:
    """The numbers of a decoder-only model that memory depends on."""

    family: str  # llama (also mistral, qwen2, gemma), phi3, gpt2
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    positions: int = 0  # learned position embeddings (GPT-2)
    qkv_bias: bool = False
    norm_offset: bool = False  # Gemma's RMSNorm scales by (1 + weight)

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(module suffix, in, out, bias) of one decoder layer's linear layers, in call order."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == "gpt2":
            return [("attn.c_attn", h, 3 * h, True), ("attn.c_proj", h, h, True), ("mlp.c_fc", h, i, True),
                    ("mlp.c_proj", i, h, True)]
        if self.family == "phi3":
            return [("self_attn.qkv_proj", h, q + 2 * kv, False), ("self_attn.o_proj", q, h, False),
                    ("mlp.gate_up_proj", h, 2 * i, False), ("mlp.down_proj", i, h, False)]
        b = self.qkv_bias
        return [("self_attn.q_proj", h, q, b), ("self_attn.k_proj", h, kv, b), ("self_attn.v_proj", h, kv, b),
                ("self_attn.o_proj", q, h, False), ("mlp.gate_proj", h, i, False), ("mlp.up_proj", h, i, False),
                ("mlp.down_proj", i, h, False)]

    def layer_prefix(self, layer: int) -> str:
        return f"transformer.h.{layer}." if self.family == "gpt2" else f"model.layers.{layer}."

    def norm_elements(self) -> int:
        """Elements of all norm parameters (2 per layer + the final; LayerNorm has a bias)."""
        per = 2 * self.hidden if self.family == "gpt2" else self.hidden
        return (2 * self.layers + 1) * per


def model_shape(config: dict) -> Shape:
    """A Shape from a transformers config dict; raises naming the missing key."""
    kind = str(config.get("model_type", "llama")).lower()

    def need(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        if default is not None:
            return default
        raise MemoryPlanError(f"config ({kind}) has none of {keys}; the planner needs it")

    if kind == "gpt2":
        h = need("n_embd", "hidden_size")
        return Shape("gpt2", h, need("n_inner", default=4 * h) or 4 * h, need("n_layer", "num_hidden_layers"),
                     need("n_head", "num_attention_heads"), need("n_head", "num_attention_heads"),
                     h // need("n_head", "num_attention_heads"), need("vocab_size"), True,
                     positions=need("n_positions", "max_position_embeddings"))
    family = "phi3" if kind in ("phi3", "phi4") else "llama"
    if kind not in ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "mixtral") and "architectures" in config:
        archs = " ".join(config["architectures"] or [])
        if not any(a in archs for a in ("Llama", "Mistral", "Qwen2", "Gemma", "Phi3")):
            raise MemoryPlanError(f"model_type {kind!r} ({archs}): the planner knows Llama, Mistral, Qwen2, Gemma, "
                                  "Phi-3 and GPT-2 layouts; pass a config of one of those families")
    h = need("hidden_size")
    heads = need("num_attention_heads")
    return Shape(family, h, need("intermediate_size"), need("num_hidden_layers"), heads,
                 need("num_key_value_heads", default=heads), config.get("head_dim") or h // heads,
                 need("vocab_size"), bool(config.get("tie_word_embeddings", kind == "gemma")),
                 qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
                 norm_offset=kind.startswith("gemma"))


def _selected(name: str, target: str | list[str] | tuple[str, ...]) -> bool:
    """prepare.select_modules' rule: "all-linear", a list of suffixes, or a regex over full names."""
    if isinstance(target, str):
        if target == "all-linear":
            return True
        if "," in target or target.isidentifier():
            target = [s.strip() for s in target.split(",")]
        else:
            return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


# ---- activations: what autograd keeps --------------------------------------------------------
def _layer_saves(s: Shape, b: int, t: int, lora: dict[str, bool], *, e: int, r: int,
                 masked: bool, stream_grad: bool) -> int:
    """Bytes autograd saves for one decoder layer, walked op by op as HF runs it.

    `lora[suffix]` says which linears carry an adapter; `stream_grad` whether the layer input
    requires grad (always with checkpointing; without it, not for layer 0: the embeddings are
    frozen). A frozen Linear4bit saves nothing (its input gradient needs only W); a LoRA
    saves its input x (for A's gradient; with dropout, the seeded mask is regenerated from
    x's indices in backward, so q, k and v share one saved x and no mask) and A's output (for
    B's). Elementwise ops save an operand only when the other one requires grad (frozen norm
    weights and RoPE tables never do).
    """
    n = b * t  # tokens
    saved = 0
    seen: set[str] = set()  # tensors saved by several ops count once

    def keep(key: str, nbytes: int) -> None:
        nonlocal saved
        if key not in seen:
            seen.add(key)
            saved += nbytes

    def linear(suffix: str, x_key: str, width: int, x_grad: bool) -> bool:
        """A (LoRA-)linear on tensor `x_key` of `width`; returns whether its output requires grad."""
        if not lora.get(suffix, False):
            return x_grad
        keep(x_key, n * width * e)  # x itself; seeded dropout is regenerated in backward (nn/dropout.py)
        keep(suffix + ".a", n * r * e)
        return True

    def norm(key: str, x_grad: bool) -> None:
        if x_grad:  # RMSNorm/LayerNorm: input x and the per-token rsqrt (fp32) / mean+rstd
            keep(key, n * s.hidden * e)
            keep(key + ".rstd", n * 4 * (2 if s.family == "gpt2" else 1))
            if s.norm_offset:  # Gemma: output * (1 + weight) saves the fp32 (1 + weight)
                keep(key + ".w", s.hidden * 4)

    h, q_dim, kv_dim = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    g = stream_grad
    norm("x", g)
    if s.family == "phi3":
        qkv = linear("self_attn.qkv_proj", "n1", h, g)
        qg = kg = vg = qkv
    elif s.family == "gpt2":
        qkv = linear("attn.c_attn", "n1", h, g)
        qg = kg = vg = qkv
    else:
        qg = linear("self_attn.q_proj", "n1", h, g)
        kg = linear("self_attn.k_proj", "n1", h, g)
        vg = linear("self_attn.v_proj", "n1", h, g)
    attn_grad = qg or kg or vg
    if attn_grad:
        # SDPA (flash/efficient kernels, CPU and CUDA) saves q, k, v, out and the fp32 logsumexp.
        # With a padding mask, HF repeats k/v to all heads (repeat_kv) and SDPA saves a float
        # [b, 1, t, t] mask per call; without one, is_causal and GQA in the kernel.
        repeated = masked and s.kv_heads != s.heads
        kv_saved = q_dim if repeated else kv_dim
        fused = n * (q_dim + 2 * kv_dim) * e  # gpt2: q, k, v are slices of c_attn's output
        if s.family == "gpt2" and not repeated:  # no RoPE: q, k and v are all views of c_attn's output
            keep("qkv", fused)
        else:
            keep("q", n * q_dim * e)  # RoPE makes new q and k tensors
            keep("k", n * kv_saved * e)
            # phi3's v is a view of the fused qkv output (no cache in training): its whole storage
            keep("v", fused if s.family == "phi3" and not repeated else n * kv_saved * e)
        keep("attn_out", n * q_dim * e)  # also o_proj's input: the kernel's output is [b, t, heads, d]
        keep("lse", n * s.heads * 4)
        if masked:
            keep("mask", b * t * t * e)
    o_suffix = "attn.c_proj" if s.family == "gpt2" else "self_attn.o_proj"
    # SDPA's output takes the query's memory layout: [b, t, heads, d] after HF's RoPE on a
    # transposed view, so o_proj's input (transpose(1, 2).contiguous()) is the same tensor; Phi-3
    # builds q with torch.cat (head-major), so its o_proj input is a copy (checked on CPU; on
    # CUDA the flash kernel's layout rule is assumed to be the same).
    og = linear(o_suffix, "attn_out" if s.family != "phi3" else "attn_out_copy", q_dim, attn_grad)
    g = g or og
    norm("x2", g)
    i = s.intermediate
    if s.family == "gpt2":
        ug = linear("mlp.c_fc", "n2", h, g)
        if ug:  # gelu(tanh) saves its input
            keep("fc_out", n * i * e)
        linear("mlp.c_proj", "act", i, ug)
    else:
        if s.family == "phi3":
            gg = ug = linear("mlp.gate_up_proj", "n2", h, g)
        else:
            gg = linear("mlp.gate_proj", "n2", h, g)
            ug = linear("mlp.up_proj", "n2", h, g)
        if gg:  # act(gate) saves gate
            keep("gate", n * i * e)
        if ug:  # act(gate) * up saves act(gate)
            keep("act", n * i * e)
        if gg:  # ... and up
            keep("up", n * i * e)
        linear("mlp.down_proj", "prod", i, gg or ug)
    return saved


def _backward_transient(s: Shape, b: int, t: int, e: int) -> int:
    """Gradients alive at once inside one decoder layer's backward (estimate, derived):
    at the MLP product, grad of the product + grads of both factors (3 x [n, intermediate]),
    plus the residual-stream gradient and the gradient accumulating for the norm output
    (2 x [n, hidden])."""
    n = b * t
    width = s.intermediate * (2 if s.family == "phi3" else 1)  # phi3: grad of the fused gate_up output
    return n * e * (3 * width + 2 * s.hidden)


def activation_bytes(s: Shape, *, seq_len: int, batch_size: int, rank: int, lora: dict[str, bool], e: int,
                     checkpointing: bool, masked: bool, targets: int | None = None,
                     keep_attention: bool = False) -> dict[str, int]:
    """The activation memory at the peak of backward, and its pieces (bytes)."""
    n = batch_size * seq_len
    full = _layer_saves(s, batch_size, seq_len, lora, e=e, r=rank, masked=masked,
                        stream_grad=True)
    first = full if checkpointing else _layer_saves(s, batch_size, seq_len, lora, e=e, r=rank, masked=masked,
                                                    stream_grad=False)
    rope = 0 if s.family == "gpt2" else 2 * seq_len * s.head_dim * e  # cos, sin: shared by all layers
    # the head (model/loss.py, fused and chunked): the final norm saves its input (+ rstd); the
    # fused loss saves only d loss / d h for the target rows (n - b: the labels shift by one),
    # computed in forward, and the boolean mask that picked those rows. While it runs, one chunk of
    # logits exists: in float32 (softmax in place), beside the 16-bit logits it was copied from
    # and later the 16-bit probabilities multiplied by W (none of these copies in fp32 compute).
    targets = n - batch_size if targets is None else min(targets, n - batch_size)
    rows = min(targets, max(1, CE_CHUNK_BYTES // (4 * s.vocab)))
    head_saved = (n * s.hidden * e + n * 4 + targets * s.hidden * e + targets
                  + (4 * s.hidden if s.norm_offset else 0))
    head_peak = rows * s.vocab * (4 + (e if e < 4 else 0)) + targets * s.hidden * e  # + the gathered rows
    transient = _backward_transient(s, batch_size, seq_len, e)
    if checkpointing:
        # each checkpointed layer keeps its input and, with keep_attention, what its attention
        # kernel returned (the output and the fp32 logsumexp), which the recompute then skips
        kept = n * s.hidden * e + (n * s.heads * s.head_dim * e + n * s.heads * 4 if keep_attention else 0)
        at_head = s.layers * kept + rope + head_saved + head_peak
        # the last layer recomputed (its kept attention output counted in `full`), then its backward
        in_layer = s.layers * kept - (kept - n * s.hidden * e) + rope + full + transient
    else:
        layers = first + (s.layers - 1) * full + rope
        at_head = layers + head_saved + head_peak
        in_layer = layers + n * s.hidden * e + transient
    peak = max(at_head, in_layer)
    saved = at_head - head_peak  # what autograd holds when the forward ends
    return {"peak": peak, "saved": saved, "per_layer": full, "at_head": at_head, "in_layer": in_layer,
            "logits": head_saved + head_peak}


# ---- the plan ---------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Predicted peak memory of a fine-tuning run, by part (bytes); see the module docstring."""

    parts: dict[str, int]
    total_bytes: int
    fits: bool | None
    device_memory: int | None
    paged_bytes: int
    suggestions: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "fits": self.fits, "parts": dict(self.parts),
                "device_memory": self.device_memory, "paged_bytes": self.paged_bytes,
                "suggestions": list(self.suggestions), "settings": dict(self.settings), "details": dict(self.details)}

    def table(self) -> str:
        st = self.settings
        head = (f"memory plan: {st['model']} ({st['method']}, {st['quant_type'] if st['method'] == 'qlora' else '16-bit'}"
                f"{' + DQ' if st['method'] == 'qlora' and st['double_quant'] else ''}), seq {st['seq_len']} x batch "
                f"{st['batch_size']}, r={st['rank']}, {st['optim']}, checkpointing "
                f"{('on, keeping attention' if st.get('keep_attention') else 'on') if st['gradient_checkpointing'] else 'off'}"
                f", {st['compute_dtype']} on {st['device']}"
                + (f", world size {st['world_size']}" if st["world_size"] > 1 else ""))
        lines = [head, f"  {'part':<56} {'MiB':>12} {'GB':>9}"]
        full = st["method"] == "full16"
        for k, v in self.parts.items():
            label = LABELS[k]
            if st["method"] != "qlora" and k == "unquantized_params":
                label = "16-bit weights (all), norms fp32"
            if full and k == "lora_grads":
                label = "gradients (all weights, 16-bit)"
            if k == "optimizer_state" and self.paged_bytes:
                label += f" (+{self.paged_bytes / 2**20:,.0f} MiB paged on host)"
            lines.append(f"  {label:<56} {v / 2**20:>12,.1f} {v / 1e9:>9.3f}")
        lines.append(f"  {'total (predicted peak)':<56} {self.total_bytes / 2**20:>12,.1f} {self.total_bytes / 1e9:>9.3f}")
        d = self.details
        dq = (f"{'without' if st['double_quant'] else 'with'} double quantization the constants would be "
              f"{d['quant_constants_other_dq'] / 2**20:,.1f} MiB; " if st["method"] == "qlora" else "")
        lines.append(f"  ({d['trainable_params']:,} trainable of {d['total_params']:,} parameters; {dq}activations "
                     f"{'without' if st['gradient_checkpointing'] else 'with'} checkpointing "
                     f"{d['activations_other_checkpointing'] / 2**20:,.1f} MiB)")
        lines.append(f"  measured peak convention: {d['measured_as']}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.device_memory / 2**30:,.1f} GiB ({self.device_memory / 1e9:,.1f} GB)")
            for s in self.suggestions:
                lines.append(f"    - {s}")
        return "\n".join(lines)


def plan_memory(model: Any, *, seq_len: int = 512, batch_size: int = 1, rank: int = 64,
                target_modules: str | list[str] = "all-linear", optim: str = "paged_adamw",
                gradient_checkpointing: bool = True, keep_attention: bool = False, quant_type: str = "nf4",
                double_quant: bool = True,
                blocksize: int = 64, compute_dtype: str = "bfloat16", method: str = "qlora", world_size: int = 1,
                device_memory: int | str | None = None, device: str = "cuda", lora_dropout: float = 0.05,
                padded: bool | None = None, target_tokens: int | None = None, _suggest: bool = True) -> MemoryPlan:
    """Predict the peak memory of fine-tuning `model` (a config; see the module docstring).

    Extra keywords beyond the shared contract: `device` ("cuda": the question "does it fit my
    card"; "cpu": what this trainer measures here), `lora_dropout` (recorded; the seeded
    dropout keeps no mask), `padded` (rows padded to a common length, so SDPA gets a mask;
    default: batch_size > 1), `target_tokens` (labelled tokens per micro-batch, which go
    through the fused head; default: all but the first of each row).
    """
    settings = dict(model=str(model) if not isinstance(model, dict) else model.get("_name_or_path", "config"),
                    seq_len=seq_len, batch_size=batch_size, rank=rank, target_modules=target_modules, optim=optim,
                    gradient_checkpointing=gradient_checkpointing, keep_attention=keep_attention,
                    quant_type=quant_type, double_quant=double_quant,
                    blocksize=blocksize, compute_dtype=compute_dtype, method=method, world_size=world_size,
                    device=device, lora_dropout=lora_dropout, padded=padded, target_tokens=target_tokens)
    _check(settings)
    if hasattr(model, "to_dict") and not isinstance(model, dict):
        settings["model"] = getattr(model, "_name_or_path", "") or type(model).__name__
    shape = model_shape(load_config(model))
    e = DTYPE_BYTES[compute_dtype]
    cuda = device == "cuda"
    masked = batch_size > 1 if padded is None else padded
    store = 4 if compute_dtype == "float32" else 2  # unquantized tensors (load_model)
    parts = dict.fromkeys(PART_NAMES, 0)
    details: dict[str, Any] = {}

    # ---- parameters ----
    lora_on: dict[str, bool] = {}
    linear_params = lora_count = lora_state = biases = 0
    absmax_fp32 = absmax_dq = 0
    largest = 0
    for layer in range(shape.layers):
        for suffix, fan_in, fan_out, bias in shape.linears():
            name = shape.layer_prefix(layer) + suffix
            numel = fan_in * fan_out
            linear_params += numel
            biases += fan_out if bias else 0
            largest = max(largest, numel)
            blocks = -(-numel // blocksize)
            absmax_fp32 += 4 * blocks + 16 * 4  # float32 absmax + the 16-entry code book
            absmax_dq += blocks + 4 * -(-blocks // NESTED_BLOCK) + 16 * 4 + 256 * 4
            parts["weights_4bit"] += -(-numel // 2)
            if method != "full16" and _selected(name, target_modules):
                lora_on[suffix] = True
                for numel_ad in (rank * fan_in, fan_out * rank):
                    lora_count += numel_ad
                    lora_state += _adam_state_bytes(numel_ad, optim)
    if method != "full16" and not lora_count:
        raise MemoryPlanError(f"target_modules={target_modules!r} selects no linear layer of this {shape.family} "
                              f"model; its layers are {[x[0] for x in shape.linears()]}")
    embed = shape.vocab * shape.hidden + shape.positions * shape.hidden
    head = 0 if shape.tied else shape.vocab * shape.hidden
    norms = shape.norm_elements()
    total_params = linear_params + biases + embed + head + norms
    details.update(total_params=total_params, linear_params=linear_params, embedding_params=embed,
                   lm_head_params=head, norm_params=norms, bias_params=biases,
                   quant_constants_other_dq=absmax_fp32 if double_quant else absmax_dq)

    if method == "qlora":
        parts["quant_constants"] = absmax_dq if double_quant else absmax_fp32
        parts["unquantized_params"] = store * (embed + head + biases) + 4 * norms
        parts["decode_workspace"] = largest * e * (2 if device == "cpu" and e == 2 and _cpu_transposed() else 1)
    else:  # 16-bit base: every weight in the 16-bit compute dtype (fp32 only if asked)
        parts["weights_4bit"] = 0
        parts["unquantized_params"] = store * (linear_params + embed + head + biases) + 4 * norms
    if method == "full16":
        trainable = total_params
        parts["lora_params"] = 0
        parts["lora_grads"] = store * total_params  # gradients in the weights' dtype
        state = sum(_adam_state_bytes(n, optim) for n in _param_sizes(shape))
    else:
        trainable = lora_count
        parts["lora_params"] = parts["lora_grads"] = 4 * lora_count
        state = lora_state
    details["trainable_params"] = trainable

    # ---- optimizer state: resident, or paged through two staging pages ----
    paged = 0
    state = -(-state // world_size)  # FSDP: each rank holds the state of its shards
    if optim.startswith("paged") and cuda:  # the two staging pages are per rank
        resident = min(state, 2 * DEFAULT_PAGE_BYTES)
        paged, state = state - resident, resident
    parts["optimizer_state"] = state

    # ---- activations ----
    lora = {k: True for k in lora_on} if method != "full16" else {x[0]: True for x in shape.linears()}
    # full16: a dense Linear saves its input for the weight gradient, like a LoRA's A (rank 0: no xa)
    kw = dict(seq_len=seq_len, batch_size=batch_size, rank=rank if method != "full16" else 0, lora=lora, e=e,
              masked=masked, targets=target_tokens)
    act = activation_bytes(shape, checkpointing=gradient_checkpointing, keep_attention=keep_attention, **kw)
    other = activation_bytes(shape, checkpointing=not gradient_checkpointing, **kw)
    parts["activations"] = act["peak"]
    details.update(activations_per_layer=act["per_layer"], activations_saved=act["saved"],
                   activations_at_head=act["at_head"],
                   activations_in_layer=act["in_layer"], activations_other_checkpointing=other["peak"])

    # ---- runtime ----
    if cuda:
        parts["runtime_overhead"] = CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES
        details["measured_as"] = ("CUDA: growth of torch.cuda.max_memory_allocated() + the memory outside "
                                  "PyTorch's allocator at the end (context; total - free - reserved); the card "
                                  "also holds the allocator's cached-but-free blocks")
    else:
        # input_ids, labels, attention_mask (int64) of the micro-batches the loop holds at once
        parts["runtime_overhead"] = 3 * 8 * batch_size * seq_len
        details["measured_as"] = ("CPU: the peak of live tensor bytes from the load on, as torch's allocator "
                                  "reports them (qlora/model/live_bytes.py, memory.measure)")

    # ---- FSDP: parameters, gradients and state are sharded over the ranks ----
    if world_size > 1:
        layer_bytes = sum(parts[k] for k in ("weights_4bit", "quant_constants", "lora_params")) // shape.layers
        for k in ("weights_4bit", "quant_constants", "unquantized_params", "lora_params", "lora_grads"):
            parts[k] = -(-parts[k] // world_size)
        # each rank all-gathers one decoder layer's shards for compute and prefetches the next
        # (FSDP2's default): two unsharded layers beside the shards (estimate: per-layer average)
        gathered = 2 * layer_bytes * (world_size - 1) // world_size
        # the root (embeddings, head) is gathered once and stays unsharded through forward and
        # backward; its all-gather holds a copy-in shard and a whole output buffer beside the
        # unsharded tensors while it copies out (counted too, though it ends before backward)
        root = store * (embed + head)
        gathered += root * (world_size - 1) // world_size + root + -(-root // world_size)
        parts["runtime_overhead"] += gathered
        details["fsdp_all_gather_bytes"] = gathered
    total = sum(parts.values())
    limit = parse_bytes(device_memory)
    plan = MemoryPlan(parts, total, None if limit is None else total <= limit, limit, paged, [], settings, details)
    if limit is not None and not plan.fits and _suggest:
        plan.suggestions = _suggestions(model, settings, limit)
    return plan


def _check(st: dict) -> None:
    checks = [
        (st["method"] in METHODS, f"method must be one of {METHODS}"),
        (st["quant_type"] in ("nf4", "fp4", "int4"), "quant_type must be nf4, fp4 or int4"),
        (st["optim"] in OPTIMS, f"optim must be one of {OPTIMS}"),
        (st["compute_dtype"] in DTYPE_BYTES, f"compute_dtype must be one of {tuple(DTYPE_BYTES)}"),
        (st["device"] in ("cuda", "cpu"), "device must be cuda or cpu"),
        (st["seq_len"] >= 1 and st["batch_size"] >= 1 and st["rank"] >= 1, "seq_len, batch_size and rank must be >= 1"),
        (st["world_size"] >= 1, "world_size must be >= 1"),
        (st["blocksize"] >= 16, "blocksize must be >= 16"),
    ]
    for ok, msg in checks:
        if not ok:
            raise MemoryPlanError(msg)


def _cpu_transposed() -> bool:
    import torch

    from .nn.linear4bit import transposed_backward

    return transposed_backward(torch.device("cpu"), torch.bfloat16)


def _adam_state_bytes(numel: int, optim: str) -> int:
    """AdamW m + v of one parameter (qlora/optim/adamw.py)."""
    if optim.endswith("8bit") and numel >= MIN_8BIT_SIZE:
        return 2 * numel + 2 * 4 * -(-numel // STATE_BLOCK)
    return 8 * numel


def _param_sizes(s: Shape) -> list[int]:
    sizes = [fi * fo for _, fi, fo, _ in s.linears()] * s.layers
    sizes += [fo for _, _, fo, b in s.linears() if b] * s.layers
    sizes += [s.vocab * s.hidden] + ([s.vocab * s.hidden] if not s.tied else [])
    if s.positions:
        sizes.append(s.positions * s.hidden)
    return sizes + [s.hidden] * (s.norm_elements() // s.hidden)


def _suggestions(model: Any, st: dict, limit: int) -> list[str]:
    """The cheapest single changes (then pairs) that make the plan fit, with the total each gives."""
    base = {k: st[k] for k in ("seq_len", "batch_size", "rank", "target_modules", "optim", "gradient_checkpointing",
                               "keep_attention", "quant_type", "double_quant", "blocksize", "compute_dtype", "method",
                               "world_size", "device", "lora_dropout", "padded", "target_tokens")}
    changes: list[tuple[str, dict]] = []
    if not st["gradient_checkpointing"]:
        changes.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    elif st["keep_attention"]:
        changes.append(("without --keep-attention", {"keep_attention": False}))
    if st["method"] == "qlora" and not st["double_quant"]:
        changes.append(("--double-quant", {"double_quant": True}))
    if not st["optim"].startswith("paged") and st["device"] == "cuda":
        changes.append((f"--optim paged_{st['optim']}", {"optim": "paged_" + st["optim"]}))
    if not st["optim"].endswith("8bit"):
        changes.append((f"--optim {st['optim']}8bit", {"optim": st["optim"] + "8bit"}))
    if st["method"] != "qlora":
        changes.append(("--method qlora", {"method": "qlora"}))
    b = st["batch_size"]
    while b > 1:
        b //= 2
        changes.append((f"--batch-size {b} (raise grad_accum to keep the effective batch)", {"batch_size": b}))
    s = st["seq_len"]
    while s > 128:
        s //= 2
        changes.append((f"--seq-len {s}", {"seq_len": s}))
    r = st["rank"]
    while r > 8:
        r //= 2
        changes.append((f"--rank {r}", {"rank": r}))
    found: list[tuple[int, str]] = []
    for label, delta in changes:
        total = plan_memory(model, **{**base, **delta}, _suggest=False).total_bytes
        if total <= limit:
            found.append((total, label))
    if not found:  # pairs of the quality-neutral changes
        neutral = [c for c in changes if "seq-len" not in c[0] and "rank" not in c[0]]
        for i, (l1, d1) in enumerate(neutral):
            for l2, d2 in neutral[i + 1:]:
                total = plan_memory(model, **{**base, **d1, **d2}, _suggest=False).total_bytes
                if total <= limit:
                    found.append((total, f"{l1} and {l2}"))
    if not found:
        return ["no single or paired change fits: use a bigger device, --world-size N (FSDP), or a smaller model"]
    # cheapest first: changes that keep the model's quality (checkpointing, paging, 8-bit, DQ) before
    # ones that change the training (batch, sequence, rank); within each, the largest total that fits
    def cost(item: tuple[int, str]) -> tuple[int, int]:
        label = item[1]
        return (1 if any(w in label for w in ("--seq-len", "--rank", "--batch-size")) else 0, -item[0])
    seen, out = set(), []
    for total, label in sorted(found, key=cost):
        key = label.split(" ")[0] + label.split(" ")[-1]
        if label.startswith(("--seq-len", "--rank", "--batch-size")):
            key = label.split(" ")[0]
        if key in seen:
            continue
        seen.add(key)
        out.append(f"{label}: {total / 2**30:,.2f} GiB")
    return out[:5]


# ---- the trainer's side: plan before, measure after -----------------------------------------------
def plan_for_run(cfg, model_path: str, compute_dtype, seq_len: int | None = None,
                 target_tokens: int | None = None, world_size: int = 1) -> MemoryPlan:
    """The plan of one process of a TrainConfig run on this machine (device, compute dtype
    resolved); rows of `seq_len` tokens (default cfg.max_length), `target_tokens` labelled per
    micro-batch. Under torchrun (`world_size` > 1) each rank takes batch_size / world_size rows,
    and FSDP (not DDP) shards the parameters and the optimizer state."""
    from .train.config import device as resolve_device

    device = "cuda" if resolve_device(cfg).type == "cuda" else "cpu"
    optim = {"paged_adamw_32bit": "paged_adamw", "paged_adamw_8bit": "paged_adamw8bit", "adamw_32bit": "adamw",
             "adamw_8bit": "adamw8bit"}[cfg.optim]
    method = "lora16" if cfg.quant_type == "none" else "qlora"
    sharded = world_size if getattr(cfg, "distributed", "fsdp") == "fsdp" else 1
    return plan_memory(model_path, seq_len=seq_len or cfg.max_length, batch_size=cfg.batch_size // world_size,
                       rank=cfg.lora_r, world_size=sharded,
                       target_modules=cfg.target_modules, optim=optim,
                       gradient_checkpointing=cfg.gradient_checkpointing, keep_attention=cfg.keep_attention,
                       quant_type="nf4" if method == "lora16" else cfg.quant_type, double_quant=cfg.double_quant,
                       blocksize=cfg.blocksize, compute_dtype=str(compute_dtype).replace("torch.", ""), method=method,
                       device=device, lora_dropout=cfg.lora_dropout,
                       padded=not cfg.packing and cfg.batch_size // world_size > 1,
                       target_tokens=target_tokens)


@dataclass
class Baseline:
    """Where a run's peak is measured from (start_measure) and the live-tensor counter (CPU)."""
    device: str  # "cpu", "cuda:N"
    allocated: int = 0  # CUDA: bytes allocated at the start
    rss: int = 0  # CPU: resident set at the start (VmHWM is reset to it)
    file_rss: int = 0  # CPU: file-backed resident pages at the start (code)
    live: LiveTensorPeak | None = None
    steps: int = 0  # training steps begun
    largest: int = 0  # the largest micro-batch (tokens, padding included) of a counted step

    def before_step(self, tokens: int) -> None:
        """Count live tensors in this step if it is one of the first COUNTED_STEPS (the optimizer
        state appears in the first) or its largest micro-batch (`tokens`, padding included) is
        larger than any counted one; else pause the counter: steady-state steps free what they
        allocate."""
        self.steps += 1
        if self.live is None:
            return
        if self.steps <= COUNTED_STEPS or tokens > self.largest:
            self.largest = max(self.largest, tokens)
            self.live.flush()
            self.live.resume()
        else:
            self.live.pause()


COUNTED_STEPS = 3


def start_measure(model_path: str | None = None, release_host_memory: bool = False,
                  device: torch.device | str = "cpu") -> Baseline:
    """Import what a run imports lazily (the model's modeling module, the native kernels), then
    reset the peak of the run's `device`: CUDA's allocator peak; on CPU the kernel's resident
    high-water mark, and the live-tensor counter starts (model/live_bytes.py).

    With `release_host_memory` (CPU) glibc returns freed tensors to the kernel at once
    (peak.return_freed_memory): the resident peak comes closer to the live-tensor peak."""
    import torch

    if model_path is not None:
        try:
            from transformers import AutoConfig
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            from .model.checkpoint_files import resolve

            MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(resolve(model_path)))]
        except Exception:  # the loader will raise the real error
            pass
    try:  # the native CPU kernels: a shared library, code like any import
        from .kernels import cpu as cpu_kernels

        cpu_kernels.load()
    except Exception:
        pass
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return Baseline(str(device), allocated=torch.cuda.memory_allocated(device))
    baseline = Baseline(device.type, live=LiveTensorPeak().start())
    try:
        from .model.peak import file_bytes, reset_peak, return_freed_memory

        if release_host_memory:
            return_freed_memory()
        baseline.rss, baseline.file_rss = reset_peak(), file_bytes()
    except OSError:  # not Linux
        pass
    return baseline


def measure(baseline: Baseline) -> dict[str, int]:
    """The peak of a run over `baseline` (from start_measure), in bytes.

    CUDA: max_memory_allocated growth + the device memory outside PyTorch's allocator (the
    context, cuBLAS; other processes on the card count too). CPU: the peak of live tensor
    bytes (what the plan counts), and beside it the resident set's: VmHWM growth, of which
    `code_pages_bytes` are code of torch/MKL/qlora first run meanwhile (file-backed pages) and
    `outside_tensors_bytes` the rest above the live tensors (glibc's free-but-kept heap, the
    oneDNN primitive cache, Python objects, thread stacks)."""
    import torch

    if baseline.device.startswith("cuda"):  # + what the device holds outside PyTorch's allocator (context, cuBLAS)
        device = torch.device(baseline.device)
        free, total = torch.cuda.mem_get_info(device)
        context = max(0, total - free - torch.cuda.memory_reserved(device))
        allocated = torch.cuda.max_memory_allocated(device) - baseline.allocated
        return {"measured_peak_bytes": allocated + context, "max_allocated_bytes": allocated,
                "context_bytes": context, "max_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    live = baseline.live.stop() if baseline.live is not None and baseline.live.active else None
    out: dict[str, int] = {}
    try:
        from .model.peak import file_bytes, peak_bytes

        grown, code = peak_bytes() - baseline.rss, max(0, file_bytes() - baseline.file_rss)
        out = {"resident_peak_bytes": grown, "code_pages_bytes": code}
    except OSError:  # not Linux
        pass
    if live is None:  # another profiler ran: the resident figure is all there is
        return {"measured_peak_bytes": out.get("resident_peak_bytes", 0) - out.get("code_pages_bytes", 0), **out}
    if out:
        out["outside_tensors_bytes"] = max(0, out["resident_peak_bytes"] - out["code_pages_bytes"] - live)
    return {"measured_peak_bytes": live, "live_tensor_peak_bytes": live, **out}


def write_run_memory(output: Path, plan: MemoryPlan | None, measured: dict[str, int]) -> dict:
    """<output>/memory.json (+ memory.png when matplotlib is installed); prints the comparison."""
    peak = measured["measured_peak_bytes"]
    if plan is None:
        record = {"predicted_peak_bytes": None, **measured}
        (output / "memory.json").write_text(json.dumps(record, indent=2))
        print(f"memory: measured peak {peak / 2**20:,.1f} MiB; {output / 'memory.json'}")
        return record
    record = {"predicted_peak_bytes": plan.total_bytes, **measured,
              "ratio": peak / plan.total_bytes if plan.total_bytes else None, "parts": plan.parts,
              "measured_as": plan.details["measured_as"], "settings": plan.settings}
    tmp = output / "memory.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(output / "memory.json")
    drawn = plot_breakdown(plan, output / "memory.png", peak)
    what = " (live tensors)" if "live_tensor_peak_bytes" in measured else ""
    print(f"memory: predicted peak {plan.total_bytes / 2**20:,.1f} MiB, measured{what} {peak / 2**20:,.1f} MiB "
          f"(ratio {record['ratio']:.3f}); {output / 'memory.json'}"
          + ("" if drawn else " (memory.png skipped: matplotlib is not installed)"))
    if "outside_tensors_bytes" in measured:
        mib = {k: measured[k] / 2**20 for k in ("resident_peak_bytes", "code_pages_bytes", "outside_tensors_bytes")}
        print(f"  resident set peak +{mib['resident_peak_bytes']:,.1f} MiB = live tensors + code first run "
              f"{mib['code_pages_bytes']:,.1f} + outside tensors {mib['outside_tensors_bytes']:,.1f} ({OUTSIDE})")
    return record


OUTSIDE = ("glibc's freed-but-kept heap (--release-host-memory returns it), oneDNN's GEMM primitive cache per "
           "batch shape, Python objects")
"""What a CPU process holds beyond its live tensors, which the plan does not count."""


def plot_breakdown(plan: MemoryPlan, path: Path, measured: int | None = None) -> bool:
    """A horizontal bar chart of the parts (and the measured peak); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [k for k, v in plan.parts.items() if v > 0]
    values = [plan.parts[k] / 2**20 for k in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), [LABELS[k].split(" (")[0] for k in names])
    ax.invert_yaxis()
    title = f"predicted peak {plan.total_bytes / 2**20:,.0f} MiB"
    if measured is not None:
        title += f", measured {measured / 2**20:,.0f} MiB"
    ax.set(xlabel="MiB", title=title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plan_run(cfg, model_path: str, rows: list | None = None, world_size: int = 1) -> MemoryPlan | None:
    """plan_for_run for the longest of the tokenized `rows` (the batch that holds it peaks) and
    the most target tokens a micro-batch of them can hold, printed; None (with a note) when the
    config cannot be planned."""
    import warnings

    from .train.config import compute_dtype as resolve

    with warnings.catch_warnings():  # the trainer warns about emulated bf16 itself
        warnings.simplefilter("ignore")
        compute_dtype = resolve(cfg)
    longest = max((len(r.input_ids) for r in rows or []), default=0) or cfg.max_length
    multiple = getattr(cfg, "pad_to_multiple", 1)
    seq_len = -(-min(longest, cfg.max_length) // multiple) * multiple  # as data.collate pads it
    # the head's rows: no batch holds more targets than the rows with the most (after the shift)
    per_row = sorted((sum(1 for t in r.labels[1:] if t != -100) for r in rows or []), reverse=True)
    targets = sum(per_row[: max(1, cfg.batch_size // world_size)]) if per_row else None
    try:
        plan = plan_for_run(cfg, model_path, compute_dtype, seq_len, target_tokens=targets, world_size=world_size)
    except (MemoryPlanError, OSError, KeyError, ValueError) as e:
        print(f"memory: no plan for this model ({e}); memory.json will hold only the measured peak")
        return None
    print(plan.table())
    return plan
