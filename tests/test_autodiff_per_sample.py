"""Per-sample squared weight-gradient norms from one batch-4 pass against ‖gradient‖² of each sample
run alone (batch 1) through ``build_gradient_graph``: float32 both ways, different summation
orders, so equal to float32 rounding (RTOL = 1e-4 relative per sample)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx.errors import UnsupportedError
from fitonnx.fisher.autodiff import build_gradient_graph, per_sample_sqnorms
from fitonnx.fisher.autodiff.per_sample import sample_grad_name, sample_grad_problem
from tests.test_autodiff_harness import session
from tests.test_autodiff_models import small_classifier

RTOL = 1e-4
n = helper.make_node


def _model(nodes: list[onnx.NodeProto], x_dims: list, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_dims])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def sequence_model(t: int, k: int, m: int) -> onnx.ModelProto:
    """x[N, t, k] @ w[k, m] → Tanh → Σ(· ⊙ c) with c [t, m] fixed: a loss summed over samples."""
    rng = np.random.default_rng(t)
    nodes = [
        n("MatMul", ["x", "w"], ["h"]),
        n("Tanh", ["h"], ["a"]),
        n("Mul", ["a", "c"], ["ac"]),
        n("ReduceSum", ["ac"], ["loss"], keepdims=0),
    ]
    return _model(nodes, [t, k], {"w": rng.normal(size=(k, m)), "c": rng.normal(size=(t, m))})


def grouped_conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [
        n("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 1], pads=[1, 0, 1, 1], dilations=[1, 2]),
        n("Tanh", ["y"], ["a"]),
        n("ReduceSum", ["a"], ["loss"], keepdims=0),
    ]
    return _model(nodes, [4, 7, 6], {"w": rng.normal(size=(6, 2, 3, 2)), "b": rng.normal(size=6)})


def _check(model: onnx.ModelProto, weights: list[str], feed: dict[str, np.ndarray]) -> None:
    norms = session(per_sample_sqnorms(model, "loss", weights)).run([f"{w}_sqnorm" for w in weights], feed)
    single = session(build_gradient_graph(model, "loss", weights))
    batch = len(next(iter(feed.values())))
    for i in range(batch):
        grads = single.run([f"{w}_grad" for w in weights], {k: v[i : i + 1] for k, v in feed.items()})
        for w, norm, grad in zip(weights, norms, grads, strict=True):
            want = float(np.sum(np.asarray(grad, np.float64) ** 2))
            assert norm.shape == (batch,)
            assert abs(norm[i] - want) <= RTOL * want, (w, i, norm[i], want)


def test_conv_and_gemm_weights_of_a_classifier() -> None:
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(size=(4, 2, 9, 9)).astype(np.float32), "labels": rng.integers(0, 3, 4)}
    _check(small_classifier(), ["cw", "cb", "fw", "fb"], feed)


@pytest.mark.parametrize(("t", "k", "m"), [(3, 4, 5), (6, 2, 3)], ids=["ghost", "direct"])
def test_matmul_on_sequences(t: int, k: int, m: int) -> None:
    feed = {"x": np.random.default_rng(1).normal(size=(4, t, k)).astype(np.float32)}
    _check(sequence_model(t, k, m), ["w"], feed)


def test_grouped_strided_dilated_conv() -> None:
    feed = {"x": np.random.default_rng(2).normal(size=(4, 4, 7, 6)).astype(np.float32)}
    _check(grouped_conv_model(), ["w", "b"], feed)


def test_embedding_with_repeated_tokens() -> None:
    """Gather rows of a [7, 3] table by token ids [N, 5] (repeats within a sample), then Tanh · c."""
    rng = np.random.default_rng(4)
    nodes = [
        n("Gather", ["table", "x"], ["e"], axis=0),
        n("Tanh", ["e"], ["a"]),
        n("Mul", ["a", "c"], ["ac"]),
        n("ReduceSum", ["ac"], ["loss"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "emb",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [
            numpy_helper.from_array(rng.normal(size=s).astype(np.float32), k)
            for k, s in (("table", (7, 3)), ("c", (5, 3)))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    tokens = np.array([[1, 1, 3, 6, 1], [0, 2, 2, 5, 4], [6, 6, 6, 6, 6], [3, 4, 5, 0, 1]], np.int64)
    _check(model, ["table"], {"x": tokens})


def test_other_readers_are_refused() -> None:
    with pytest.raises(UnsupportedError, match="MatMul/Gemm/Conv"):
        per_sample_sqnorms(sequence_model(3, 4, 5), "loss", ["c"])


def test_grouped_conv_with_a_static_batch() -> None:
    """A static batch size takes the grouped-Conv form (one group per sample and conv group)."""
    model = grouped_conv_model()
    static = onnx.ModelProto()
    static.CopyFrom(model)
    dims = static.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = 4
    grouped = per_sample_sqnorms(static, "loss", ["w", "b"], batch=4)
    assert "MatMul" not in {node.op_type for node in grouped.graph.node}  # not the unfolded form
    x = np.random.default_rng(5).normal(size=(4, 4, 7, 6)).astype(np.float32)
    norms = session(grouped).run(["w_sqnorm", "b_sqnorm"], {"x": x})
    single = session(build_gradient_graph(model, "loss", ["w", "b"]))
    for i in range(4):
        for norm, grad in zip(norms, single.run(["w_grad", "b_grad"], {"x": x[i : i + 1]}), strict=True):
            want = float(np.sum(np.asarray(grad, np.float64) ** 2))
            assert abs(norm[i] - want) <= 1e-6 * want


def _static(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """``model`` with its inputs' batch axis fixed to ``batch`` (per-sample gradients need static shapes)."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in static.graph.input:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return static


