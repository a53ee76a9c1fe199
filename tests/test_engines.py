"""The gradient-engine registry: names, auto selection, loud failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError
from fitonnx.fisher import engines
from fitonnx.fisher.options import FisherOptions


def test_auto_picks_the_first_available_engine() -> None:
    assert engines.get_engine().name == engines.PREFERENCE[0] == "ort-training"
    assert engines.get_engine("ort-training") is engines.ENGINES["ort-training"]


def test_unknown_engine_fails_with_the_known_names() -> None:
    with pytest.raises(FitonnxError, match="ort-training"):
        engines.get_engine("nope")
    with pytest.raises(FitonnxError, match="auto"):
        FisherOptions(engine="nope")


def test_fisher_options_default_to_auto() -> None:
    assert FisherOptions().engine == engines.AUTO


def test_cli_engine_option(mlp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["score", str(mlp_path), "--engine", "ort-training", "--max-samples", "4"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["score", str(mlp_path), "--engine", "nope"])
    assert bad.exit_code == 2 and "ort-training" in bad.output
