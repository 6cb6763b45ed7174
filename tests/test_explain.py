"""`qlora explain` and docs/tutorial.md: the issue's examples, checked against hand-written
references, and the tutorial regenerated from the code (it must not drift).

    pytest tests/test_explain.py                 # ~20 s on one core
    pytest tests/test_explain.py -m "not slow"   # without the real-model perplexity check
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from qlora.cli import main
from qlora.explain import (TOPICS, explain_blocks, explain_double_quant, explain_flow, explain_memory,
                           explain_memory_plan, explain_nf4, explain_paging, explain_quantization, run)
from qlora.explain import measured, tutorial
from qlora.explain.double_quant import llama_params
from qlora.explain.memory import lora_params
from qlora.explain.paging import BENCHMARK
from qlora.quant.codebooks import INT4, NF4

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
NUMBERS = ROOT / "docs" / "tutorial_numbers.json"


def absmax_int4(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Reference INT4: q = round(x / (absmax / 7)) clamped to [-8, 7], decoded q * absmax / 7."""
    blocks = x.reshape(-1, blocksize)
    step = blocks.abs().amax(dim=1, keepdim=True) / 7
    return (torch.round(blocks / step).clamp(-8, 7) * step).reshape(-1)


# ---- 1. quantization ------------------------------------------------------------------------
def test_quantization_example_matches_the_issue():
    d = explain_quantization()
    assert d["block"] == [0.1, 2.5, -1.5]
    assert round(d["constant"], 3) == 0.357 and d["constant"] == pytest.approx(2.5 / 7)
    assert d["codes"] == [0, 7, -4]
    assert [round(v, 2) for v in d["decoded"]] == [0, 2.5, -1.43]
    x = torch.tensor(d["block"])
    expected = torch.round(x / (2.5 / 7)) * (2.5 / 7)
    assert d["decoded"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert d["errors"] == pytest.approx([-0.1, 0.0, 0.0714286], abs=1e-6)
    assert d["max_abs_error"] <= d["constant"] / 2


# ---- 2. blocks ------------------------------------------------------------------------------
def test_blocks_one_constant_zeroes_small_weights_and_blocks_isolate_the_outlier():
    d = explain_blocks()
    w = torch.tensor(d["weights"])
    one, per = d["schemes"]["one constant"], d["schemes"]["blocks of 64"]
    assert one["constants"] == 1 and per["constants"] == 4
    assert one["small_to_zero"] == d["n"] - 1  # every small weight
    assert one["outlier_decoded"] == per["outlier_decoded"] == 100.0
    assert per["per_block"][0]["small_to_zero"] == 63  # the outlier's own block loses its neighbours
    for pb in per["per_block"][1:]:  # the others keep theirs
        assert pb["small_to_zero"] < 16 and pb["rmse_small"] < 0.15
    assert per["rmse_small"] < one["rmse_small"] / 1.5
    assert torch.allclose(torch.tensor(per["decoded"]), absmax_int4(w, 64), atol=1e-6)
    assert torch.allclose(torch.tensor(one["decoded"]), absmax_int4(w, 256), atol=1e-6)


# ---- 3. NF4 vs INT4 -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nf4():
    return explain_nf4(minilm=False)


def test_nf4_error_below_int4_and_fp4_on_gaussian_and_real_weights(nf4):
    for weights in ("gaussian", "demo_model"):
        err = nf4[weights]
        assert err["nf4"] < err["int4"] and err["nf4"] < err["fp4"], (weights, err)
    assert nf4["nf4_equals_derived"]
    assert nf4["levels"]["nf4"] == NF4.tolist() and nf4["levels"]["int4"] == INT4.tolist()


def test_nf4_error_equals_a_hand_written_nearest_level_quantizer(nf4):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(nf4["gaussian_shape"], generator=g) * 0.02).reshape(-1, 64)
    absmax = w.abs().amax(dim=1, keepdim=True)
    for name, levels in (("nf4", NF4), ("int4", INT4)):
        idx = ((w / absmax).unsqueeze(-1) - levels).abs().argmin(dim=-1)
        decoded = levels[idx] * absmax
        rel = float((decoded - w).norm() / w.norm())
        assert nf4["gaussian"][name] == pytest.approx(rel, rel=1e-5)