def _check_sample_grads(model: onnx.ModelProto, weights: list[str], feed: dict[str, np.ndarray]) -> None:
    """Each weight's per-sample gradients from one batched pass equal the batch-1 graph's gradient
    of each sample run alone (float32 both ways, other summation orders)."""
    batch = len(next(iter(feed.values())))
    built = per_sample_sqnorms(_static(model, batch), "loss", weights, batch=batch, sample_grads=weights)
    together = session(built).run([sample_grad_name(w) for w in weights], feed)
    single = session(build_gradient_graph(model, "loss", weights))
    for i in range(batch):
        alone = single.run([f"{w}_grad" for w in weights], {k: v[i : i + 1] for k, v in feed.items()})
        for w, many, one in zip(weights, together, alone, strict=True):
            assert many.shape == (batch, *one.shape), w
            np.testing.assert_allclose(many[i], one, rtol=RTOL, atol=RTOL * float(np.abs(one).max()), err_msg=w)


def test_per_sample_gradients_of_a_classifiers_conv_and_gemm() -> None:
    """A 3×3 stride-2 padded Conv with bias, a Gemm with transB and bias (the patch and outer forms)."""
    rng = np.random.default_rng(6)
    feed = {"x": rng.normal(size=(4, 2, 9, 9)).astype(np.float32), "labels": rng.integers(0, 3, 4)}
    _check_sample_grads(small_classifier(), ["cw", "cb", "fw", "fb"], feed)


def test_per_sample_gradients_of_a_pointwise_conv_a_plain_gemm_and_a_matmul() -> None:
    """1×1 Conv (the input is its own patches), Gemm with alpha/beta and B [K, M], MatMul on sequences."""
    rng = np.random.default_rng(7)
    nodes = [
        n("Conv", ["x", "pw"], ["p"]),
        n("Tanh", ["p"], ["t"]),
        n("Reshape", ["t", "rows"], ["r"]),
        n("MatMul", ["r", "mw"], ["m"]),
        n("Reshape", ["m", "flat"], ["f"]),
        n("Gemm", ["f", "gw", "gb"], ["y"], alpha=0.5, beta=2.0),
        n("Tanh", ["y"], ["a"]),
        n("ReduceSum", ["a"], ["loss"], keepdims=0),
    ]
    inits = {"pw": rng.normal(size=(3, 2, 1, 1)), "mw": rng.normal(size=(3, 4)), "gw": rng.normal(size=(60, 2)) * 0.1}
    model = _model(nodes, [2, 5, 3], inits | {"gb": rng.normal(size=(1, 2))})
    model.graph.initializer.extend(
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("rows", [0, 15, 3]), ("flat", [0, 60]))]
    )
    feed = {"x": rng.normal(size=(3, 2, 5, 3)).astype(np.float32)}
    _check_sample_grads(model, ["pw", "mw", "gw", "gb"], feed)


def test_weights_without_batched_per_sample_gradients_are_named() -> None:
    assert "'w'" in (sample_grad_problem(grouped_conv_model(), ["w"]) or "")
    assert sample_grad_problem(grouped_conv_model(), ["b"]) is None  # a grouped Conv's bias is fine
    assert sample_grad_problem(small_classifier(), ["cw", "cb", "fw", "fb"]) is None
