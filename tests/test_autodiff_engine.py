"""The differentiation engine around the rules: blockers, unreached and shared tensors, integer
paths, opsets, and that the input model is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx.errors import UnsupportedError
from fitonnx.fisher.autodiff import build_gradient_graph, supported_ops
from fitonnx.fisher.autodiff.engine import infer_types
from fitonnx.prepare.support import GRADIENT_OPS
from tests.test_autodiff_harness import analytic, check, make_model, session

n = helper.make_node


def r(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def r32(*shape: int, seed: int = 0) -> np.ndarray:
    """Float32 where onnxruntime has no double kernel (Selu; MatMul after 1.19's fusion)."""
    return r(*shape, seed=seed).astype(np.float32)


def test_every_prepare_gradient_op_has_a_rule() -> None:
    assert supported_ops() >= GRADIENT_OPS
    assert "SoftmaxCrossEntropyLoss" in supported_ops()


def test_op_without_rule_is_named_before_any_session(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model([n("Selu", ["x"], ["h"], name="selu"), n("Relu", ["h"], ["y"])], {"x": r32(2, 3)}, ["y"])

    def no_session(*args: object, **kwargs: object) -> None:
        raise AssertionError("a session was created")

    monkeypatch.setattr(ort, "InferenceSession", no_session)
    with pytest.raises(UnsupportedError, match=r"Selu \(node 'selu'\)") as info:
        build_gradient_graph(model, "loss", ["x"])
    assert "\n" not in str(info.value)


def test_subgraph_reading_the_tensor_is_a_blocker() -> None:
    """x is read only inside the If's branch: the If is on the path, and has no rule."""

    def branch(name: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
        return helper.make_graph([n("Neg", ["x"], [f"{name}_y"])], name, [], [out])

    nodes = [n("If", ["flag"], ["y"], name="switch", then_branch=branch("then"), else_branch=branch("else"))]
    model = make_model(nodes, {"x": r32(2, 3)}, ["y"], inits={"flag": np.array(True)})
    with pytest.raises(UnsupportedError, match=r"If \(node 'switch'\)"):
        build_gradient_graph(model, "loss", ["x"])


def test_op_without_rule_off_the_path_is_fine() -> None:
    """Selu feeds only an output the loss does not read; ArgMax (integer) needs no rule either."""
    nodes = [
        n("Selu", ["x"], ["unused"]),
        n("ArgMax", ["x"], ["am"], axis=1, keepdims=0),
        n("Gather", ["x", "am"], ["y"], axis=1),
    ]
    model = make_model(nodes, {"x": r32(2, 3)}, ["y"])
    model.graph.output.append(helper.make_empty_tensor_value_info("unused"))
    check(model, {"x": r32(2, 3)}, ["x"], 1e-2, 2e-3)


def test_unreached_name_gets_zeros_of_its_shape() -> None:
    model = make_model([n("Mul", ["x", "x"], ["y"]), n("Neg", ["z"], ["other"])], {"x": r(2, 3), "z": r(4, 5)}, ["y"])
    model.graph.output.append(helper.make_empty_tensor_value_info("other"))
    got = analytic(model, {"x": r(2, 3), "z": r(4, 5)}, ["x", "z", "cot_y"])
    assert got["z"].shape == (4, 5) and not got["z"].any()
    np.testing.assert_allclose(got["cot_y"], r(2, 3) ** 2)


def test_shared_initializer_through_identity_sums() -> None:
    nodes = [
        n("MatMul", ["x", "w"], ["h"]),
        n("Identity", ["w"], ["w2"]),
        n("Tanh", ["h"], ["t"]),
        n("MatMul", ["t", "w2"], ["y"]),
    ]
    model = make_model(nodes, {"x": r32(2, 3)}, ["y"], inits={"w": r32(3, 3, seed=1)})
    check(model, {"x": r32(2, 3)}, ["w", "x"], 1e-2, 2e-3)


def test_tensor_read_twice_by_one_node_and_integer_paths() -> None:
    """Mul(x, x) reads x twice; Shape(x) → Reshape is an integer path with no gradient."""
    nodes = [n("Mul", ["x", "x"], ["sq"]), n("Shape", ["x"], ["s"]), n("Reshape", ["sq", "s"], ["y"])]
    check(make_model(nodes, {"x": r(2, 3)}, ["y"]), {"x": r(2, 3)}, ["x"], 1e-5, 1e-6)


def test_input_model_is_not_mutated_and_opset_kept() -> None:
    model = make_model([n("Tanh", ["x"], ["y"])], {"x": r(2, 3)}, ["y"], opset=17)
    before = model.SerializeToString()
    grad = build_gradient_graph(model, "loss", ["x"])
    assert model.SerializeToString() == before
    assert [o.version for o in grad.opset_import if o.domain == ""] == [17]
    assert {o.name for o in grad.graph.output} == {"loss", "x_grad"}
    assert all(node.domain == "" for node in grad.graph.node)
    onnx.checker.check_model(grad, full_check=True)


def test_old_opset_is_lifted_to_13() -> None:
    model = make_model([n("Squeeze", ["x"], ["y"], axes=[0])], {"x": r(1, 3)}, ["y"], opset=11)
    grad = build_gradient_graph(model, "loss", ["x"])
    assert [o.version for o in grad.opset_import if o.domain == ""] == [13]


def test_scatter_path_lifts_to_16() -> None:
    nodes = [n("Gather", ["x", "i"], ["y"], axis=0)]
    model = make_model(nodes, {"x": r(3, 2)}, ["y"], inits={"i": np.array([0, 0], np.int64)}, opset=13)
    grad = build_gradient_graph(model, "loss", ["x"])
    assert [o.version for o in grad.opset_import if o.domain == ""] == [16]


def test_matmul_of_unknown_ranks() -> None:
    """Operands whose rank shape inference cannot tell (Reshape to a shape fed at run time)."""
    nodes = [n("Reshape", ["a", "sa"], ["a2"]), n("Reshape", ["c", "sc"], ["c2"]), n("MatMul", ["a2", "c2"], ["y"])]
    feed = {
        "a": r(2, 3, 4).astype(np.float32),
        "c": r(2, 4, 5).astype(np.float32),
        "sa": np.array([2, 3, 4], np.int64),
        "sc": np.array([-1, 4, 5], np.int64),
    }
    model = make_model(nodes, feed, ["y"])
    for value in model.graph.input:
        if value.name in ("sa", "sc"):
            value.type.tensor_type.ClearField("shape")
    types = infer_types(model)
    assert types["a2"].shape is None and types["c2"].shape is None
    check(model, feed, ["a", "c"], 0.5, 1e-4)


def test_gradient_graph_is_batch_agnostic() -> None:
    """One graph built with a symbolic batch runs at batch 1 and 5."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    w = numpy_helper.from_array(r(3, 2).astype(np.float32), "w")
    nodes = [n("MatMul", ["x", "w"], ["h"]), n("ReduceMean", ["h"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sess = session(build_gradient_graph(model, "loss", ["w", "x"]))
    for batch in (1, 5):
        xs = r(batch, 3).astype(np.float32)
        gw, gx = sess.run(["w_grad", "x_grad"], {"x": xs})
        np.testing.assert_allclose(gw, np.repeat(xs.mean(0)[:, None], 2, 1) / 2, rtol=1e-5)
        assert gx.shape == (batch, 3)


def test_max_pool_ties_send_each_window_gradient_once() -> None:
    """A constant input ties every window: each window's gradient lands once, inside the window."""
    x = np.zeros((1, 1, 4, 4))
    model = make_model([n("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], {"x": x}, ["y"])
    got = analytic(model, {"x": x}, ["x", "cot_y"])
    cot = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["cot_y"]
    blocks = got["x"].reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(2, 2, 4)
    np.testing.assert_allclose(blocks.sum(-1), cot[0, 0])
    assert ((blocks != 0).sum(-1) == 1).all()
