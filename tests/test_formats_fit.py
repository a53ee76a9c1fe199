"""Weight FIT under per-channel, per-block and FP8 formats, checked against numpy written out here."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fitonnx import api
from fitonnx.fisher.options import FisherOptions
from fitonnx.formats import get_format
from fitonnx.model.graph import Kind
from fitonnx.score import noise
from fitonnx.score.formats_fit import format_axis, weight_format_fits

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def cnn():
    s = api.open_model(MODELS / "mnist_cnn.onnx")
    traces, _, _ = api.fisher_traces(s, FisherOptions(max_samples=64), keep_gradients=True)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in s.prepared.model.graph.initializer}
    diag = {t.name: traces.diag[t.name] for t in traces.tensors if t.kind is Kind.WEIGHT}
    return s.prepared.model, traces, weights, diag


def _by(fits, fmt: str) -> dict[str, float]:
    return {f.name: f.expected for f in fits if f.format == fmt}


def test_diagonal_sums_to_the_trace(cnn) -> None:
    _, traces, _, diag = cnn
    trace = dict(zip([t.name for t in traces.tensors], traces.trace(), strict=True))
    for name, d in diag.items():
        assert d.sum() == pytest.approx(trace[name], rel=1e-5)


def test_per_tensor_asymmetric_is_the_papers_fit(cnn) -> None:
    model, _, weights, diag = cnn
    fits = _by(weight_format_fits(model, diag, [get_format("uint8")]), "uint8")
    for name, w in weights.items():
        if name in diag:
            paper = noise.fit(diag[name].sum(), float(w.min()), float(w.max()), 8)
            assert fits[name] == pytest.approx(paper, rel=1e-6)


def test_per_channel_symmetric_matches_numpy(cnn) -> None:
    model, _, weights, diag = cnn
    fits = _by(weight_format_fits(model, diag, [get_format("int4/ch")]), "int4/ch")
    assert set(fits) == set(diag)
    for name, fisher in diag.items():
        w = weights[name].astype(np.float64)
        axis = format_axis(model, name, get_format("int4/ch"), w.ndim)
        wc, fc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), np.moveaxis(fisher, axis, 0)
        step = np.float32(np.abs(wc).max(axis=1) / 7).astype(np.float64)  # the scale as ONNX stores it
        expected = float(np.sum(fc.reshape(w.shape[axis], -1).sum(axis=1) * step**2 / 12))
        assert fits[name] == pytest.approx(expected, rel=1e-6)


def test_per_channel_never_exceeds_per_tensor_symmetric(cnn) -> None:
    model, _, _, diag = cnn
    fits = weight_format_fits(model, diag, [get_format("int4"), get_format("int4/ch")])
    tensor, channel = _by(fits, "int4"), _by(fits, "int4/ch")
    for name in channel:  # each channel's max|w| is at most the tensor's: every group's step shrinks
        assert channel[name] <= tensor[name] * (1 + 1e-6)


def test_fp8_fit_of_a_weight_is_the_fisher_weighted_measured_error(cnn) -> None:
    model, _, weights, diag = cnn
    fits = {f.name: f for f in weight_format_fits(model, diag, [get_format("fp8e4m3")])}
    for name, fisher in diag.items():
        w = weights[name]
        scale = np.float32(np.abs(w).max() / np.float32(448.0))
        q = (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
        measured = float(np.sum(fisher.astype(np.float64) * (q.astype(np.float64) - w.astype(np.float64)) ** 2))
        assert fits[name].measured == pytest.approx(measured, rel=1e-6)
        assert fits[name].expected > 0


def test_blocks_follow_the_reduction_axis() -> None:
    w = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [64, 8], np.ones(512, np.float32))
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [], [], initializer=[w])
    model = onnx.helper.make_model(graph)
    assert format_axis(model, "w", get_format("int4/b32"), 2) == 0  # blocks along K, as MatMulNBits
    assert format_axis(model, "w", get_format("int4/ch"), 2) == 1  # one scale per output column
