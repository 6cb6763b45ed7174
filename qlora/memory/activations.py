"""The activation model: what autograd keeps for one training step, walked op by op as HF runs
a decoder layer (qlora's Linear4bit / LoraLinear, SDPA attention, the fused chunked head of
model/loss.py), and the peak of backward with or without per-layer checkpointing.

    act = activation_bytes(shape, seq_len=512, batch_size=1, rank=64, lora=adapted, e=2,
                           checkpointing=True, masked=False, packed=False)   # {"peak", "saved", "per_layer", ...}

Tests: tests/memory/test_plan_memory.py (against what autograd saves on tiny models) and
benchmarks/memory.py (against the trainer's measured peak).
"""
from __future__ import annotations

from ..model.loss import CHUNK_BYTES as CE_CHUNK_BYTES
from .shape import Shape


def _layer_saves(s: Shape, b: int, t: int, lora: dict[str, bool], *, e: int, r: int,
                 masked: bool, stream_grad: bool, dora: bool = False, device: str = "cuda",
                 attention: str = "sdpa") -> int:
    """Bytes autograd saves for one decoder layer, walked op by op as HF runs it.

    `lora[suffix]` says which linears carry an adapter; `stream_grad` whether the layer input
    requires grad (always with checkpointing; without it, not for layer 0: the embeddings are
    frozen). A frozen Linear4bit saves nothing (its input gradient needs only W); a LoRA
    saves its input x (for A's gradient; with dropout, the seeded mask is regenerated from
    x's indices in backward, so q, k and v share one saved x and no mask), A's output (for
    B's) and, in 16-bit compute, A and B cast to it; a DoRA layer (nn/dora.py) also its output
    before the magnitude scale (for m's gradient) and the scale g [out]. Elementwise ops save an
    operand only when the other one requires grad (frozen norm weights and RoPE tables never do).
    The model's own dropouts (on attention: any family's attention_dropout, GPT-2's attn_pdrop; on
    the residuals: GPT-2's and Phi-3's resid_pdrop) take a form `device` decides: see `dropout_bytes`.
    `attention`: sdpa (torch's kernels), eager (transformers' matmul, softmax, matmul) or varlen
    (model/varlen.py: torch's varlen op saves q, k, v, out, the logsumexp and a 2-element RNG
    state, never a mask or repeated k/v, padded or packed; the batch's boundaries it saves are an
    input of a few hundred bytes, not counted).
    """
    varlen = attention == "varlen"
    masked = masked and not varlen
    n = b * t  # tokens
    saved = 0
    seen: set[str] = set()  # tensors saved by several ops count once

    def keep(key: str, nbytes: int) -> None:
        nonlocal saved
        if key not in seen:
            seen.add(key)
            saved += nbytes

    fan_out = {suffix: out for suffix, _, out, _ in s.linears()}

    def linear(suffix: str, x_key: str, width: int, x_grad: bool) -> bool:
        """A (LoRA-)linear on tensor `x_key` of `width`; returns whether its output requires grad."""
        if not lora.get(suffix, False):
            return x_grad
        keep(x_key, n * width * e)  # x itself; seeded dropout is regenerated in backward (nn/dropout.py)
        keep(suffix + ".a", n * r * e)
        if r and e < 4 and not dora:  # the fp32 A and B cast to the compute dtype for the matmuls
            keep(suffix + ".ab", r * (width + fan_out[suffix]) * e)
        if dora:
            keep(suffix + ".z", n * fan_out[suffix] * e)
            keep(suffix + ".g", fan_out[suffix] * e)  # the scale (m / norm: the norm is not saved)
        return True

    def norm(key: str, x_grad: bool) -> None:
        if x_grad:  # RMSNorm/LayerNorm: input x (or its fp32 copy) and the per-token rsqrt (fp32) / mean+rstd
            keep(key, n * s.hidden * norm_bytes(s, e))
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
    fused = n * (q_dim + 2 * kv_dim) * e  # gpt2, phi3: q, k, v are views of one fused output
    eager = attention == "eager"
    math_attention = attn_grad and s.attn_dropout > 0 and device == "cpu" and not eager
    # o_proj's input: SDPA's own output (flash kernels: [b, t, heads, d] already) or a copy of it
    # (varlen's output is [b, t, heads, d] whatever q's layout: o_proj's input is that output)
    attn_out = "attn_out_copy" if (math_attention or eager or s.family == "phi3") and not varlen else "attn_out"
    if eager and attn_grad:
        # transformers' eager_attention_forward: q k^T saves q and k (repeated to all heads under
        # GQA), the softmax (float32; GPT-2's in the compute dtype) its output, the cast to the
        # compute dtype nothing, dropout its noise, probs v the probabilities (the dropped ones
        # under dropout) and v, which matmul copies to [b x heads, t, d] when b > 1 (one row: a
        # view of v_proj's output, phi3: of the fused qkv output); the output is copied to
        # [b, t, heads, d] for o_proj (saved there). A mask is added, not saved.
        repeated = s.kv_heads != s.heads
        kv_saved = q_dim if repeated else kv_dim
        probs = b * s.heads * t * t
        if s.family == "gpt2":  # q, k and v: views of c_attn's output, or copies of the same bytes
            keep("qkv", fused)
            keep("softmax", probs * e)
        else:
            keep("q", n * q_dim * e)  # RoPE makes new q and k tensors
            keep("k", n * kv_saved * e)
            keep("v", n * kv_saved * e if repeated or b > 1 else fused if s.family == "phi3" else n * kv_dim * e)
            keep("softmax", probs * 4)
            if e < 4 and not s.attn_dropout:
                keep("probs", probs * e)
        if s.attn_dropout:
            keep("attn_noise", dropout_bytes(probs, e, device))
            keep("attn_dropped", probs * e)
    elif math_attention:
        # SDPA's CPU kernels take no dropout: its math path runs, in float32 (16-bit inputs upcast),
        # with k and v repeated to all heads under GQA. It saves q and k scaled, v, and three
        # [b, heads, t, t]: the softmax, dropout's noise and the dropped probabilities; the mask is
        # added in place, and the output is copied to [b, t, heads, d] for o_proj (saved there).
        kv_math = q_dim if s.kv_heads != s.heads else kv_dim
        keep("q", n * q_dim * 4)
        keep("k", n * kv_math * 4)
        if e < 4 or kv_math != kv_dim or b > 1:  # a float32 copy, the repeat, or bmm's copy of [b, heads] rows
            keep("v", n * kv_math * 4)
        else:  # v itself: a view of the fused qkv output (gpt2, phi3), else v_proj's output
            keep("v", fused if s.family in ("gpt2", "phi3") else n * kv_dim * e)
        keep("probs", 3 * b * s.heads * t * t * 4)
    elif attn_grad:
        # SDPA (flash/efficient kernels, CPU and CUDA) saves q, k, v, out and the fp32 logsumexp.
        # With a mask (padding, or packed documents kept apart), HF repeats k/v to all heads
        # (repeat_kv) and SDPA saves a float [b, 1, t, t] mask per call; without one, is_causal and
        # GQA in the kernel.
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
        if varlen:
            keep("rng_state", 16)
        if masked:
            keep("mask", b * t * t * e)
    o_suffix = "attn.c_proj" if s.family == "gpt2" else "self_attn.o_proj"
    # SDPA's output takes the query's memory layout: [b, t, heads, d] after HF's RoPE on a
    # transposed view, so o_proj's input (transpose(1, 2).contiguous()) is the same tensor; Phi-3
    # builds q with torch.cat (head-major), so its o_proj input is a copy (checked on CPU; on
    # CUDA the flash kernel's layout rule is assumed to be the same).
    og = linear(o_suffix, attn_out, q_dim, attn_grad)
    if og and s.resid_dropout:
        keep("resid_attn", dropout_bytes(n * h, e, device))
    g = g or og
    norm("x2", g)
    i = s.intermediate
    if s.family == "gpt2":
        ug = linear("mlp.c_fc", "n2", h, g)
        if ug:  # gelu_new, a formula, saves its input, tanh's output, 0.5 x and 1 + tanh; torch's gelu its input
            keep("fc_out", n * i * e * (4 if s.activation == "gelu_new" else 1))
        mg = linear("mlp.c_proj", "act", i, ug)
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
        mg = linear("mlp.down_proj", "prod", i, gg or ug)
    if mg and s.resid_dropout:
        keep("resid_mlp", dropout_bytes(n * h, e, device))
    return saved