def test_code_usage_nf4_even_int4_outer_codes_unused(nf4):
    use_nf4, use_int4 = nf4["usage"]["nf4"], nf4["usage"]["int4"]
    assert sum(use_nf4) == pytest.approx(1) and sum(use_int4) == pytest.approx(1)
    assert use_int4[0] == 0  # -8/7 of the absmax: beyond every value
    assert max(use_nf4) < 0.1 and max(use_int4) > 0.14
    assert min(use_nf4) > 0.015


# ---- 4. double quantization -----------------------------------------------------------------
def test_double_quant_bits_and_65b_saving():
    d = explain_double_quant()
    n = d["shape"][0] * d["shape"][1]
    assert d["bits"]["without"] == 4.5
    assert d["bits"]["with"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, rel=1e-12)
    assert round(d["bits"]["with"], 3) == 4.127 and round(d["saved_bits"], 3) == 0.373
    assert 2.9e9 < d["models"]["65B"]["saved_bytes"] < 3.1e9  # "about 3 GB"
    assert d["rmse_with"] < d["rmse_without"] * 1.01
    sizes = {k: m["params"] for k, m in d["models"].items()}
    assert sizes["7B"] == 6_738_415_616 and sizes["13B"] == 13_015_864_320  # transformers' counts of LLaMA 7B, 13B
    assert [round(sizes[k] / 1e9, 1) for k in ("33B", "65B")] == [32.5, 65.3]


