"""Keeps docs/tutorial.md in step with the code: every number in it sits between markers

    <!-- q:KEY -->0.357<!-- /q -->

and `tutorial_values()` says what each KEY must hold: fresh from the explain functions, or,
for the slow real-model runs, from docs/tutorial_numbers.json (written by
`python scripts/tutorial_numbers.py --measure`). `render()` rewrites the marked spans;
tests/test_explain.py asserts that rendering the committed tutorial changes nothing.

    python scripts/tutorial_numbers.py            # re-render docs/tutorial.md in place
    python scripts/tutorial_numbers.py --check    # exit 1 if it is stale
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from . import blocks as B
from . import double_quant as DQ
from . import flow as F
from . import memory as M
from . import nf4 as N
from . import paging as P
from .text import fmt_list, table

MARKER = re.compile(r"<!-- q:(?P<key>[\w.+-]+) -->(?P<body>.*?)<!-- /q -->", re.DOTALL)
NO_PLANNER = "_(this build has no memory planner, `qlora.memory`; run `python scripts/tutorial_numbers.py` " \
             "once it is there)_"


def _block(text: str) -> str:
    """A table or code block between markers sits on its own lines."""
    return f"\n{text}\n"


def cheap_values() -> dict[str, str]:
    """Values computed on the spot by the explain functions (a few seconds)."""
    v: dict[str, str] = {}
    q = B.explain_quantization()
    v |= {"q.block": fmt_list(q["block"]), "q.absmax": f"{q['absmax']:g}", "q.constant": f"{q['constant']:.3f}",
          "q.codes": str(q["codes"]), "q.decoded": fmt_list(q["decoded"]), "q.errors": fmt_list(q["errors"]),
          "q.table": _block(B.render_quantization(q, markdown=True))}

    b = B.explain_blocks()
    one, per = b["schemes"].values()
    v |= {"b.n": str(b["n"]), "b.small_absmax": f"{b['small_absmax']:.2f}", "b.step": f"{b['outlier'] / 7:.1f}",
          "b.one_zero": str(one["small_to_zero"]), "b.small_count": str(b["n"] - 1),
          "b.per_zero": str(per["small_to_zero"]),
          "b.near_zero": str(per["small_to_zero"] - per["per_block"][0]["small_to_zero"]), "b.rmse_one": f"{one['rmse_small']:.3f}",
          "b.rmse_per": f"{per['rmse_small']:.3f}", "b.table": _block(B.render_blocks(b, markdown=True)),
          "b.sample": _block(B.render_blocks_sample(b, markdown=True))}

    n = N.explain_nf4(minilm=False)
    use_nf4, use_int4 = n["usage"]["nf4"], n["usage"]["int4"]
    v |= {"n.levels": _block(N.render_levels(n, markdown=True)), "n.errors": _block(N.render_errors(n, markdown=True)),
          "n.nf4_use_min": f"{100 * min(use_nf4):.1f}%", "n.nf4_use_max": f"{100 * max(use_nf4):.1f}%",
          "n.int4_use_outer": f"{100 * (use_int4[0] + use_int4[1] + use_int4[-1]):.1f}%",
          "n.int4_use_max": f"{100 * max(use_int4):.1f}%",
          "n.gauss_nf4": f"{n['gaussian']['nf4']:.4f}", "n.gauss_int4": f"{n['gaussian']['int4']:.4f}",
          "n.gauss_fp4": f"{n['gaussian']['fp4']:.4f}", "n.demo_nf4": f"{n['demo_model']['nf4']:.4f}",
          "n.demo_int4": f"{n['demo_model']['int4']:.4f}", "n.derived": str(n["nf4_equals_derived"])}

    d = DQ.explain_double_quant()
    v |= {"d.bits_without": f"{d['bits']['without']:.3f}", "d.bits_with": f"{d['bits']['with']:.3f}",
          "d.bytes_without": f"{d['bytes_per_param']['without']:.4f}",
          "d.bytes_with": f"{d['bytes_per_param']['with']:.4f}", "d.saved_bits": f"{d['saved_bits']:.3f}",
          "d.bits": _block(DQ.render_bits(d, markdown=True)), "d.savings": _block(DQ.render_savings(d, markdown=True)),
          "d.save65": f"{d['models']['65B']['saved_bytes'] / 1e9:.2f} GB",
          "d.scale_err_mean": f"{100 * d['scale_rel_error_mean']:.2f}%",
          "d.scale_err_max": f"{100 * d['scale_rel_error_max']:.2f}%",
          "d.rmse_without": f"{d['rmse_without']:.5f}", "d.rmse_with": f"{d['rmse_with']:.5f}"}

    m = M.explain_memory()
    pp = m["per_param"]
    v |= {"m.per_param": _block(M.render_per_param(m, markdown=True)), "m.totals": _block(M.render_totals(m, markdown=True)),
          "m.state": f"{pp['adamw32_m'] + pp['adamw32_v']:g}", "m.ratio_nominal": f"{m['state_over_weight_nominal']:g}",
          "m.ratio": f"{m['state_over_weight']:.1f}", "m.weight_4bit": f"{pp['weight_4bit']:.4f}",
          "m.state8": f"{pp['adamw8_m'] + pp['adamw8_v']:.5g}",
          "m.lora_params": f"{m['lora_params'] / 1e6:.1f}M", "m.lora_fraction": f"{100 * m['lora_fraction']:.2f}%",
          "m.full16": f"{m['full16_bytes'] / 1e9:.1f} GB", "m.full16_per_param": f"{m['full16_per_param']:g}",
          "m.qlora": f"{m['qlora_bytes'] / 1e9:.2f} GB"}
    v |= planner_values()

    p = P.explain_paging()
    bench = p["benchmark"]
    base32, base8 = bench["qlora AdamW 32-bit"][0], bench["qlora AdamW 8-bit"][0]
    v |= {"p.page_mib": f"{p['page_bytes'] / 2**20:g}", "p.margin_gib": f"{p['cuda_margin'] / 2**30:g}",
          "p.page_elements32": f"{p['page_elements'][32]:,}", "p.page_elements8": f"{p['page_elements'][8]:,}",
          "p.live_page_mib": f"{p['live_page_bytes'] / 2**20:g}", "p.live": _block(P.render_live(p, markdown=True)),
          "p.bench": _block(P.render_benchmark(p, markdown=True)),
          "p.cost32": f"{bench['qlora AdamW 32-bit paged (budget 1/2 of state)'][0] / base32:.2f}x",
          "p.cost8": f"{bench['qlora AdamW 8-bit paged (budget 1/2 of state)'][0] / base8:.2f}x",
          "p.default32": f"{bench['qlora AdamW 32-bit paged (default budget)'][0] / base32:.2f}x"}

    f = F.explain_flow()
    v |= {"f.tensors": _block(F.render_tensors(f, markdown=True)), "f.saved": _block(F.render_saved(f, markdown=True)),
          "f.layer": f"`{f['layer']}`", "f.tokens": str(f["tokens"]), "f.r": str(f["r"]), "f.scaling": f"{f['scaling']:g}",
          "f.packed": f"{f['tensors'][1]['bytes']:,}", "f.dense": f"{f['dense_bf16_bytes']:,}",
          "f.saved_bytes": f"{f['saved_bytes']:,}", "f.dropped": f"{f['dropped']['bytes']:,}"}
    return v


def planner_values() -> dict[str, str]:
    """The memory planner's plan for LLaMA-65B on 48 GB (a note when the planner is absent)."""
    plan = M.explain_memory_plan("llama-65b", "48GB")
    if plan is None:
        return {"m.plan": _block(NO_PLANNER)}
    return {"m.plan": _block("```\n" + plan["table"] + "\n```")}


