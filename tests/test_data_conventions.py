"""Data conventions: batch-of-one slicing, whole samples for models without a batch axis, sidecars."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.model.data import Dataset


def _sequence_model(time: int = 5) -> onnx.ModelProto:
    """x[T,4] (no batch axis) -> MatMul -> Tanh -> MatMul -> logits[T,3]: per-position classes."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Tanh", ["h"], ["t"]),
            helper.make_node("MatMul", ["t", "w2"], ["logits"]),
        ],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [time, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [time, 3])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_whole_samples_equal_separate_runs() -> None:
    """Arrays with one more axis than the input feed each slice whole; the trace is the per-sample mean."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=(6, 5))
    model = _sequence_model()
    traces, target, _ = api.fisher_traces(api.open_model(model, Dataset({"x": x}, labels)))
    assert traces.samples == 6 and target.class_axis == 1
    # Each sample alone, as a one-sample data set, gives the same per-sample value.
    for i in (0, 3):
        alone, _, _ = api.fisher_traces(api.open_model(model, Dataset({"x": x[i : i + 1]}, labels[i : i + 1])))
        np.testing.assert_allclose(alone.per_sample[0], traces.per_sample[i], rtol=1e-6)
    np.testing.assert_allclose(traces.trace(), traces.per_sample.mean(axis=0))


def test_whole_sample_labels_must_match_positions() -> None:
    x = np.zeros((3, 5, 4), np.float32)
    with pytest.raises(Exception, match=r"expected class-index labels of shape \[5\] per sample"):
        api.fisher_traces(api.open_model(_sequence_model(), Dataset({"x": x}, np.zeros((3, 4), np.int64))))


def test_wrong_rank_is_reported() -> None:
    x = np.zeros((3, 2, 5, 4), np.float32)
    with pytest.raises(Exception, match=r"expected input 'x' with 2 axes"):
        api.open_model(_sequence_model(), Dataset({"x": x}))
