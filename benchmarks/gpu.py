"""One prepared GPU run (issue 9): Triton decode bandwidth, the fused Linear4bit + LoRA layer,
a ~1B Llama training step against transformers + peft + bitsandbytes, the paged optimizer.

    python benchmarks/gpu.py             # one CUDA device; about 9 minutes on an H200
    python benchmarks/gpu.py --smoke     # every section on tiny shapes, CPU, TRITON_INTERPRET=1 (~1-2 min)
    python benchmarks/gpu.py --sections decode,layer   # a subset: correct, decode, layer, train, optim, resume

Sections, each printed as it finishes (a failing section prints its error; the rest still run):
0. correctness on the device: Triton decode bit for bit vs blockwise.py; the fused layer
   (forward, grad_x, grad_A, grad_B) vs the PyTorch path of the same layer.
1. decode: NF4 + DQ, 8192 x 8192 -> bf16 into a preallocated buffer; bandwidth = (packed
   codes + scales read + bf16 written) / time, as a fraction of a bf16 device-to-device
   copy's (read + written) / time. Goal: at least 0.80. Then a sweep of the launch
   (bytes per program x warps; the result is bit-identical), and the kernel as timed on the
   H200 before its scale loads went per row (`_decode_before`). bitsandbytes'
   dequantize_4bit under the same timer when importable.
2. layer: forward + backward (grad_x and the LoRA gradients) of 4096 x 4096, x = [8, 2048,
   4096] bf16, LoRA r = 16 (alpha 32, B random, dropout 0.05 as in training), against a
   frozen bf16 nn.Linear + the same LoRA. qlora runs three ways: the default (LoraLinear over
   Linear4bit: one Function, nn/lora4bit.py: Triton decode into the shared workspace, then
   cuBLAS), "fused" (opt-in,
   QLORA_FUSED_LORA=1: a Triton GEMM decoding W in the K loop, LoRA in the epilogue) and
   fused_lora's "workspace" strategy (one Function: decode once, cuBLAS). Goal: the default
   at most 1.10x the bf16 layer. bitsandbytes + peft under the same harness when
   importable. Interleaved rounds, medians. Then bf16, fused and decode + cuBLAS at 16,
   256 and 2048 rows: where each strategy wins.
3. train: a TinyLlama-shaped ~1.1B config (hidden 2048, 22 layers, vocab 32000), random
   bf16 weights (qlora/model/random_checkpoint.py), batch 4 x 1024, LoRA r 64 / alpha 16 /
   dropout 0.05 on all linear layers, gradient checkpointing, paged AdamW 32-bit; qlora (also
   with --compile: each decoder layer one inductor graph, and without checkpointing) vs
   transformers + peft + bitsandbytes (nf4 + DQ), each in a fresh subprocess; tokens/s and
   peak device memory (torch.cuda.max_memory_allocated). With --profile, one more step of
   each under torch.profiler: device busy time / wall time, kernel launches, top kernels.
4. optim: benchmarks/optim_gpu.py --params-gb 1 --steps 3 (a spike that plain AdamW does
   not survive, the paged one does), in a subprocess; its output is echoed.
5. resume: `qlora.finetune` on the device, a small GPT-2 with dropout in the model (drawn
   from the device's generator): runs resumed from a step-3 checkpoint reproduce steps 4-6
   of the uninterrupted run (goal: within 1e-4 relative; kernels such as attention's
   backward need not be bit-deterministic); a control resumes without the device RNG.
A table of the goals closes the run. Without CUDA and without --smoke it prints one line.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported: kernels are built for the CPU interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import nn  # noqa: E402

import qlora  # noqa: E402
from qlora.nn import fused_lora  # noqa: E402
from qlora import kernels  # noqa: E402
from qlora.quant import blockwise  # noqa: E402
from qlora.kernels import triton_decode as td  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUMMARY: list[tuple[str, str, str, str]] = []  # (measure, value, goal, met)
DEVICE = torch.device("cpu" if SMOKE else "cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def per_call(fn, iters: int, rounds: int = 5, warmup: int = 2) -> float:
    """Median over `rounds` of the mean seconds per call of `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


def summary(measure: str, value: str, goal: str = "", met: bool | None = None) -> None:
    SUMMARY.append((measure, value, goal, "" if met is None else ("yes" if met else "NO")))


def peer_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken install is as good as none here)
        return False
    return True


# ---- 0. correctness --------------------------------------------------------------------------
def lora_layer(dense: nn.Linear, r: int, dropout: float = 0.0) -> qlora.LoraLinear:
    layer = qlora.LoraLinear(qlora.Linear4bit.from_linear(dense), r=r, alpha=2 * r, dropout=dropout)
    nn.init.normal_(layer.lora_B.weight, std=0.01)  # a trained-looking adapter
    return layer


def fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(g)
    grads = [p.grad for n, p in layer.named_parameters() if p.requires_grad]
    return [y.detach(), x.grad] + grads


def correctness(args) -> None:
    print("## 0. correctness on the device", flush=True)
    exact = True
    for n, bs, qtype, dq in [(4097, 64, "nf4", True), (64 * 300 + 31, 128, "fp4", False), (1 << 20, 64, "nf4", True)]:
        if SMOKE and n > 100_000:
            continue
        qt = qlora.quantize(torch.randn(n, device=DEVICE) * 2, qtype, bs, dq)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ref = blockwise.dequantize_4bit_ref(qt.data, qt.scales(), qt.code, bs, n, dtype)
            exact &= torch.equal(qt.dequantize(dtype).view(-1), ref)
    print(f"Triton decode == blockwise.py bit for bit (nf4/fp4, DQ or not, 3 dtypes): {exact}")
    summary("decode bit-exact vs reference", str(exact), "True", exact)
    rows, dim, r = (48, 96, 4) if SMOKE else (1000, 1024, 16)
    torch.manual_seed(0)
    layer = lora_layer(nn.Linear(dim, dim + 32, device=DEVICE), r)
    x = torch.randn(rows, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(rows, dim + 32, device=DEVICE, dtype=torch.bfloat16)
    fused = fwd_bwd(layer, x, g)
    saved = fused_lora.DEVICE_TYPES
    fused_lora.DEVICE_TYPES = set()
    try:
        ref = fwd_bwd(layer, x, g)
    finally:
        fused_lora.DEVICE_TYPES = saved
    worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(fused, ref))
    ok = worst < 2e-2
    print(f"fused layer vs PyTorch path (y, grad_x, grad_A, grad_B): max |diff| / max |ref| = {worst:.2e}")
    summary("fused layer vs PyTorch path, rel. diff", f"{worst:.1e}", "< 2e-2 (bf16)", ok)
    # qlora's RMSNorm (torch's fused kernel on CUDA) vs the op-by-op fp32 formula it replaces
    from qlora.nn.rms_norm import _UNFUSED, RMSNorm, rms_norm_ref
    norm = RMSNorm(nn.Parameter(torch.randn(dim, device=DEVICE) * 0.3 + 1), 1e-5)
    x0 = torch.randn(rows, dim, device=DEVICE, dtype=torch.bfloat16).mul(3)
    xs = [x0.clone().requires_grad_() for _ in range(2)]
    gy = torch.randn(rows, dim, device=DEVICE, dtype=torch.bfloat16)
    outs = [f(x) for f, x in zip((norm, lambda x: rms_norm_ref(x, norm.weight, norm.eps)), xs)]
    for y in outs:
        y.backward(gy)
    diffs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
             for a, b in ((outs[0], outs[1]), (xs[0].grad, xs[1].grad))]
    ok = max(diffs) < 1e-2 and DEVICE.type not in _UNFUSED
    print(f"RMSNorm fused vs formula (y, grad_x): max |diff| / max |ref| = {diffs[0]:.1e}, {diffs[1]:.1e}; "
          f"fallback: {_UNFUSED.get(DEVICE.type, 'none')}")
    summary("RMSNorm fused vs formula, rel. diff", f"{max(diffs):.1e}", "< 1e-2 (bf16), no fallback", ok)
    # the fused rotary (Triton on CUDA) vs transformers' own, forward and backward: the same values
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from qlora.nn.rotary import apply_rotary
    b, t, heads, kv, hd = (2, 5, 4, 2, 16) if SMOKE else (4, 512, 32, 8, 128)
    q0 = torch.randn(b, t, heads, hd, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    k0 = torch.randn(b, t, kv, hd, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    freqs = torch.arange(t, device=DEVICE)[:, None] / 10000 ** (torch.arange(0, hd, 2, device=DEVICE) / hd)
    emb = torch.cat([freqs, freqs], -1)[None].expand(b, t, hd)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    results = []
    for f in (apply_rotary, apply_rotary_pos_emb):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        qo, ko = f(q, k, cos, sin)
        (qo.float().square().sum() + ko.float().sum()).backward()
        results.append((qo, ko, q.grad, k.grad, type(qo.grad_fn).__name__))
    exact = all(torch.equal(a, b) for a, b in zip(results[0][:4], results[1][:4]))
    ok = exact and results[0][4] == "_RotaryBackward"
    print(f"rotary fused ({results[0][4]}) vs transformers' apply_rotary_pos_emb (q, k, grad_q, grad_k): "
          f"equal {exact}")
    summary("rotary fused vs transformers, equal", str(exact), "True, and fused", ok)


# ---- 1. decode bandwidth -----------------------------------------------------------------------
def decode(args) -> None:
    print("\n## 1. decode bandwidth (NF4 + DQ -> bf16, preallocated output)", flush=True)
    shape = (64, 96) if SMOKE else (8192, 8192)
    iters = 2 if SMOKE else 50
    w = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) * 0.02
    qt = qlora.quantize(w, "nf4", 64, True)
    out = torch.empty(shape, device=DEVICE, dtype=torch.bfloat16)
    src = torch.empty_like(out).copy_(w)
    t_copy = per_call(lambda: out.copy_(src), iters)
    t_dec = per_call(lambda: qt.dequantize(out=out), iters)
    moved_copy = 2 * out.numel() * 2
    moved_dec = qt.nbytes + out.numel() * 2
    bw_copy, bw_dec = moved_copy / t_copy, moved_dec / t_dec
    frac = bw_dec / bw_copy
    print(f"{shape[0]} x {shape[1]}: bf16 copy {t_copy * 1e6:.1f} us = {bw_copy / 1e9:.3g} GB/s (read + write); "
          f"Triton decode {t_dec * 1e6:.1f} us = {bw_dec / 1e9:.3g} GB/s ({moved_dec / 1e6:.3g} MB moved)")
    print(f"decode bandwidth / copy bandwidth: {frac:.2f} (goal >= 0.80); decode time / copy time: "
          f"{t_dec / t_copy:.2f}")
    summary("decode bandwidth / copy bandwidth", f"{frac:.2f}", ">= 0.80", None if SMOKE else frac >= 0.80)
    if DEVICE.type == "cuda" or SMOKE:  # launch settings: bytes per program x warps (the result is the same)
        sweep = {}
        for nbytes in ((256, 2048) if SMOKE else (512, 1024, 2048, 4096, 8192)):
            for warps in ((4,) if SMOKE else (2, 4, 8, 16)):
                t = per_call(lambda: td.decode_4bit(qt, out, bytes_per_program=nbytes, num_warps=warps), iters)
                sweep[nbytes, warps] = moved_dec / t / bw_copy
        print("launch sweep, bandwidth / copy bandwidth (bytes per program x warps; default "
              f"{td.DECODE_BYTES} x {td.DECODE_WARPS}): " + ", ".join(f"{b}x{w} {f:.2f}" for (b, w), f in sweep.items()))
        (b, w), best = max(sweep.items(), key=lambda kv: kv[1])
        summary("decode, best launch in the sweep", f"{best:.2f}", f"({b} B x {w} warps)")
        before = torch.empty_like(out)
        t_before = per_call(lambda: _decode_before(qt, before), iters)
        print(f"the kernel as of the H200 runs (scales loaded per byte): {moved_dec / t_before / bw_copy:.2f} of the "
              f"copy bandwidth, {t_before / t_dec:.2f}x the time of today's; same bits: "
              f"{torch.equal(before, qt.dequantize(out=out))}")
        summary("decode time, previous kernel / today's", f"{t_before / t_dec:.2f}x")
    if not SMOKE:
        small = qlora.quantize(torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16), "nf4", 64, True)
        ws = torch.empty(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
        print(f"4096 x 4096 decode: {per_call(lambda: small.dequantize(out=ws), iters) * 1e6:.1f} us")
    if peer_available() and DEVICE.type == "cuda":
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        t_bnb = per_call(lambda: bnbf.dequantize_4bit(q, state), iters)
        print(f"bitsandbytes dequantize_4bit (fresh output): {t_bnb * 1e6:.1f} us = {moved_dec / t_bnb / 1e9:.0f} GB/s; "
              f"qlora is {t_bnb / t_dec:.2f}x faster")
        summary("decode time, bitsandbytes / qlora", f"{t_bnb / t_dec:.2f}x")


@triton.jit
def _decode_before_kernel(data_ptr, absmax_ptr, nested_ptr, nested_code_ptr, offset, code_ptr, out_ptr, n, nbytes,
                          HALF_BLOCK: tl.constexpr, BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BYTES + tl.arange(0, BYTES)
    mask = byte < nbytes
    packed = tl.load(data_ptr + byte, mask=mask, other=0).to(tl.int32)
    scale = td.block_scale(absmax_ptr, nested_ptr, nested_code_ptr, offset, byte // HALF_BLOCK, mask, True)
    hi = tl.load(code_ptr + (packed >> 4)) * scale
    lo = tl.load(code_ptr + (packed & 15)) * scale
    idx = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + idx, td.cast_out(tl.interleave(hi, lo), out_ptr.dtype.element_ty, True), mask=idx < n)


def _decode_before(qt, out: torch.Tensor) -> None:
    """triton_decode's kernel as timed on the H200 (2026-11-28: a 1-D tile, the scale loaded per
    byte), NF4 + DQ at 2048 bytes x 8 warps, for a side-by-side comparison with today's."""
    nbytes = (qt.numel() + 1) // 2
    _decode_before_kernel[(triton.cdiv(nbytes, 2048),)](
        qt.data, qt.absmax, qt.nested_absmax, qt.nested_code, float(qt.nested_offset), qt.code, out, qt.numel(),
        nbytes, HALF_BLOCK=qt.blocksize // 2, BYTES=2048, num_warps=8, **td.LAUNCH)


# ---- 2. one layer --------------------------------------------------------------------------------
LAYER_DROPOUT = 0.05
"""LoRA dropout in the layer section, as in training (the QLoRA recipe's 0.05): its kernels are timed too."""


def layer(args) -> None:
    rows, dim, r = (2 * 24, 64, 4) if SMOKE else (8 * 2048, 4096, 16)
    repeats, iters = (2, 1) if SMOKE else (7, 3)
    print(f"\n## 2. layer forward + backward: x [{rows}, {dim}] bf16, W {dim} x {dim}, LoRA r = {r}, "
          f"dropout {LAYER_DROPOUT}", flush=True)
    torch.manual_seed(0)
    dense = nn.Linear(dim, dim, bias=False, device=DEVICE, dtype=torch.bfloat16).requires_grad_(False)
    base = qlora.LoraLinear(dense, r=r, alpha=2 * r, dropout=LAYER_DROPOUT)
    ql = lora_layer(dense, r, LAYER_DROPOUT)
    nn.init.normal_(base.lora_B.weight, std=0.01)
    x = torch.randn(rows, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(rows, dim, device=DEVICE, dtype=torch.bfloat16)

    def with_strategy(strategy: str | None):
        def step():
            saved_types, saved_strategy = fused_lora.DEVICE_TYPES, fused_lora.STRATEGY
            fused_lora.DEVICE_TYPES = fused_lora.DEVICE_TYPES if strategy else set()
            fused_lora.STRATEGY = strategy or saved_strategy
            try:
                fwd_bwd(ql, x, g)
            finally:
                fused_lora.DEVICE_TYPES, fused_lora.STRATEGY = saved_types, saved_strategy
        return step

    cases = {
        "bf16 nn.Linear (frozen) + qlora LoRA": lambda: fwd_bwd(base, x, g),
        "qlora Linear4bit + LoRA, default": with_strategy(None),
        "qlora, fused Triton GEMM (opt-in)": with_strategy("fused"),
        "qlora, fused Function: decode + cuBLAS": with_strategy("workspace"),
    }
    if peer_available() and DEVICE.type == "cuda":
        import bitsandbytes as bnb
        import peft

        class One(nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

            def forward(self, t):
                return self.proj(t)

        peer = bnb.nn.Linear4bit(dim, dim, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                 compress_statistics=True)
        peer.load_state_dict(dense.state_dict())
        peer_model = peft.get_peft_model(One(peer.to(DEVICE)), peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                                                lora_dropout=LAYER_DROPOUT,
                                                                                target_modules=["proj"]))
        cases["bitsandbytes Linear4bit + peft LoRA"] = lambda: fwd_bwd(peer_model, x, g)
    t0 = time.perf_counter()
    for fn in cases.values():  # compile + autotune happen here
        fn()
    sync()
    print(f"warm-up (Triton compile + autotune included): {time.perf_counter() - t0:.1f} s", flush=True)
    from qlora.kernels import triton_matmul as tm

    for kernel_name in ("_fwd_kernel", "_bwd_kernel"):  # the tiles the autotuner chose (benchmarks/sass.py reads them)
        best = getattr(getattr(tm, kernel_name), "best_config", None)
        print(f"fused GEMM {kernel_name}: autotuned to {best}")
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(per_call(cases[name], iters, rounds=1, warmup=0))
    base_name = names[0]
    print(f"{'case':<46}{'median ms':>11}{'vs bf16':>11}{'paired':>11}")
    for name in names:
        med = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], times[base_name]))
        print(f"{name:<46}{med * 1e3:>11.2f}{med / statistics.median(times[base_name]):>10.3f}x{paired:>10.3f}x")
    ratio, ratio_fused, ratio_ws = (statistics.median(times[n]) / statistics.median(times[base_name]) for n in names[1:4])
    summary("layer fwd+bwd, default / bf16 nn.Linear", f"{ratio:.3f}x", "<= 1.10x", None if SMOKE else ratio <= 1.10)
    summary("layer fwd+bwd, fused GEMM / bf16", f"{ratio_fused:.3f}x", "(opt-in)")
    summary("layer fwd+bwd, decode+cuBLAS Fn / bf16", f"{ratio_ws:.3f}x", "(alternative)")

    # fewer rows per call (smaller batches, inference): where does each strategy win?
    print("\nby rows (same layer; ms per forward + backward; ratio to bf16):")
    print(f"{'rows':>6}{'bf16':>10}{'fused':>17}{'decode+cuBLAS':>19}")
    for m in ((8, 16) if SMOKE else (16, 256, 2048)):
        xm = torch.randn(m, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        gm = torch.randn(m, dim, device=DEVICE, dtype=torch.bfloat16)
        it = 1 if SMOKE else 20
        t_bf16 = per_call(lambda: fwd_bwd(base, xm, gm), it, rounds=3)
        t = {}
        for strategy in ("fused", "workspace"):
            saved_strategy, fused_lora.STRATEGY = fused_lora.STRATEGY, strategy
            try:
                t[strategy] = per_call(lambda: fwd_bwd(ql, xm, gm), it, rounds=3)
            finally:
                fused_lora.STRATEGY = saved_strategy
        print(f"{m:>6}{t_bf16 * 1e3:>10.3f}{t['fused'] * 1e3:>9.3f} {t['fused'] / t_bf16:>6.2f}x"
              f"{t['workspace'] * 1e3:>11.3f} {t['workspace'] / t_bf16:>6.2f}x")


# ---- 3. training step ------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, os, statistics, sys, time, torch, transformers
    from transformers import AutoModelForCausalLM
    path, setup, device, steps, warmup, seq, batch = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8])
    if not setup.startswith("qlora"):
        import bitsandbytes, peft
    import qlora
    from qlora.model.loss import causal_lm_loss
    from qlora.train.peak import peak_bytes, reset_peak
    if device == "cpu":  # --smoke: the Triton paths run on CPU tensors under the interpreter
        from qlora.nn import fused_lora
        from qlora import kernels
        fused_lora.DEVICE_TYPES, kernels.TRITON_DEVICE_TYPES = {"cpu"}, {"cpu"}
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (batch, seq), generator=g).to(device) for _ in range(steps + warmup)]
    cuda = device == "cuda"
    start = torch.cuda.reset_peak_memory_stats() if cuda else reset_peak()
    if setup.startswith("qlora"):
        model = qlora.load_model(path, compute_dtype=dtype, device=device, progress=False)
        model = qlora.prepare_model(model, lora=qlora.LoraConfig(r=64, alpha=16, dropout=0.05), compute_dtype=dtype,
                                    gradient_checkpointing=setup != "qlora-norecompute", verbose=False)
        if setup == "qlora-compile":  # `qlora train --compile`: each decoder layer one inductor graph
            from qlora.model.prepare import compile_layers
            compile_layers(model)
        opt = qlora.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0,
                                paged=True)
        autocast = torch.autocast(device, enabled=False)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, device_map=device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        opt = bitsandbytes.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        autocast = torch.autocast(device, dtype=dtype)
    model.train()

    def step(ids):  # one optimizer step, timed to the end of its device work
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:  # qlora: the trainer's loss (fused head + cross-entropy)
            inputs = {"input_ids": ids, "labels": ids}
            loss = causal_lm_loss(model, inputs) if setup.startswith("qlora") else model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss, time.perf_counter() - t

    times = []
    for i, ids in enumerate(data):
        loss, seconds = step(ids)
        if i >= warmup:
            times.append(seconds)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_bytes() - start
    if os.environ.get("QLORA_BENCH_PROFILE") == "1":  # one more step under the profiler: where the time goes
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            _, wall = step(data[-1])
        ev = prof.key_averages()
        kernels = [e for e in ev if e.device_type == DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        launches = sum(e.count for e in ev if "LaunchKernel" in e.key)
        syncs = sum(e.count for e in ev if "Synchronize" in e.key or e.key == "cudaMemcpy")
        items = sum(e.count for e in ev if e.key == "aten::_local_scalar_dense")  # .item(), float(t), int(t)
        print(f"[{setup}] profiled step {wall * 1e3:.0f} ms (profiler on); device busy {busy * 1e3:.0f} ms "
              f"({busy / wall:.0%}); {launches} kernel launches, {sum(e.count for e in ev if e.key.startswith('aten::'))} "
              f"aten calls, {syncs} synchronizing CUDA calls, {items} tensor-to-Python reads (CPU or device)")
        print(ev.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25,
                       max_name_column_width=60))
    print(json.dumps({"tokens_per_s": batch * seq / med, "step_s": med, "peak_mb": peak / 2**20, "loss": float(loss)}))
""")


def train(args) -> None:
    from transformers import LlamaConfig

    from qlora.model.random_checkpoint import write_random_checkpoint

    if SMOKE:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
        name, steps, warmup, seq, batch = "llama-tiny", 1, 1, 16, 2
    else:
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                             max_position_embeddings=2048)
        name, steps, warmup, seq, batch = "llama-1b", 4, 2, 1024, 4
    print(f"\n## 3. training step, {name}, batch {batch} x {seq}", flush=True)
    path = Path(args.workdir) / name
    if not (path / "config.json").exists():
        t = time.perf_counter()
        write_random_checkpoint(config, path)
        print(f"wrote random bf16 checkpoint {path} in {time.perf_counter() - t:.0f} s", flush=True)
    setups = ["qlora", "qlora-compile", "qlora-norecompute"] + (["peer-qlora"] if peer_available() else [])
    labels = {"qlora": "qlora QLoRA (nf4 + DQ)", "qlora-compile": "qlora --compile", "qlora-norecompute":
              "qlora, no checkpointing", "peer-qlora": "transformers+peft+bnb QLoRA"}
    results = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for setup in setups:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), setup, DEVICE.type, str(steps), str(warmup),
                              str(seq), str(batch)], capture_output=True, text=True, env=env, timeout=args.timeout)
        if out.returncode:
            print(f"{setup} failed:\n{out.stderr[-3000:]}")
            continue
        lines = out.stdout.strip().splitlines()
        print("\n".join(lines[:-1]))  # the profile, with --profile
        results[setup] = __import__("json").loads(lines[-1])
        print(f"{setup}: done in {time.perf_counter() - t:.0f} s", flush=True)
    peak_name = "peak MiB (device)" if DEVICE.type == "cuda" else "peak MiB (RSS)"
    print(f"{'setup':<40}{'tokens/s':>10}{'step s':>9}{peak_name:>19}{'loss':>8}")
    for setup, r in results.items():
        print(f"{labels[setup]:<40}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.3f}{r['peak_mb']:>19.0f}{r['loss']:>8.3f}")
    if "qlora" in results and "peer-qlora" in results:
        speed = results["qlora"]["tokens_per_s"] / results["peer-qlora"]["tokens_per_s"]
        mem = results["qlora"]["peak_mb"] / results["peer-qlora"]["peak_mb"]
        summary("train tokens/s, qlora / peer", f"{speed:.2f}x", ">= 1.5x (issue 6)",
                None if SMOKE else speed >= 1.5 and mem <= 1)
        summary("train peak memory, qlora / peer", f"{mem:.2f}x")
        if "qlora-compile" in results:
            r = results["qlora-compile"]
            summary("train, qlora --compile / peer",
                    f"{r['tokens_per_s'] / results['peer-qlora']['tokens_per_s']:.2f}x tokens/s, "
                    f"{r['peak_mb'] / results['peer-qlora']['peak_mb']:.2f}x peak")
        if "qlora-norecompute" in results:
            r = results["qlora-norecompute"]
            summary("train, qlora without checkpointing / peer",
                    f"{r['tokens_per_s'] / results['peer-qlora']['tokens_per_s']:.2f}x tokens/s, "
                    f"{r['peak_mb'] / results['peer-qlora']['peak_mb']:.2f}x peak")
    elif "qlora" in results:
        summary("train tokens/s, qlora", f"{results['qlora']['tokens_per_s']:.0f}", "(no peer installed)")


# ---- 4. paged optimizer ------------------------------------------------------------------------------
def optim(args) -> None:
    print("\n## 4. paged optimizer under a memory spike (benchmarks/optim_gpu.py)", flush=True)
    if SMOKE:  # the CPU tiers: a small budget streams state through the pages; bit-identical to unpaged
        from qlora.optim import AdamW

        a = [nn.Parameter(torch.randn(s)) for s in [(300, 64), (70_000,), (33,)]]
        b = [nn.Parameter(p.detach().clone()) for p in a]
        paged = AdamW(a, lr=1e-2, paged=True, budget=200_000, page_size=16_384)
        plain = AdamW(b, lr=1e-2, paged=False)
        for _ in range(3):
            for p, q in zip(a, b):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            paged.step()
            plain.step()
        same = all(torch.equal(p, q) for p, q in zip(a, b))
        print(f"CPU tiers, budget 200000 bytes: {paged.state_bytes('host')} state bytes paged, "
              f"parameters identical to unpaged: {same}")
        summary("paged AdamW (CPU tiers) == unpaged", str(same), "True", same)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "optim_gpu.py"), "--params-gb", "1", "--steps", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    print(textwrap.indent(out.stdout.strip() + ("\n" + out.stderr[-2000:] if out.returncode else ""), "  "))
    if DEVICE.type == "cuda":
        survived = out.returncode == 0 and "paged: completed" in out.stdout
        summary("paged AdamW survives a full device", str(survived), "True", survived)


# ---- 5. the trainer on the device: exact resume with the model's own dropout ---------------------
def resume(args) -> None:
    """qlora.finetune end to end on the device: a GPT-2 with dropout on its residuals and attention
    (drawn from the device's generator) runs 6 steps; runs resumed from its step-3 checkpoint must
    give the same losses for steps 4-6. A control drops the device RNG from the checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config

    from qlora.assets import asset_path
    from qlora.model.random_checkpoint import write_random_checkpoint
    from qlora.train.report import read_metrics

    print("\n## 5. trainer: resume on the device with the model's own dropout (GPT-2)", flush=True)
    work = Path(args.workdir) / "resume"
    shutil.rmtree(work, ignore_errors=True)
    model = write_random_checkpoint(GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=4096, n_positions=256,
                                               resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1), work / "model")
    for f in asset_path("tiny-llama").iterdir():  # a tokenizer whose ids fit the vocab
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model / f.name)
    common = dict(model=str(model), data=str(asset_path("instructions.jsonl")), max_steps=6, save_every=3, keep_last=5,
                  batch_size=4, grad_accum=1, max_length=128, lora_r=8, lr=1e-3, device=DEVICE.type, demo=False)
    losses = lambda out: {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}  # noqa: E731
    saved, fused_lora.DEVICE_TYPES = fused_lora.DEVICE_TYPES, set()  # the default layer path, as `qlora train`
    try:
        qlora.finetune(qlora.TrainConfig(output=str(work / "full"), **common))
        full = losses(work / "full")
        diffs = {}
        for name, keep_device_rng in (("resumed", True), ("resumed, control: no device RNG in the checkpoint", False)):
            out = work / ("resumed" if keep_device_rng else "control")
            shutil.copytree(work / "full" / "checkpoints" / "step-0000003", out / "checkpoints" / "step-0000003")
            if not keep_device_rng:
                rng = out / "checkpoints" / "step-0000003" / "rng.safetensors"
                save_file({"torch": load_file(str(rng))["torch"]}, str(rng))
            qlora.finetune(qlora.TrainConfig(output=str(out), resume=True, **common))
            got = losses(out)
            diffs[name] = max(abs(got[s] - full[s]) / abs(full[s]) for s in (4, 5, 6))
            print(f"{name}: steps 4-6 loss {[round(got[s], 5) for s in (4, 5, 6)]} vs uninterrupted "
                  f"{[round(full[s], 5) for s in (4, 5, 6)]}: max rel. diff {diffs[name]:.1e}", flush=True)
    finally:
        fused_lora.DEVICE_TYPES = saved
    d = diffs["resumed"]
    summary("resume with model dropout, rel. loss diff", f"{d:.1e}", "< 1e-4", d < 1e-4)


SECTIONS = {"correct": correctness, "decode": decode, "layer": layer, "train": train, "optim": optim,
            "resume": resume}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--workdir", default="/tmp/qlora-gpu-bench", help="where the random checkpoints go")
    ap.add_argument("--timeout", type=int, default=300, help="seconds for each subprocess")
    ap.add_argument("--profile", action="store_true",
                    help="train: profile one more step of each setup (device busy time, launches, top kernels)")
    args = ap.parse_args()
    if args.profile:
        os.environ["QLORA_BENCH_PROFILE"] = "1"
    if not SMOKE and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; run it on a GPU (or --smoke for a CPU dry run)")
        return 0
    if SMOKE:  # CPU tensors take the Triton paths (interpreted), as CUDA tensors do on a GPU
        kernels.TRITON_DEVICE_TYPES, fused_lora.DEVICE_TYPES = {"cpu"}, {"cpu"}
        where = f"CPU smoke run (TRITON_INTERPRET=1), {torch.get_num_threads()} threads"
    else:  # sections 0-2 measure the opt-in fused path beside the default one
        fused_lora.DEVICE_TYPES = {"cuda"}
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    print(f"{where}; torch {torch.__version__}, triton {triton.__version__}\n", flush=True)
    start = time.perf_counter()
    for name in args.sections.split(","):
        gc.collect()
        if DEVICE.type == "cuda":  # hand cached blocks back: the subprocess sections need the memory
            torch.cuda.empty_cache()
        t = time.perf_counter()
        try:
            SECTIONS[name.strip()](args)
        except Exception:  # noqa: BLE001 (report and go on: one section must not cost the others)
            print(f"section {name} FAILED:\n{traceback.format_exc()[-3000:]}")
            summary(f"section {name}", "FAILED", "", False)
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
    print(f"\n## summary ({time.perf_counter() - start:.0f} s)")
    print(f"{'measure':<42}{'value':>11}  {'goal':<16}{'met':>4}")
    for measure, value, goal, met in SUMMARY:
        print(f"{measure:<42}{value:>11}  {goal:<16}{met:>4}")
    return 1 if any(m == "NO" and v == "FAILED" for _, v, _, m in SUMMARY) else 0


if __name__ == "__main__":
    sys.exit(main())