def measured_values(numbers: dict) -> dict[str, str]:
    """Values read from docs/tutorial_numbers.json (the demo model's measured runs)."""
    ppl = numbers["perplexity"]["full"]
    labels = {"bf16": "bf16 (unquantized)", "nf4+dq": "NF4 + DQ", "nf4": "NF4", "fp4": "FP4", "int4": "INT4"}
    rows = [(labels[k], f"{x:.3f}", f"{100 * (x / ppl['bf16'] - 1):+.2f}%") for k, x in ppl.items()]
    ft = numbers["finetune"]
    ft_rows = [(name, r["steps"], f"{r['eval_loss_before']:.4f}", f"{r['eval_loss_after']:.4f}",
                f"{math.exp(r['eval_loss_after']):.2f}", f"{r['train_loss_last']:.4f}", f"{r['seconds']:.0f}")
               for name, r in (("QLoRA (NF4 + DQ base)", ft["nf4"]), ("16-bit LoRA (bf16 base)", ft["none"]))]
    v = {"demo.ppl": _block(table(["held-out perplexity", "value", "vs bf16"], rows, markdown=True)),
         "demo.windows": str(numbers["perplexity"]["windows"]), "demo.tokens": f"{numbers['perplexity']['tokens']:,}",
         "demo.finetune": _block(table(["demo fine-tune", "steps", "eval loss before", "eval loss after",
                                        "eval perplexity after", "last train loss", "seconds"], ft_rows, markdown=True)),
         "demo.command": f"`{numbers['command']}`", "demo.eval_rows": str(ft["nf4"]["eval_rows"]),
         "demo.gap": f"{ft['nf4']['eval_loss_after'] - ft['none']['eval_loss_after']:+.4f}"}
    for k, x in ppl.items():
        v[f"demo.ppl.{k}"] = f"{x:.3f}"
    return v


def tutorial_values(numbers_path: str | Path) -> dict[str, str]:
    """Every marker's value: cheap ones computed now, measured ones from `numbers_path`."""
    numbers = json.loads(Path(numbers_path).read_text())
    return cheap_values() | measured_values(numbers)


def render(text: str, values: dict[str, str], where: str = "tutorial") -> str:
    """`text` with each marked span replaced by its value; unknown keys raise naming them."""
    _check_keys(text, values, where)
    return MARKER.sub(lambda m: f"<!-- q:{m['key']} -->{values[m['key']]}<!-- /q -->", text)


def _check_keys(text: str, values: dict[str, str], where: str) -> None:
    unknown = sorted({m["key"] for m in MARKER.finditer(text)} - values.keys())
    if unknown:
        raise KeyError(f"{where}: markers with no value: {unknown}; known keys: {sorted(values)}")


def stale(text: str, values: dict[str, str], where: str = "tutorial") -> list[tuple[str, str, str]]:
    """(key, committed, expected) for every marked span whose text differs from its value."""
    _check_keys(text, values, where)
    return [(m["key"], m["body"], values[m["key"]]) for m in MARKER.finditer(text) if m["body"] != values[m["key"]]]
