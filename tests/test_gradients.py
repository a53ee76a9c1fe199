"""fitonnx's per-sample squared gradient norms against central finite differences of numpy twins.

Each small model from ``models.py`` has a float64 numpy forward; the reference value for sample i
and tensor t is ‖∂ℓ_i/∂t‖² from central differences over every element of t (weights perturbed in
the numpy copy, activations perturbed inside the forward, so all consumers are included).

Step size: EPS = 1e-5 on float64 values of order 1. The central-difference truncation error is
about EPS²·|ℓ'''|/6 ≈ 1e-11 and the rounding error about 1e-16·|ℓ|/EPS ≈ 1e-11, so the reference is
good to ~1e-8 relative (steps 1e-4 and 1e-5 agree to ≤ 4.2e-8 where 1e-4 stays off kinks), far
below the float32 rounding of onnxruntime's gradients (measured max relative error 1.7e-6 over
these cases). RTOL = 1e-4 therefore tests fitonnx's float32 engine, not the reference. Relu and MaxPool models are piecewise
linear: ``finite_differences`` fails loudly if a step crosses a kink.

The pooling cases with symbolic batch or spatial dims guard a fix in ``instrument``: before it,
onnxruntime's AveragePoolGrad/MaxPoolGrad read symbolic dims as 0 and the process died (SIGFPE,
segfault).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

import fitonnx
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from tests.models import (
    SmallModel,
    Tap,
    bernoulli_loss,
    categorical_loss,
    cnn,
    embedding,
    finite_differences,
    gaussian_loss,
    mlp,
    regression,
    shared_activation,
    with_value_info,
)

EPS = 1e-5
RTOL = 1e-4
SAMPLES = 3


@dataclass(frozen=True)
class Case:
    """A model, how to draw its inputs and labels, and the per-sample loss fitonnx should use."""

    build: Callable[[], SmallModel]
    likelihood: str  # what fitonnx should infer
    labels: str  # "class", "real" or "binary"


CASES: dict[str, Case] = {
    "mlp-tanh-categorical": Case(lambda: mlp(1, act="tanh"), "categorical", "class"),
    "mlp-relu-categorical": Case(lambda: mlp(2, act="relu"), "categorical", "class"),
    "mlp-softmax-output": Case(lambda: mlp(3, act="relu", final="softmax"), "categorical", "class"),
    "mlp-sigmoid-bernoulli": Case(lambda: mlp(4, n_out=3, final="sigmoid"), "bernoulli", "binary"),
    "regression-gaussian": Case(lambda: regression(5), "gaussian", "real"),
    "cnn-tanh-avgpool": Case(lambda: cnn(6, act="tanh", pool="average"), "categorical", "class"),
    "cnn-relu-maxpool": Case(lambda: cnn(7, act="relu", pool="max"), "categorical", "class"),
    "cnn-avgpool-symbolic-hw": Case(lambda: cnn(14, pool="average", symbolic_hw=True), "categorical", "class"),
    "cnn-maxpool-symbolic-hw": Case(lambda: cnn(15, act="relu", pool="max", symbolic_hw=True), "categorical", "class"),
    "cnn-avgpool-value-info": Case(lambda: with_value_info(cnn(16, pool="average")), "categorical", "class"),
    "embedding-mean": Case(lambda: embedding(8, reduce="mean"), "categorical", "class"),
    "embedding-flatten": Case(lambda: embedding(9, reduce="flatten"), "categorical", "class"),
    "embedding-per-token": Case(lambda: embedding(10, reduce="none"), "categorical", "class"),
    "shared-activation": Case(lambda: shared_activation(11), "categorical", "class"),
    "shared-activation-tied-weight": Case(lambda: shared_activation(12, tied=True), "categorical", "class"),
}


def make_data(model: SmallModel, labels: str, n: int, seed: int) -> Dataset:
    """``n`` random samples for the model's single input, with labels of the requested kind."""
    rng = np.random.default_rng(seed)
    name = model.input_name
    if model.proto.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64:  # token ids, with repeats
        x = rng.integers(0, model.params["E"].shape[0], (n, *model.sample_shape)).astype(np.int64)
        x[:, -1] = x[:, 0]
    else:
        x = rng.standard_normal((n, *model.sample_shape)).astype(np.float32)
    out = np.stack([model.forward(model.params, {name: x[i : i + 1]}, Tap())[0] for i in range(n)])
    if labels == "class":
        shape = out.shape[: model.class_axis] + out.shape[model.class_axis + 1 :]
        y: np.ndarray = rng.integers(0, out.shape[model.class_axis], shape)
    elif labels == "binary":
        y = rng.integers(0, 2, out.shape).astype(np.float32)
    else:
        y = rng.standard_normal(out.shape).astype(np.float32)
    return Dataset(arrays={name: x}, labels=y, source="test")


