"""Finite-difference checks of fitonnx.fisher.autodiff gradients, shared by the autodiff tests (no tests here).

A case is a graph (nodes, inputs, initializers) whose outputs are contracted with fixed random
cotangents into the scalar loss Σ_o Σ(o ⊙ c_o), so every output element matters. The reference
is the central difference of that loss, evaluated by onnxruntime on the forward model with the
differentiated initializers turned into inputs; the gradient is fitonnx's backward graph, also
run by onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from fitonnx.fisher.autodiff import build_gradient_graph


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _info(name: str, value: np.ndarray, symbolic: bool) -> onnx.ValueInfoProto:
    dims = [f"{name}_d{k}" for k in range(value.ndim)] if symbolic else list(value.shape)
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), dims)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    inits: Mapping[str, np.ndarray] | None = None,
    opset: int = 17,
    symbolic: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """The graph plus the loss head ``loss`` = Σ_o ReduceSum(o ⊙ c_o) (c_o random, fixed)."""
    inits = dict(inits or {})
    graph_inputs = [_info(k, v, symbolic) for k, v in inputs.items()]
    probe_graph = helper.make_graph(
        list(nodes),
        "probe",
        graph_inputs,
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    probe = helper.make_model(probe_graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    values = session(probe).run(list(outputs), dict(inputs))
    rng = np.random.default_rng(seed)
    head, sums = [], []
    for o, value in zip(outputs, values, strict=True):
        c = numpy_helper.from_array(rng.normal(size=value.shape).astype(value.dtype), f"cot_{o}")
        inits[c.name] = numpy_helper.to_array(c)
        head += [
            helper.make_node("Mul", [o, c.name], [f"w_{o}"]),
            helper.make_node("ReduceSum", [f"w_{o}"], [f"s_{o}"], keepdims=0),
        ]
        sums.append(f"s_{o}")
    head.append(helper.make_node("Sum", sums, ["loss"]))
    dtype = helper.np_dtype_to_tensor_dtype(values[0].dtype)
    graph = helper.make_graph(
        [*nodes, *head],
        "case",
        graph_inputs,
        [helper.make_tensor_value_info("loss", dtype, [])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def analytic(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], wrt: Sequence[str]) -> dict[str, np.ndarray]:
    grad_model = build_gradient_graph(model, "loss", wrt)
    values = session(grad_model).run([f"{w}_grad" for w in wrt], dict(feed))
    return dict(zip(wrt, values, strict=True))


def numeric(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], wrt: Sequence[str], eps: float
) -> dict[str, np.ndarray]:
    """Central differences of ``loss`` for every element of every ``wrt`` tensor."""
    fd = onnx.ModelProto()
    fd.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in fd.graph.initializer}
    moved = [w for w in wrt if w in inits]
    kept = [t for t in fd.graph.initializer if t.name not in moved]
    del fd.graph.initializer[:]
    fd.graph.initializer.extend(kept)
    for w in moved:
        fd.graph.input.append(_info(w, inits[w], False))
    sess = session(fd)
    base = {**dict(feed), **{w: inits[w] for w in moved}}
    result = {}
    for w in wrt:
        x = np.array(base[w], copy=True)
        grad = np.zeros(x.shape, np.float64)
        for idx in np.ndindex(x.shape):
            values = []
            for sign in (1, -1):
                shifted = x.copy()
                shifted[idx] = x[idx] + sign * eps
                values.append(float(sess.run(["loss"], {**base, w: shifted})[0]))
            grad[idx] = (values[0] - values[1]) / (2 * eps)
        result[w] = grad
    return result


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(want))), 1e-12)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want))) / scale


def check(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], wrt: Sequence[str], eps: float, tol: float
) -> dict[str, float]:
    got, want = analytic(model, feed, wrt), numeric(model, feed, wrt, eps)
    errors = {w: relative_error(got[w], want[w]) for w in wrt}
    for w in wrt:
        assert got[w].shape == want[w].shape, (w, got[w].shape, want[w].shape)
        assert np.max(np.abs(want[w])) > 0 or np.max(np.abs(got[w])) == 0, f"{w}: zero reference"
    bad = {w: e for w, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors
