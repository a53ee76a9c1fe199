"""The gradient-engine registry: names, auto selection, loud failures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError
from fitonnx.fisher import engines
from fitonnx.fisher.options import FisherOptions


def test_auto_picks_the_first_available_engine() -> None:
    first = next(name for name in engines.PREFERENCE if engines.ENGINES[name].available())
    assert engines.get_engine().name == first
    assert engines.ENGINES["onnx"].available()  # needs nothing but onnxruntime
    if engines.ENGINES["ort-training"].available():
        assert engines.get_engine("ort-training") is engines.ENGINES["ort-training"]


def test_auto_falls_back_to_the_onnx_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = engines.ENGINES["ort-training"]
    monkeypatch.setitem(engines.ENGINES, "ort-training", dataclasses.replace(reference, available=lambda: False))
    assert engines.get_engine().name == "onnx"
    with pytest.raises(FitonnxError, match="'ort-training' to be installed"):
        engines.get_engine("ort-training")


def test_unknown_engine_fails_with_the_known_names() -> None:
    with pytest.raises(FitonnxError, match="ort-training"):
        engines.get_engine("nope")
    with pytest.raises(FitonnxError, match="auto"):
        FisherOptions(engine="nope")


def test_fisher_options_default_to_auto() -> None:
    assert FisherOptions().engine == engines.AUTO


def test_cli_engine_option(mlp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["score", str(mlp_path), "--engine", "onnx", "--max-samples", "4"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["score", str(mlp_path), "--engine", "nope"])
    assert bad.exit_code == 2 and "ort-training" in bad.output


def test_device_without_its_provider_is_a_one_line_error(
    cnn_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--device cuda on an onnxruntime without CUDAExecutionProvider: exit 2 before any work, one
    error line naming the providers it has."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    result = CliRunner().invoke(cli, ["score", str(cnn_path), "--device", "cuda", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("error: expected onnxruntime's CUDAExecutionProvider for --device cuda")
    assert "['CPUExecutionProvider']" in first
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(FitonnxError, match="expected a device among"):
        FisherOptions(device="tpu")


def test_report_records_engine_device_and_batch_size(cnn_path: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "r.json"
    args = ["score", str(cnn_path), "--engine", "onnx", "--batch-size", "4", "--max-samples", "6", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["engine"], report["device"], report["batch_size"]) == ("onnx", "cpu", 4)
    assert "onnx engine on cpu, batch 4" in result.stdout