def dropout_bytes(numel: int, e: int, device: str) -> int:
    """Bytes torch's dropout saves for an input of `numel` elements that requires grad: on the CPU
    the scaled noise it multiplies by, in the input's dtype; on CUDA its fused kernel's bool mask."""
    return numel * (e if device == "cpu" else 1)


def norm_bytes(s: Shape, e: int) -> int:
    """Bytes per element of the input a norm saves: x itself for qlora's fused RMSNorm (nn/rms_norm.py);
    the fp32 copy its hooks make for the norms that keep their own forward (Gemma's, GPT-2's LayerNorm)."""
    return 4 if s.family == "gpt2" or s.norm_offset else e


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
                     keep_attention: bool = False, packed: bool = False, dora: bool = False,
                     device: str = "cuda", attention: str = "sdpa") -> dict[str, int]:
    """The activation memory at the peak of backward, and its pieces (bytes). `packed`: rows of
    packed documents, with position ids of their own (RoPE tables per row) and a mask. `dora`:
    DoRA adapters (their extra saves per adapted layer). `device` (cpu, cuda): the form of the
    model's own dropouts and of attention under dropout."""
    n = batch_size * seq_len
    kw = dict(e=e, r=rank, masked=masked, dora=dora, device=device, attention=attention)
    full = _layer_saves(s, batch_size, seq_len, lora, stream_grad=True, **kw)
    first = full if checkpointing else _layer_saves(s, batch_size, seq_len, lora, stream_grad=False, **kw)
    # saved once for all layers: RoPE's cos and sin (per row when each row has position ids of its
    # own: packed) and, where the embeddings require grad (checkpointing's input hook), the noise
    # of GPT-2's embedding dropout
    shared = 0 if s.family == "gpt2" else 2 * (batch_size if packed else 1) * seq_len * s.head_dim * e
    if checkpointing and s.embd_dropout:
        shared += dropout_bytes(n * s.hidden, e, device)
    # the head (model/loss.py, fused and chunked): the final norm saves its input (+ rstd); the
    # fused loss saves only d loss / d h for the target rows (n - b: the labels shift by one),
    # computed in forward, and the int64 index that picked those rows (model/loss.py:
    # target_index, 8 bytes a target). While it runs, one chunk of
    # logits exists: in float32 (softmax in place), beside the 16-bit logits it was copied from
    # and later the 16-bit probabilities multiplied by W (none of these copies in fp32 compute).
    targets = n - batch_size if targets is None else min(targets, n - batch_size)
    rows = min(targets, max(1, CE_CHUNK_BYTES // (4 * s.vocab)))
    stats = n * 4 * (2 if s.family == "gpt2" else 1)  # the norm's rstd (LayerNorm: and its mean), fp32
    head_saved = (n * s.hidden * norm_bytes(s, e) + stats + targets * s.hidden * e + 8 * targets
                  + (4 * s.hidden if s.norm_offset else 0))
    head_peak = rows * s.vocab * (4 + (e if e < 4 else 0)) + targets * s.hidden * e  # + the gathered rows
    transient = _backward_transient(s, batch_size, seq_len, e)
    if checkpointing:
        # each checkpointed layer keeps its input and, with keep_attention, what its attention
        # kernel returned (the output and the fp32 logsumexp), which the recompute then skips
        kept = n * s.hidden * e + (n * s.heads * s.head_dim * e + n * s.heads * 4 if keep_attention else 0)
        at_head = s.layers * kept + shared + head_saved + head_peak
        # the last layer recomputed (its kept attention output counted in `full`), then its backward
        in_layer = s.layers * kept - (kept - n * s.hidden * e) + shared + full + transient
    else:
        layers = first + (s.layers - 1) * full + shared
        at_head = layers + head_saved + head_peak
        in_layer = layers + n * s.hidden * e + transient
    peak = max(at_head, in_layer)
    saved = at_head - head_peak  # what autograd holds when the forward ends
    return {"peak": peak, "saved": saved, "per_layer": full, "at_head": at_head, "in_layer": in_layer,
            "logits": head_saved + head_peak}
