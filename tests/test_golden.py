"""Golden files for the terminal report of a small deterministic model.

Regenerate after an intended format change with FITONNX_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fitonnx import api
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from fitonnx.render import report
from tests.conftest import tiny_classifier

GOLDEN = Path(__file__).parent / "golden"


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FITONNX_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def test_score_table_golden() -> None:
    rng = np.random.default_rng(7)
    data = Dataset(
        arrays={"x": rng.normal(size=(24, 4)).astype(np.float32)}, labels=rng.integers(0, 3, 24), source="tiny.npz"
    )
    result = api.score(tiny_classifier(), data, options=FisherOptions(engine="onnx"))  # the header names it
    _check("score_tiny.txt", report.format_table(result) + "\n")
