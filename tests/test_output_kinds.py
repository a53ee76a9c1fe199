"""Which output defines the loss and how it is read: label outputs skipped, Sigmoid seen through
reshapes, Bernoulli on probabilities (checked against numpy finite differences)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.errors import ModelError
from fitonnx.fisher import losses
from fitonnx.fisher.options import FisherOptions
from fitonnx.model import graph
from fitonnx.model.data import Dataset


def _model(tail: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto], w: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), *tail]
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        outputs,
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1], np.int64), "flat")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


W = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)


def _target(model: onnx.ModelProto, likelihood: losses.Likelihood | None = None) -> losses.OutputTarget:
    return losses.resolve_output(model, graph.output_ranks(model), None, likelihood, None)


def test_integer_label_output_is_skipped() -> None:
    model = _model(
        [helper.make_node("ArgMax", ["z"], ["label"], axis=1), helper.make_node("Softmax", ["z"], ["probs"], axis=1)],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch", 1]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4]),
        ],
        W,
    )
    target = _target(model)
    assert target.output == "probs" and target.tap == "z" and target.likelihood is losses.Likelihood.CATEGORICAL


def test_sigmoid_seen_through_reshape() -> None:
    model = _model(
        [helper.make_node("Sigmoid", ["z"], ["p"]), helper.make_node("Reshape", ["p", "flat"], ["out"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        W,
    )
    target = _target(model)
    assert target.tap == "z" and target.likelihood is losses.Likelihood.BERNOULLI and not target.probabilities


def test_bernoulli_on_probabilities_matches_finite_differences() -> None:
    """Output = mean of sigmoids (not itself a Sigmoid): BCE on the probability, labels in [0, 1]."""
    model = _model(
        [
            helper.make_node("Sigmoid", ["z"], ["s"]),
            helper.make_node("ReduceMean", ["s"], ["p"], axes=[1], keepdims=1),
        ],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])],
        W,
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=(5, 1)).astype(np.float32)
    session = api.open_model(model, Dataset({"x": x}, y))
    traces, target, _ = api.fisher_traces(session, options=FisherOptions(fisher="empirical", likelihood="bernoulli"))
    assert target.probabilities

    def loss(w: np.ndarray, i: int) -> float:
        p = (1 / (1 + np.exp(-(x[i].astype(np.float64) @ w)))).mean()
        return float(-(y[i, 0] * np.log(p) + (1 - y[i, 0]) * np.log(1 - p)))

    w64 = W.astype(np.float64)
    j = [t.name for t in traces.tensors].index("w")
    for i in range(5):
        grad = np.zeros_like(w64)
        for k in np.ndindex(w64.shape):
            e = np.zeros_like(w64)
            e[k] = 1e-6
            grad[k] = (loss(w64 + e, i) - loss(w64 - e, i)) / 2e-6
        np.testing.assert_allclose(traces.per_sample[i, j], np.sum(grad**2), rtol=1e-4)


def test_a_mean_of_sigmoids_is_read_as_probabilities() -> None:
    # silero-vad's speech probability is Unsqueeze(ReduceMean(Sigmoid(...))): no Sigmoid to tap, but
    # a probability all the same; read as a categorical over its one "class" it had a Fisher of 0.
    model = _model(
        [
            helper.make_node("Sigmoid", ["z"], ["s"]),
            helper.make_node("ReduceMean", ["s"], ["m"], axes=[1], keepdims=0),
            helper.make_node("Unsqueeze", ["m", "one"], ["p"]),
        ],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])],
        W,
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    target = _target(model)
    assert target.likelihood is losses.Likelihood.BERNOULLI and target.probabilities and target.tap == "p"
    x = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
    traces, _, _ = api.fisher_traces(api.open_model(model, Dataset({"x": x})), FisherOptions(fisher="mc"))
    assert traces.trace().sum() > 0


def test_one_class_is_not_a_categorical_output() -> None:
    # A [batch, 1] output that is not a probability: inferred as Gaussian, refused as categorical.
    model = _model(
        [helper.make_node("ReduceSum", ["z"], ["y"], axes=[1], keepdims=1)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        W,
    )
    model.graph.node[-1].CopyFrom(helper.make_node("ReduceSum", ["z", "axes"], ["y"], keepdims=1))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    assert _target(model).likelihood is losses.Likelihood.GAUSSIAN
    with pytest.raises(ModelError, match="expected at least 2 classes on axis 1 of 'y'; found 1"):
        _target(model, losses.Likelihood.CATEGORICAL)


def _softmax_model(opset: int, axis: int, hide_rank: bool) -> onnx.ModelProto:
    """x [N, T, 3] ─MatMul(w)─► z [N, T, 4] ─Softmax(axis)─► probs. ``hide_rank`` routes z through
    Reshape(z, Shape(z)), whose rank shape inference cannot see, so onnx.version_converter writes an
    opset-12 Softmax as Reshape(Softmax(Flatten(z, axis)), Shape(z))."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z0" if hide_rank else "z"])]
    if hide_rank:
        nodes += [helper.make_node("Shape", ["z0"], ["s"]), helper.make_node("Reshape", ["z0", "s"], ["z"])]
    nodes.append(helper.make_node("Softmax", ["z"], ["probs"], axis=axis))
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "time", 4])],
        [numpy_helper.from_array(W, "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_an_opset_12_softmax_converted_without_shapes_still_reads_logits() -> None:
    # paddle2onnx's PP-OCR recognizer: an opset-12 Softmax(axis=2) whose input rank the converter
    # cannot see became Reshape(Softmax(Flatten(z, 2)), Shape(z)); read as logits, the probabilities
    # made every trace and KL meaningless. The traces must equal those of the opset-13 model.
    rng = np.random.default_rng(6)
    data = Dataset({"x": rng.normal(size=(5, 2, 3)).astype(np.float32)}, rng.integers(0, 4, size=(5, 2)))
    old = api.open_model(_softmax_model(12, 2, hide_rank=True), data)
    assert any(n.op_type == "Flatten" for n in old.prepared.model.graph.node)  # the converter's form
    new = api.open_model(_softmax_model(13, -1, hide_rank=False), data)
    got, target, _ = api.fisher_traces(old, FisherOptions(fisher="empirical"))
    want, _, _ = api.fisher_traces(new, FisherOptions(fisher="empirical"))
    assert target.class_axis == 2 and target.tap != "probs"
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
    np.testing.assert_allclose(got.per_sample, want.per_sample, rtol=1e-5)


def test_a_softmax_behind_an_identity_still_reads_logits() -> None:
    # skl2onnx's MLPClassifier: Softmax -> Identity -> "probabilities". Read as logits, the
    # probabilities gave wrong traces; they must equal those of the same model without the Identity.
    rng = np.random.default_rng(8)
    data = Dataset({"x": rng.normal(size=(6, 3)).astype(np.float32)}, rng.integers(0, 4, size=6))
    out = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])]
    direct = _model([helper.make_node("Softmax", ["z"], ["probs"], axis=1)], out, W)
    behind = _model(
        [helper.make_node("Softmax", ["z"], ["p"], axis=1), helper.make_node("Identity", ["p"], ["probs"])], out, W
    )
    target = _target(behind)
    assert target.tap == "z" and target.class_axis == 1
    got, _, _ = api.fisher_traces(api.open_model(behind, data), FisherOptions(fisher="empirical"))
    want, _, _ = api.fisher_traces(api.open_model(direct, data), FisherOptions(fisher="empirical"))
    np.testing.assert_allclose(got.per_sample, want.per_sample, rtol=1e-6)