def test_llama_counts_match_a_real_model():
    from transformers import AutoModelForCausalLM

    from qlora import LoraConfig, prepare_model
    from qlora.assets import asset_path

    model = AutoModelForCausalLM.from_pretrained(asset_path("tiny-llama"), dtype=torch.float32)
    c = model.config
    linear, total = llama_params(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size)
    assert total - c.vocab_size * c.hidden_size == sum(p.numel() for p in model.parameters())  # tied lm_head
    assert linear == sum(m.weight.numel() for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n != "lm_head")
    prepare_model(model, lora=LoraConfig(r=16), quant_type=None, compute_dtype=torch.float32,
                  gradient_checkpointing=False, verbose=False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(c.hidden_size, c.intermediate_size, c.num_hidden_layers, 16) == trained


# ---- 5. memory ------------------------------------------------------------------------------
def test_memory_per_parameter_arithmetic():
    d = explain_memory()
    p = d["per_param"]
    assert p["weight_4bit"] == pytest.approx(4.127 / 8, abs=1e-4)
    assert p["grad_bf16"] == 2 and p["adamw32_m"] == p["adamw32_v"] == 4
    assert p["adamw8_m"] == p["adamw8_v"] == 1 + 4 / 256
    assert d["state_over_weight_nominal"] == 16
    assert d["state_over_weight"] == pytest.approx(8 / p["weight_4bit"])
    assert d["full16_per_param"] == 12 and d["full16_bytes"] > 780e9  # the paper's "more than 780 GB"
    assert d["qlora_bytes"] == pytest.approx(sum(d["qlora_parts"].values()))
    assert d["qlora_bytes"] < 48e9


def test_memory_plan_from_the_planner():
    plan = explain_memory_plan("llama-65b", "48GB")
    assert plan is not None
    assert plan["total_bytes"] == sum(plan["parts"].values())
    per = explain_memory()
    assert plan["parts"]["weights_4bit"] == pytest.approx(per["qlora_parts"]["4-bit linear weights (NF4 + DQ)"], rel=0.05)
    assert plan["fits"] is True  # the paper: 65B fine-tunes in under 48 GB
    assert "weights_4bit" in plan["table"] or "4-bit" in plan["table"]


# ---- 6. paging ------------------------------------------------------------------------------
def test_paging_live_run_respects_the_budget():
    d = explain_paging()
    for bits, r in d["live"].items():
        assert r["device_bytes"] + r["host_bytes"] == r["state_bytes"]
        assert r["host_bytes"] > 0 and r["moved_per_step"] > 0
        assert r["peak_device_bytes"] <= r["budget"]
    assert d["page_elements"][32] * 8 <= d["page_bytes"] < (d["page_elements"][32] + 2 * 256) * 8  # whole 256-blocks


def test_paging_figures_match_docs_benchmarks():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    section = text.split("`.venv/bin/python benchmarks/optim.py --threads 1`")[1].split("`.venv/bin/python")[0]
    for name, (ms, bpp, out, moved) in BENCHMARK.items():
        row = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", section, re.MULTILINE)
        assert row, f"{name} not in the 1-thread table of docs/benchmarks.md"
        cells = [c.strip() for c in row.group(1).split("|")]
        assert float(cells[0]) == ms and float(cells[2]) == bpp and cells[3] == out and cells[4] == moved, (name, cells)


# ---- 7. flow --------------------------------------------------------------------------------
def test_flow_keeps_the_packed_weight_not_the_decoded_one():
    d = explain_flow()
    out_f, in_f = d["tensors"][1]["shape"]
    shapes = [tuple(s["shape"]) for s in d["saved"]]
    assert (out_f, in_f) not in shapes and (in_f, out_f) not in shapes  # no decoded W kept
    assert d["kept_by_reference"]["same_buffers"] and d["kept_by_reference"]["bytes"] == d["tensors"][1]["bytes"]
    assert d["grads"] == {"A": True, "B": True, "X": True, "W": False}
    assert d["formula_rel_error"] < 1e-2
    assert d["tensors"][1]["bytes"] < d["dense_bf16_bytes"] / 3
    names = {s["name"] for s in d["saved"]}
    assert names >= {"X itself (dropout(X) is regenerated from the seed)", "A dropout(X): input of B"}
    # one tensor of X's size kept (X, or a view of it: each storage is listed once): no dropped copy, no mask
    x_numel = math.prod(d["tensors"][0]["shape"])
    assert sum(math.prod(s["shape"]) == x_numel for s in d["saved"]) == 1


# ---- the CLI --------------------------------------------------------------------------------
def test_cli_explain_prints_the_numbers_and_writes_pngs(tmp_path, capsys):
    assert main(["explain", "quantization", "blocks", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.357" in out and "[0, 7, -4]" in out and "== blocks" in out
    assert (tmp_path / "blocks.png").stat().st_size > 10_000


def test_cli_explain_rejects_an_unknown_topic(capsys):
    assert main(["explain", "lora"]) == 2
    assert "unknown topic" in capsys.readouterr().err


def test_every_topic_runs(tmp_path, capsys):
    run(list(TOPICS), tmp_path)
    out = capsys.readouterr().out
    assert all(f"== {t} " in out for t in TOPICS)
    assert (tmp_path / "nf4_vs_int4.png").exists() and (tmp_path / "blocks.png").exists()  # matplotlib: a dev dependency


# ---- the tutorial ---------------------------------------------------------------------------
def test_tutorial_numbers_are_what_the_code_computes():
    text = TUTORIAL.read_text()
    values = tutorial.tutorial_values(NUMBERS)
    diffs = tutorial.stale(text, values)
    assert not diffs, "docs/tutorial.md is stale; run `python scripts/tutorial_numbers.py`:\n" + "\n".join(
        f"  {k}: {old.strip()[:50]!r} -> {new.strip()[:50]!r}" for k, old, new in diffs)
    assert len(tutorial.MARKER.findall(text)) >= 60
    # the issue's examples are among them
    for key, value in (("q.constant", "0.357"), ("q.codes", "[0, 7, -4]"), ("q.decoded", "[0, 2.5, -1.43]"),
                       ("d.bits_with", "4.127"), ("d.bits_without", "4.500")):
        assert values[key] == value


def test_tutorial_prose_claims_hold_for_the_measured_numbers():
    n = json.loads(NUMBERS.read_text())
    ppl = n["perplexity"]["full"]
    assert abs(ppl["nf4+dq"] / ppl["bf16"] - 1) < 0.01  # "within a hair"
    assert ppl["nf4+dq"] < ppl["fp4"] and ppl["nf4+dq"] < ppl["int4"]  # "NF4 beats FP4 and INT4"
    assert ppl["int4"] < ppl["fp4"]  # "INT4 here is not the worst"
    ft = n["finetune"]
    assert ft["nf4"]["steps"] == ft["none"]["steps"]
    assert abs(ft["nf4"]["eval_loss_after"] - ft["none"]["eval_loss_after"]) < 0.05  # "the same result"
    assert ft["nf4"]["eval_loss_after"] < ft["nf4"]["eval_loss_before"] - 1


@pytest.mark.slow
def test_measured_perplexities_reproduce_on_a_small_slice():
    """The committed perplexities come from this code: recompute the first windows (a few s)."""
    n = json.loads(NUMBERS.read_text())
    ids = measured.heldout_ids(n["perplexity"]["small_windows"])
    for label, q, dq in measured.PPL_CASES:
        if label in ("nf4+dq", "bf16"):
            got = measured.perplexity(measured.demo_model(q, dq), ids)
            assert got == pytest.approx(n["perplexity"]["small"][label], rel=1e-4), label
    assert math.isfinite(n["perplexity"]["full"]["nf4+dq"])
