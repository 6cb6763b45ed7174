"""`qlora explain`: how QLoRA works, told with numbers computed on the spot by qlora itself.

    qlora explain                       # every topic, in order
    qlora explain nf4 --output DIR      # one topic; PNGs go to DIR (default ./qlora-explain)

Topics (one public function each, returning the numbers as a dict, so the terminal, the
tutorial docs/tutorial.md and tests/test_explain.py all read the same values):
    quantization   explain_quantization()   integer absmax quantization of [0.1, 2.5, -1.5]
    blocks         explain_blocks()         one outlier: one constant vs blocks of 64
    nf4            explain_nf4()            NF4 vs INT4 levels and errors (PNG)
    double-quant   explain_double_quant()   bytes/param with and without DQ, LLaMA savings
    memory         explain_memory()         bytes per parameter; explain_memory_plan(): the planner
    paging         explain_paging()         what paged AdamW moves, when, what it costs
    flow           explain_flow()           one real layer forward and backward
Files: blocks.py, nf4.py, double_quant.py, memory.py, paging.py, flow.py (the topics),
measured.py (the demo model's perplexities and fine-tunes, for the tutorial), tutorial.py
(keeps docs/tutorial.md in step), text.py (tables).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from . import blocks as _blocks
from . import double_quant as _dq
from . import flow as _flow
from . import memory as _memory
from . import nf4 as _nf4
from . import paging as _paging
from .blocks import explain_blocks, explain_quantization
from .double_quant import explain_double_quant
from .flow import explain_flow
from .memory import explain_memory, explain_memory_plan
from .nf4 import explain_nf4
from .paging import explain_paging
from .text import fmt_list

TOPICS = ("quantization", "blocks", "nf4", "double-quant", "memory", "paging", "flow")

__all__ = ["TOPICS", "explain_blocks", "explain_double_quant", "explain_flow", "explain_memory",
           "explain_memory_plan", "explain_nf4", "explain_paging", "explain_quantization", "run"]


def _quantization(out: Path) -> str:
    d = explain_quantization()
    return "\n".join([
        f"Store the block {d['block']} in 4-bit integers (-8..7). Absmax quantization divides by one",
        f"constant per block, absmax / 7 = {d['absmax']:g} / 7 = {d['constant']:.3f}, rounds to the nearest",
        "integer, and stores that code; decoding multiplies back.",
        "",
        _blocks.render_quantization(d),
        "",
        f"codes {d['codes']}, decoded {fmt_list(d['decoded'])}: the largest value is exact,",
        f"the others are off by up to half a step ({d['max_abs_error']:.4f} here). 4 bits per value plus the constant.",
    ])


def _blocks_topic(out: Path) -> str:
    d = explain_blocks()
    one, per = d["schemes"].values()
    png = out / "blocks.png"
    lines = [
        f"{d['n']} small N(0, 1) weights (largest {d['small_absmax']:.2f}) and one {d['outlier']:g} at index "
        f"{d['outlier_index']}.",
        f"With one constant ({d['outlier']:g} / 7 = {d['outlier'] / 7:.1f} per step) every small weight rounds to 0: "
        f"{one['small_to_zero']} of {d['n'] - 1}.",
        f"With blocks of {d['blocksize']} only the outlier's block loses them ({per['small_to_zero']} rounded to 0 "
        f"in all); RMSE of the small weights {one['rmse_small']:.3f} -> {per['rmse_small']:.3f}.",
        "",
        _blocks.render_blocks(d),
        "",
        _blocks.render_blocks_sample(d),
    ]
    if _blocks.plot_blocks(d, png):
        lines += ["", f"picture: {png}"]
    return "\n".join(lines)


def _nf4_topic(out: Path) -> str:
    d = explain_nf4()
    png = out / "nf4_vs_int4.png"
    lines = [
        "INT4 spaces its 16 levels evenly over [-1, 1]; NF4 puts them at quantiles of the normal",
        f"distribution (qlora.derive_nf4() rebuilds NF4 exactly: {d['nf4_equals_derived']}). Weights in a block are",
        "roughly normal, so NF4 uses its codes evenly and INT4 wastes its outer ones. Share of",
        f"Gaussian weights (blocks of {d['blocksize']}) stored with each code:",
        "",
        _nf4.render_levels(d),
        "",
        "Error of each code book, ||W - dequant(quant(W))|| / ||W||, no double quantization:",
        "",
        _nf4.render_errors(d),
    ]
    if _nf4.plot_levels(d, png):
        lines += ["", f"picture: {png}"]
    return "\n".join(lines)


def _dq_topic(out: Path) -> str:
    d = explain_double_quant()
    return "\n".join([
        f"Each block of {d['blocksize']} weights carries a float32 scale: 32 / {d['blocksize']} = "
        f"{32 / d['blocksize']} extra bits per weight. Double quantization stores those scales as 8-bit codes",
        f"(blocks of {d['nested_blocksize']} scales, one float32 each, mean removed):",
        "",
        _dq.render_bits(d),
        "",
        f"It saves {d['saved_bits']:.3f} bits per parameter; the scales it reconstructs are off by "
        f"{100 * d['scale_rel_error_mean']:.2f}% on average",
        f"(max {100 * d['scale_rel_error_max']:.2f}%), and the weight error moves from {d['rmse_without']:.5f} to "
        f"{d['rmse_with']:.5f}. On LLaMA models:",
        "",
        _dq.render_savings(d),
    ])


def _memory_topic(out: Path) -> str:
    d = explain_memory()
    plan = explain_memory_plan()
    lines = [
        "Bytes per parameter, measured on qlora's own tensors and optimizer:",
        "",
        _memory.render_per_param(d),
        "",
        f"AdamW keeps m and v: {d['per_param']['adamw32_m'] + d['per_param']['adamw32_v']:g} bytes per parameter, "
        f"{d['state_over_weight_nominal']:g}x a 4-bit weight's 0.5 bytes",
        f"({d['state_over_weight']:.1f}x with the quantization constants). Training every weight would cost far "
        "more than storing it,",
        f"so QLoRA trains only LoRA adapters: {d['lora_params'] / 1e6:.1f}M parameters on {d['model']} "
        f"({100 * d['lora_fraction']:.2f}%).",
        "",
        _memory.render_totals(d),
        "",
    ]
    if plan is None:
        lines.append("The full plan (activations, workspace, overhead) needs the memory planner (qlora.memory), "
                     "which this build lacks.")
    else:
        lines += [f"The memory planner's plan for {plan['model']} (`qlora.plan_memory`), device memory "
                  f"{plan['device_memory']}:", "", plan["table"]]
    return "\n".join(lines)


def _paging_topic(out: Path) -> str:
    d = explain_paging()
    return "\n".join([
        "Paged AdamW moves optimizer state only (m and v of each parameter, whole), never weights or",
        "activations. Before every step it checks the state against the budget (free device memory",
        f"minus {d['cuda_margin'] / 2**30:g} GiB on CUDA): on a spike it evicts states to host memory, last parameter "
        "first; when memory",
        f"comes back it restores them. Host-resident states stream through {d['pages']} staging pages of "
        f"{d['page_bytes'] / 2**20:g} MiB",
        f"({d['page_elements'][32]:,} parameters of 32-bit state or {d['page_elements'][8]:,} of 8-bit state per page), "
        "the next page loading while the current one updates.",
        "",
        f"Live, both tiers on this CPU, budget half the state, pages of {d['live_page_bytes'] / 2**20:g} MiB:",
        "",
        _paging.render_live(d),
        "",
        f"Measured cost ({d['benchmark_source']}):",
        "",
        _paging.render_benchmark(d),
    ])


def _flow_topic(out: Path) -> str:
    d = explain_flow()
    return "\n".join([
        f"Y = dequant(W) X + {d['scaling']:g} B A X through {d['layer']} of the demo model "
        f"(NF4 + DQ, {d['compute_dtype']} compute, r = {d['r']}),",
        f"{d['tokens']} tokens:",
        "",
        _flow.render_tensors(d),
        "",
        f"The 4-bit weight takes {d['tensors'][1]['bytes']:,} bytes against {d['dense_bf16_bytes']:,} in bf16; "
        f"Y matches the formula in float32 to {d['formula_rel_error']:.1e} (relative).",
        "What autograd keeps for backward (read from the graph of Y):",
        "",
        _flow.render_saved(d),
        "",
        f"Gradients: A {d['grads']['A']}, B {d['grads']['B']}, X {d['grads']['X']}, W {d['grads']['W']} "
        "(frozen: backward decodes W again to pass the gradient to X).",
    ])


_RUNNERS: dict[str, Callable[[Path], str]] = {
    "quantization": _quantization, "blocks": _blocks_topic, "nf4": _nf4_topic, "double-quant": _dq_topic,
    "memory": _memory_topic, "paging": _paging_topic, "flow": _flow_topic,
}


def run(topics: list[str] | None = None, output: str | Path = "qlora-explain") -> None:
    """Print the walk-through of `topics` (default: all, in TOPICS order); PNGs go to `output`."""
    chosen = list(topics) if topics else list(TOPICS)
    unknown = [t for t in chosen if t not in _RUNNERS]
    if unknown:
        raise InputError(f"unknown topic(s) {unknown}: choose from {', '.join(TOPICS)}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for i, topic in enumerate(chosen):
        print(("\n" if i else "") + f"== {topic} " + "=" * (70 - len(topic)))
        print(_RUNNERS[topic](out))
