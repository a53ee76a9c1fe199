"""fitonnx's own engine gives the reference engine's Fisher traces on every bundled and zoo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fitonnx import api
from fitonnx.fisher.engines import ENGINES
from fitonnx.fisher.options import FisherOptions

ROOT = Path(__file__).resolve().parent.parent / "models"
MODELS = sorted([*ROOT.glob("*.onnx"), *(ROOT / "zoo").glob("*.onnx")], key=lambda p: p.name)

needs_reference = pytest.mark.skipif(
    not ENGINES["ort-training"].available(), reason="the reference engine needs onnxruntime-training"
)


@needs_reference
@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_onnx_engine_traces_equal_ort_training(path: Path) -> None:
    """Per sample at batch 1 (the same kernels: the rules against the reference), and the default
    batched loop's per-tensor traces (its per-sample values of confidently classified samples sit
    below float32 resolution, as the reference's do)."""
    s = api.open_model(path)
    ref, _, _ = api.fisher_traces(s, FisherOptions(max_samples=4, engine="ort-training"))
    own, _, _ = api.fisher_traces(s, FisherOptions(max_samples=4, engine="onnx", batch_size=1))
    a, b = ref.per_sample, own.per_sample
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-12 * float(np.abs(a).max()))
    batched, _, _ = api.fisher_traces(s, FisherOptions(max_samples=4, engine="onnx"))
    np.testing.assert_allclose(batched.trace(), ref.trace(), rtol=1e-4, atol=1e-12 * float(np.abs(a).max()))


def test_onnx_engine_scores_the_bundled_cnn_without_the_training_build() -> None:
    report = api.score(ROOT / "mnist_cnn.onnx", options=FisherOptions(max_samples=8, engine="onnx"))
    assert all(t.ef_trace > 0 and np.isfinite(t.ef_trace) for t in report.tensors)