def test_probabilities_computed_by_hand_are_read_as_probabilities() -> None:
    # Exp(z) / ReduceSum(Exp(z)): a softmax with no Softmax op. Read as logits its traces were those
    # of softmax(p); read as probabilities (log p) they must equal the Softmax model's.
    rng = np.random.default_rng(9)
    data = Dataset({"x": rng.normal(size=(6, 3)).astype(np.float32)}, rng.integers(0, 4, size=6))
    out = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])]
    direct = _model([helper.make_node("Softmax", ["z"], ["probs"], axis=1)], out, W)
    by_hand = _model(
        [
            helper.make_node("Exp", ["z"], ["e"]),
            helper.make_node("ReduceSum", ["e", "axis"], ["total"], keepdims=1),
            helper.make_node("Div", ["e", "total"], ["probs"]),
        ],
        out,
        W,
    )
    by_hand.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    for fisher in ("empirical", "exact"):
        got, target, _ = api.fisher_traces(api.open_model(by_hand, data), FisherOptions(fisher=fisher))
        want, _, _ = api.fisher_traces(api.open_model(direct, data), FisherOptions(fisher=fisher))
        assert target.probabilities and target.tap == "probs"
        np.testing.assert_allclose(got.per_sample, want.per_sample, rtol=1e-4)
    report = api.score(by_hand, data)
    assert any("read as class probabilities" in note for note in report.notes)
    # Real logits (rows not summing to 1) stay logits.
    logits = _model([], [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])], W)
    _, target, _ = api.fisher_traces(api.open_model(logits, data), FisherOptions(fisher="empirical"))
    assert not target.probabilities
