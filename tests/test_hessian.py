"""HAWQ's Hutchinson Hessian trace (``analysis.hessian``), checked against a numpy Hessian.

The reference Hessian of the mean cross-entropy is taken by second-order central differences of the
float64 numpy twin of an onnx.helper MLP (tests/models.py), independent of fitonnx's gradient graph.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fitonnx.analysis import hessian
from fitonnx.analysis.hessian import HessianOptions, hessian_traces
from fitonnx.fisher import session as api
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from tests.models import SmallModel, Tap, as64, categorical_loss, mlp

N = 6
SEED = 3


def _setup(labels: bool = True):
    model = mlp(0, n_in=3, hidden=4, n_out=3, final="softmax")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, 3)).astype(np.float32)
    y = rng.integers(0, 3, N).astype(np.int64)
    s = api.open_model(model.proto, Dataset({"x": x}, y if labels else None))
    _, target, _ = api.gradient_model(s, FisherOptions(fisher="empirical" if labels else "mc"))
    return model, s, target, x, y


def _flat_loss(model: SmallModel, x: np.ndarray, y: np.ndarray):
    """The mean cross-entropy as a function of the weights flattened in ``model.weights`` order."""
    shapes = [model.params[w].shape for w in model.weights]
    sizes = [int(np.prod(sh)) for sh in shapes]
    base = as64(model.params)

    def loss(flat: np.ndarray) -> float:
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        p = {**base, **{w: a.reshape(sh) for w, a, sh in zip(model.weights, parts, shapes, strict=True)}}
        return float(np.mean([categorical_loss(model.forward(p, {"x": x[i : i + 1]}, Tap()), y[i]) for i in range(N)]))

    flat = np.concatenate([base[w].ravel() for w in model.weights])
    return loss, flat, sizes


def _numpy_hessian(model: SmallModel, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """∂²L/∂w_j∂w_k by four-point central differences in float64 (h = 1e-4: error ~1e-8)."""
    loss, flat, sizes = _flat_loss(model, x, y)
    h, n = 1e-4, flat.size
    hess = np.zeros((n, n))
    eye = np.eye(n) * h
    for j in range(n):
        for k in range(j, n):
            a, b = eye[j], eye[k]
            v = loss(flat + a + b) - loss(flat + a - b) - loss(flat - a + b) + loss(flat - a - b)
            hess[j, k] = hess[k, j] = v / (4 * h * h)
    return hess, sizes


@pytest.fixture(scope="module")
def mlp_case():
    model, s, target, x, y = _setup()
    hess, sizes = _numpy_hessian(model, x, y)
    return model, s, target, x, y, hess, sizes


def _same_probes(
    model: SmallModel, hess: np.ndarray, sizes: list[int], probes: int, eps_scale: float, per_tensor: bool = False
) -> np.ndarray:
    """numpy's v_tᵀ(Hδ)_t/ε_t with the probes ``hessian.hutchinson`` draws (same seed and order);
    ``per_tensor``: δ holds only tensor t's block, v_tᵀH_tt v_t."""
    rng = np.random.default_rng(SEED)
    w = [model.params[n].astype(np.float64) for n in model.weights]
    eps = [eps_scale * float(np.sqrt(np.mean(a * a))) for a in w]
    bounds = np.cumsum([0, *sizes])
    out = np.zeros((probes, len(w)))
    for k in range(probes):
        v = [(rng.integers(0, 2, size=a.shape).astype(np.float64) * 2 - 1).ravel() for a in w]
        hd = hess @ np.concatenate([e * p for e, p in zip(eps, v, strict=True)])
        for t in range(len(w)):
            block = slice(bounds[t], bounds[t + 1])
            own = hess[block, block] @ (eps[t] * v[t])
            out[k, t] = float(v[t] @ (own if per_tensor else hd[block])) / eps[t]
    return out


