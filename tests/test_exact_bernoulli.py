"""``--fisher exact`` on a Bernoulli output holding one probability per sample: labels 0 and 1
weighted by 1 − p and p, checked against closed forms in numpy (no finite differences needed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.errors import UnsupportedError
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset

RNG = np.random.default_rng(3)
X = RNG.normal(size=(6, 3)).astype(np.float32)


def _model(w: np.ndarray, tail: list[onnx.NodeProto], out: str, width: int) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), *tail],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _exact(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], str]:
    traces, _, mode = api.fisher_traces(api.open_model(model, Dataset({"x": X})), FisherOptions(fisher="exact"))
    names = [t.name for t in traces.tensors]
    return {n: traces.per_sample[:, names.index(n)] for n in ("w", "x")}, mode.value


def test_sigmoid_logit_exact_fisher_is_p_one_minus_p_times_the_squared_jacobian() -> None:
    w = RNG.normal(size=(3, 1)).astype(np.float32)
    got, mode = _exact(_model(w, [helper.make_node("Sigmoid", ["z"], ["p"])], "p", 1))
    x, w64 = X.astype(np.float64), w.astype(np.float64)
    p = 1 / (1 + np.exp(-(x @ w64)[:, 0]))
    # z = x·w: ∂z/∂w = x, ∂z/∂x = w; E_y ‖(p − y)·∂z‖² = p(1 − p)·‖∂z‖².
    assert mode == "exact"
    np.testing.assert_allclose(got["w"], p * (1 - p) * np.sum(x**2, axis=1), rtol=1e-5)
    np.testing.assert_allclose(got["x"], p * (1 - p) * np.sum(w64**2), rtol=1e-5)


def test_mean_of_sigmoids_exact_fisher_is_the_squared_gradient_of_p_over_its_variance() -> None:
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    tail = [
        helper.make_node("Sigmoid", ["z"], ["s"]),
        helper.make_node("ReduceMean", ["s"], ["p"], axes=[1], keepdims=1),
    ]
    got, _ = _exact(_model(w, tail, "p", 1))
    x, w64 = X.astype(np.float64), w.astype(np.float64)
    s = 1 / (1 + np.exp(-(x @ w64)))
    p = s.mean(axis=1)
    # BCE on p: E_y ‖∂ℓ_y‖² = ‖∂p‖²·(1/p + 1/(1 − p)); ∂p/∂w[k, j] = x_k·s_j(1 − s_j)/4.
    ds = s * (1 - s) / 4
    grad_w = np.einsum("ik,ij->ikj", x, ds)
    grad_x = ds @ w64.T
    var = p * (1 - p)
    np.testing.assert_allclose(got["w"], np.sum(grad_w**2, axis=(1, 2)) / var, rtol=1e-4)
    np.testing.assert_allclose(got["x"], np.sum(grad_x**2, axis=1) / var, rtol=1e-4)


def test_exact_fisher_refuses_several_bernoulli_probabilities_per_sample() -> None:
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    model = _model(w, [helper.make_node("Sigmoid", ["z"], ["p"])], "p", 4)
    with pytest.raises(UnsupportedError, match="one probability per sample"):
        _exact(model)


def test_exact_fisher_refuses_a_real_valued_output() -> None:
    w = RNG.normal(size=(3, 2)).astype(np.float32)
    session = api.open_model(_model(w, [], "z", 2), Dataset({"x": X}))
    with pytest.raises(UnsupportedError, match="categorical or Bernoulli"):
        api.fisher_traces(session, FisherOptions(fisher="exact", likelihood="gaussian"))