def sample_loss(model: SmallModel, likelihood: str, label: np.ndarray) -> Callable[[np.ndarray], float]:
    """ℓ for one sample as a function of the tapped output (logits, or raw values for Gaussian)."""
    if likelihood == "categorical":
        return lambda z: categorical_loss(z, label[None], class_axis=model.class_axis)
    if likelihood == "bernoulli":
        return lambda z: bernoulli_loss(z, label[None].astype(np.float64))
    return lambda z: gaussian_loss(z, label[None].astype(np.float64))


def reference_grads(model: SmallModel, data: Dataset, likelihood: str) -> list[dict[str, np.ndarray]]:
    """Per-sample gradients of ℓ_i w.r.t. every quantizable tensor, by central differences."""
    name = next(iter(data.arrays))
    return [
        finite_differences(
            model,
            {name: data.arrays[name][i : i + 1]},
            sample_loss(model, likelihood, data.labels[i]),
            EPS,
        )
        for i in range(data.num_samples)
    ]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.abs(want)))


@pytest.mark.parametrize("case_id", list(CASES))
def test_per_sample_sqnorms_match_finite_differences(case_id: str) -> None:
    case = CASES[case_id]
    model = case.build()
    data = make_data(model, case.labels, SAMPLES, seed=100)
    session = fitonnx.open_model(model.proto, data)
    traces, target, mode = fitonnx.fisher_traces(session, options=FisherOptions(fisher="empirical"))
    assert mode.value == "empirical"
    assert target.likelihood.value == case.likelihood
    assert {(t.name, t.kind.value) for t in traces.tensors} == model.tensors

    grads = reference_grads(model, data, case.likelihood)
    want = np.array([[np.sum(g[t.name] ** 2) for t in traces.tensors] for g in grads])
    assert np.all(want > 0)
    got = traces.per_sample
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=f"max rel err {rel_err(got, want):.2e}")


def test_numpy_twins_compute_the_onnx_models() -> None:
    """The references are only worth something if each numpy twin is the ONNX model's function."""
    for case_id, case in CASES.items():
        model = case.build()
        data = make_data(model, case.labels, 4, seed=1)
        ((name, x),) = data.arrays.items()
        session = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {name: x})[0]
        want = np.concatenate([model.predict({name: x[i : i + 1]}) for i in range(len(x))])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=case_id)


def test_shared_activation_gradient_is_the_total_derivative() -> None:
    """h feeds two MatMuls and a residual Add: its norm must use the sum over all three paths.

    Also a check that the test can fail: the gradient through one MatMul only is far from it.
    """
    model = shared_activation(11)
    data = make_data(model, "class", SAMPLES, seed=7)
    traces, _, _ = fitonnx.fisher_traces(
        fitonnx.open_model(model.proto, data), options=FisherOptions(fisher="empirical")
    )
    col = [t.name for t in traces.tensors].index("h")
    for i, g in enumerate(reference_grads(model, data, "categorical")):
        g_r = g["r"][0]  # ∂ℓ/∂r, r = h·A + h·B + h
        total = g_r @ (model.params["A"] + model.params["B"]).T.astype(np.float64) + g_r
        np.testing.assert_allclose(g["h"][0], total, rtol=1e-7, atol=1e-10)  # the FD reference is the total
        one_path = g_r @ model.params["A"].T.astype(np.float64)
        assert abs(np.sum(one_path**2) / np.sum(total**2) - 1) > 0.1
        np.testing.assert_allclose(traces.per_sample[i, col], np.sum(total**2), rtol=RTOL)


def test_trace_is_mean_of_per_sample_norms_not_batch_gradient_squared() -> None:
    """Tr(F_t) = (1/N) Σ_i ‖g_i‖², never ‖Σ_i g_i‖²/N (the square of a batch gradient).

    Checked on the public report (``fitonnx.score``) against finite differences, with a guard
    that the two quantities differ here by far more than the tolerance, so the wrong one fails.
    """
    model = mlp(13, act="tanh")
    n = 8
    data = make_data(model, "class", n, seed=3)
    report = fitonnx.score(model.proto, data, options=FisherOptions(fisher="empirical"))
    assert report.samples == n
    grads = reference_grads(model, data, "categorical")
    for name in model.weights + model.activations:
        per_sample = np.array([np.sum(g[name] ** 2) for g in grads])
        trace = report.tensor(name).ef_trace
        np.testing.assert_allclose(trace, per_sample.mean(), rtol=RTOL)
        np.testing.assert_allclose(report.tensor(name).ef_trace_se, per_sample.std(ddof=1) / np.sqrt(n), rtol=RTOL)
        if name in model.weights:
            batch = np.sum(np.sum([g[name] for g in grads], axis=0) ** 2) / n
            assert abs(batch / per_sample.mean() - 1) > 0.2, "guard: the buggy estimate must be distinguishable"
            assert abs(trace / batch - 1) > 0.2