def test_hutchinson_through_the_gradient_graph_is_numpy_hutchinson_with_the_same_probes(mlp_case) -> None:
    model, s, target, _, _, hess, sizes = mlp_case
    got = hessian_traces(s, target, FisherOptions(seed=SEED), HessianOptions(probes=6))
    assert got.names == model.weights and got.samples == N and got.passes == 2 * 6 * N
    want = _same_probes(model, hess, sizes, 6, hessian.EPS_SCALE)
    # Central differences of float32 gradients at ε = 1e-2·RMS(w): rounding ~1e-7·|g|/(ε·|Hv|)
    # ≈ 1e-5 relative, truncation O(ε²) ≈ 1e-4; the numpy Hessian's own error is ~1e-8. Measured:
    # 1.5e-4 of the largest estimate (6e-5 at ε = 1e-3·RMS, 4e-4 at 1e-4·RMS, 1.5e-2 at 1e-1·RMS).
    scale = np.abs(want).max()
    np.testing.assert_allclose(got.estimates, want, rtol=0, atol=5e-4 * scale)
    assert got.labels == "the data's labels"


def test_probes_restricted_to_one_tensor_read_its_own_block(mlp_case) -> None:
    model, s, target, _, _, hess, sizes = mlp_case
    got = hessian_traces(s, target, FisherOptions(seed=SEED), HessianOptions(probes=3, per_tensor=True))
    assert got.passes == 2 * 3 * N * 2
    want = _same_probes(model, hess, sizes, 3, hessian.EPS_SCALE, per_tensor=True)
    np.testing.assert_allclose(got.estimates, want, rtol=0, atol=5e-4 * np.abs(want).max())
    joint = _same_probes(model, hess, sizes, 3, hessian.EPS_SCALE)
    assert np.abs(joint - want).max() > 100 * 5e-4 * np.abs(want).max()  # the cross terms are not small here


def test_the_estimate_converges_to_each_tensors_exact_trace(mlp_case) -> None:
    _model, s, target, _, _, hess, sizes = mlp_case
    bounds = np.cumsum([0, *sizes])
    exact = np.array([np.trace(hess[a:b, a:b]) for a, b in itertools.pairwise(bounds)])
    got = hessian_traces(s, target, FisherOptions(seed=SEED), HessianOptions(probes=1200))
    # The estimator is unbiased: the mean over 1200 probes is within 4 standard errors of Tr(H_tt)
    # (a 6e-5 chance per tensor to fail for an unbiased estimate), and the standard error is small.
    assert np.all(np.abs(got.trace() - exact) < 4 * got.trace_se())
    assert np.all(got.trace_se() < 0.25 * np.abs(exact))
    # and precise enough to tell the two blocks apart (a swapped or mixed read would fail above).
    assert abs(exact[0] - exact[1]) > 6 * max(got.trace_se())


def test_without_labels_the_loss_is_taken_against_the_float_models_decisions() -> None:
    model, s, target, x, _ = _setup(labels=False)
    data, said = hessian.labelled(s, target)
    want = np.array([int(np.argmax(model.predict({"x": x[i : i + 1]}))) for i in range(N)])
    np.testing.assert_array_equal(data.labels.ravel(), want)
    assert said == "the float model's decisions"
    hess, sizes = _numpy_hessian(model, x, want)
    got = hessian_traces(s, target, FisherOptions(seed=SEED), HessianOptions(probes=3))
    np.testing.assert_allclose(got.estimates, _same_probes(model, hess, sizes, 3, hessian.EPS_SCALE), rtol=0, atol=5e-4)


def test_hawq_table_is_average_trace_times_measured_error_and_zero_for_activations() -> None:
    traces = hessian.HessianTraces(("w",), (4,), np.array([[2.0], [6.0]]), (0.1,), 3, 12, 0.0, "")
    weight_error = np.array([[0.5, np.nan, 0.25], [1.0, 2.0, np.nan]])
    got = hessian.table(traces, ["w", "act"], weight_error)
    np.testing.assert_array_equal(got, [[0.5, np.nan, 0.25], [0.0, 0.0, np.nan]])  # Tr/n = 4/4 = 1


def test_options_are_checked() -> None:
    from fitonnx.errors import FitonnxError

    with pytest.raises(FitonnxError, match="probe"):
        HessianOptions(probes=0)
    with pytest.raises(FitonnxError, match="step"):
        HessianOptions(eps_scale=0.0)
