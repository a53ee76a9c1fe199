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
