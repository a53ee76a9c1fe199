"""AveragePool with count_include_pad and padding: its gradient used to kill the process (SIGFPE)
in onnxruntime-training when shapes were symbolic; with static input shapes it must build and be
right. Checked against central differences of the loss computed by plain inference."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.model.data import Dataset
from fitonnx.model.runtime import make_session


def _model(w: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "AveragePool", ["c"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1
        ),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "W2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "avgpool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(w.astype(np.float32), "W"),
            numpy_helper.from_array(w2.astype(np.float32), "W2"),
            numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_avgpool_count_include_pad_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    w, w2 = rng.normal(size=(4, 1, 3, 3)), rng.normal(size=(64, 3))
    x = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
    labels = np.array([0, 2])
    traces, _, _ = api.fisher_traces(api.open_model(_model(w, w2), Dataset({"x": x}, labels)))
    j = [t.name for t in traces.tensors].index("W")

    def loss(wv: np.ndarray, i: int) -> float:
        session = make_session(_model(wv, w2).SerializeToString())
        z = session.run(["logits"], {"x": x[i : i + 1]})[0][0].astype(np.float64)
        z -= z.max()
        return float(np.log(np.exp(z).sum()) - z[labels[i]])

    eps = 1e-2  # float32 inference: the step must dwarf rounding; the loss is smooth (no kinks)
    for i in range(2):
        grad = np.zeros_like(w)
        for k in np.ndindex(w.shape):
            e = np.zeros_like(w)
            e[k] = eps
            grad[k] = (loss(w + e, i) - loss(w - e, i)) / (2 * eps)
        np.testing.assert_allclose(traces.per_sample[i, j], np.sum(grad**2), rtol=1e-3)
