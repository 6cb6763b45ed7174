"""qlora/model/quality.py: perplexity per base recipe on the shipped tiny Llama (pretrained on
Python's standard library), and `qlora quantize-report --data`.

    pytest tests/model/test_quality.py
"""
import inspect
import json

import pytest

from qlora.assets import asset_path
from qlora.model.quality import quality_report

MODEL = str(asset_path("tiny-llama"))


def test_every_recipe_scores_its_own_base(tmp_path):
    """The rows' storage and adapter bits, and perplexities near the 16-bit model's (a recipe
    that decoded or scaled wrongly would be far off). That calibration beats absmax is checked
    on logits in test_calibrate.py (this model loses little to 4 bits) and on SmolLM2 by
    benchmarks/quality.py."""
    import collections
    import json as js

    calib = tmp_path / "calib.txt"
    calib.write_text(inspect.getsource(collections))
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(inspect.getsource(js.decoder) + inspect.getsource(js.encoder))
    rows = {r.recipe: r for r in quality_report(MODEL, str(held_out), str(calib), ("bf16", "absmax", "calibrated", "loftq"),
                                                windows=4, calibrate_rows=8, seq=128, rank=8, progress=False)}
    assert rows["bf16"].bits_per_param == 16 and rows["bf16"].adapter_bits_per_param == 0
    for r in ("absmax", "calibrated", "loftq"):  # the same storage; down_proj (688-wide rows) included
        assert rows[r].bits_per_param == pytest.approx(4.127, abs=0.01)
    assert rows["loftq"].adapter_bits_per_param > 0 == rows["calibrated"].adapter_bits_per_param
    ppl = {k: r.perplexity for k, r in rows.items()}
    assert all(abs(v / ppl["bf16"] - 1) < 0.05 for v in ppl.values()), ppl


def test_quantize_report_with_data_writes_the_rows(tmp_path):
    import argparse

    from qlora.cli import main

    text = tmp_path / "text.txt"
    text.write_text(inspect.getsource(argparse))
    main(["quantize-report", "--model", MODEL, "--data", str(text), "--recipes", "bf16,absmax", "--windows", "2",
          "--output", str(tmp_path / "out")])
    got = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert [r["recipe"] for r in got["rows"]] == ["bf16", "absmax"]
    assert got["rows"][0]["bits_per_param"] == 16 and got["rows"][1]["bits_per_param"] < 4.2
    # a bad recipe: one line, exit 2
    assert main(["quantize-report", "--model", MODEL, "--data", str(text), "--recipes", "bf16,best"]) == 2
