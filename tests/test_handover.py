"""The exported files used as they are: overrides through quantize_static, budgets checked first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from fitonnx import api
from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError
from fitonnx.export.ort import calibration_reader, int4_compat, load_overrides

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ort") / "out"
    result = CliRunner().invoke(
        cli, ["recommend", str(MODELS / "mnist_cnn.onnx"), "--avg-bits", "6", "--target", "ort", "--out", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    return out


def test_plain_json_overrides_fail_in_quantize_static_and_load_overrides_fixes_it(
    ort_bundle: Path, tmp_path: Path
) -> None:
    model, calib = MODELS / "mnist_cnn.onnx", MODELS / "mnist_cnn.calib.npz"
    plain = json.loads((ort_bundle / "ort_overrides.json").read_text())
    with pytest.raises(AttributeError, match="tensor_type"):
        quantize_static(
            str(model),
            str(tmp_path / "a.onnx"),
            calibration_reader(calib, model),
            quant_format=QuantFormat.QDQ,
            extra_options={"TensorQuantOverrides": plain},
        )
    overrides = load_overrides(ort_bundle / "ort_overrides.json", model)
    assert all(isinstance(e["quant_type"], QuantType) for v in overrides.values() for e in v)
    with int4_compat():
        quantize_static(
            str(model),
            str(tmp_path / "b.onnx"),
            calibration_reader(calib, model),
            quant_format=QuantFormat.QDQ,
            extra_options={"TensorQuantOverrides": overrides},
        )
    qdq = onnx.load(str(tmp_path / "b.onnx"))
    rec = json.loads((ort_bundle / "recommendation.json").read_text())
    types = {t.name: t.data_type for t in qdq.graph.initializer}
    bits_of = {onnx.TensorProto.INT4: 4, onnx.TensorProto.INT8: 8, onnx.TensorProto.INT16: 16}
    for name, bits in rec["weight_bits"].items():
        assert bits_of[types[f"{name}_quantized"]] == bits
    heldout = np.load(MODELS / "mnist_cnn.heldout.npz")
    logits = ort.InferenceSession(str(tmp_path / "b.onnx")).run(None, {"input": heldout["input"]})[0]
    assert (logits.argmax(1) == heldout["labels"]).mean() > 0.9


def test_load_overrides_rejects_unknown_quant_types(tmp_path: Path) -> None:
    (tmp_path / "o.json").write_text(json.dumps({"x": [{"quant_type": "QInt3"}]}))
    with pytest.raises(FitonnxError, match="QInt3"):
        load_overrides(tmp_path / "o.json")


def test_impossible_budget_fails_before_scoring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def never(*args, **kwargs):
        raise AssertionError("scored before checking the budget")

    monkeypatch.setattr(api, "score_session", never)
    for budget, message in (({"size_kb": 1}, "at least 25.4"), ({"avg_bits": 3}, "at least 4 bits")):
        with pytest.raises(FitonnxError, match=message):
            api.recommend(
                MODELS / "mnist_cnn.onnx",
                budget=api.budget_from(**budget),
                choices=api.AllocationOptions(target="ort"),
                out_dir=tmp_path / "o",
            )


def test_export_with_random_data_warns_that_the_model_is_not_deployable(ort_bundle: Path, tmp_path: Path) -> None:
    args = ["export", str(MODELS / "mnist_cnn.onnx"), "--recommendation", str(ort_bundle / "recommendation.json")]
    result = CliRunner().invoke(cli, [*args, "--format", "qdq", "-o", str(tmp_path / "q.onnx"), "--random-data", "4"])
    assert result.exit_code == 0, result.stderr
    assert "warning: calibrating with random inputs" in result.stderr and "do not deploy it" in result.stderr
    result = CliRunner().invoke(cli, [*args, "--format", "qdq", "-o", str(tmp_path / "r.onnx")])
    assert result.exit_code == 0 and "warning" not in result.stderr
