"""The Monte-Carlo ("true") Fisher: its in-graph label sampling has the right expectation.

One input is repeated K times and scored with ``fisher="mc"``; the mean of the K per-sample values
must match the exact expectation computed in numpy from the Jacobian J_t = ∂z/∂t of the loss's
input (central differences of the numpy twin, see ``models.finite_differences``):

- categorical: Σ_positions Σ_c p_c ‖(p − e_c)ᵀ J‖²  (= E_{c~p} ‖∂(−log p_c)/∂t‖², positions independent)
- Bernoulli:   Σ_j p_j (1 − p_j) ‖J_j‖²             (z = the Sigmoid's input logits)
- Gaussian:    ‖J‖_F²                                (unit variance around the output)

within 4 standard errors of the MC mean (from the per-sample values). A guard per case checks
that K is large enough for the comparison to resolve a 10% error in the expectation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import fitonnx
from fitonnx.cli.main import cli
from fitonnx.fisher.engine import FisherTraces
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from tests.models import SmallModel, Tap, as64, embedding, finite_differences, mlp, regression, sigmoid, softmax

EPS = 1e-5  # see test_gradients: central differences in float64 are good to ~1e-9 here
K = 4000
SIGMAS = 4.0


@dataclass(frozen=True)
class Case:
    build: Callable[[], SmallModel]
    likelihood: str


CASES: dict[str, Case] = {
    "categorical-logits": Case(lambda: mlp(21, n_out=4), "categorical"),
    "categorical-softmax-output": Case(lambda: mlp(22, n_out=5, final="softmax"), "categorical"),
    "categorical-per-token": Case(lambda: embedding(23, reduce="none"), "categorical"),
    "bernoulli-sigmoid-output": Case(lambda: mlp(24, n_out=3, final="sigmoid"), "bernoulli"),
    "gaussian-regression": Case(lambda: regression(25), "gaussian"),
}


def one_input(model: SmallModel, seed: int) -> np.ndarray:
    """A single sample (batch of one) for the model's input."""
    rng = np.random.default_rng(seed)
    if model.proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64:
        return rng.integers(0, model.params["E"].shape[0], (1, *model.sample_shape)).astype(np.int64)
    return rng.standard_normal((1, *model.sample_shape)).astype(np.float32)


def exact_expectation(model: SmallModel, likelihood: str, x: np.ndarray) -> dict[str, float]:
    """E over the model's own predictive distribution of ‖∂ℓ/∂t‖², per quantizable tensor."""
    feed = {model.input_name: x}
    z = model.forward(as64(model.params), as64(feed), Tap())
    jac = finite_differences(model, feed, lambda out: out, EPS)
    result: dict[str, float] = {}
    for name, j in jac.items():
        if likelihood == "categorical":
            classes = z.shape[model.class_axis]
            # positions × classes × numel, and positions × classes
            jq = np.moveaxis(j.reshape(*z.shape, -1), model.class_axis, -2).reshape(-1, classes, j.size // z.size)
            p = softmax(np.moveaxis(z, model.class_axis, -1).reshape(-1, classes))
            total = 0.0
            for q in range(p.shape[0]):
                for c in range(classes):
                    g = (p[q] - np.eye(classes)[c]) @ jq[q]  # ∂(−log p_c)/∂t at position q
                    total += p[q, c] * float(g @ g)
            result[name] = total
        elif likelihood == "bernoulli":
            p = sigmoid(z).reshape(-1)
            rows = j.reshape(z.size, -1)
            result[name] = float(np.sum(p * (1 - p) * np.sum(rows**2, axis=1)))
        else:
            result[name] = float(np.sum(j**2))
    return result


def mc_traces(model: SmallModel, x: np.ndarray, n: int, seed: int, likelihood: str | None = None) -> FisherTraces:
    """``fisher="mc"`` traces of ``x`` repeated ``n`` times (no labels)."""
    data = Dataset(arrays={model.input_name: np.repeat(x, n, axis=0)}, source="repeated")
    session = fitonnx.open_model(model.proto, data)
    traces, _, mode = fitonnx.fisher_traces(
        session, options=FisherOptions(fisher="mc", likelihood=likelihood, seed=seed)
    )
    assert mode.value == "mc"
    return traces


@pytest.mark.parametrize("case_id", list(CASES))
def test_mc_mean_matches_exact_expectation(case_id: str) -> None:
    case = CASES[case_id]
    model = case.build()
    x = one_input(model, seed=1)
    likelihood = "gaussian" if case.likelihood == "gaussian" else None  # no labels: say it's real-valued
    traces = mc_traces(model, x, K, seed=0, likelihood=likelihood)
    assert traces.samples == K
    exact = exact_expectation(model, case.likelihood, x)
    assert set(exact) == {t.name for t in traces.tensors}
    for j, t in enumerate(traces.tensors):
        values = traces.per_sample[:, j]
        mean, se = values.mean(), values.std(ddof=1) / np.sqrt(K)
        assert SIGMAS * se < 0.1 * exact[t.name], f"guard: K={K} cannot resolve a 10% error for {t.name}"
        assert abs(mean - exact[t.name]) < SIGMAS * se, (
            f"{t.name}: MC mean {mean:.6g} vs exact {exact[t.name]:.6g} ({(mean - exact[t.name]) / se:+.1f} SE)"
        )


def test_categorical_mc_is_not_the_argmax_label() -> None:
    """Power check: always taking the most likely class (no sampling) lies far outside 4 SE."""
    model = CASES["categorical-logits"].build()
    x = one_input(model, seed=1)
    traces = mc_traces(model, x, K, seed=0)
    feed = {model.input_name: x}
    z = model.forward(as64(model.params), as64(feed), Tap())
    p = softmax(z)[0]
    jac = finite_differences(model, feed, lambda out: out, EPS)
    for j, t in enumerate(traces.tensors):
        g = (p - np.eye(p.size)[np.argmax(p)]) @ jac[t.name].reshape(p.size, -1)
        values = traces.per_sample[:, j]
        se = values.std(ddof=1) / np.sqrt(K)
        assert abs(values.mean() - float(g @ g)) > 10 * se


@pytest.mark.parametrize("case_id", ["categorical-logits", "bernoulli-sigmoid-output", "gaussian-regression"])
def test_seed_reproducible(case_id: str) -> None:
    case = CASES[case_id]
    model = case.build()
    x = one_input(model, seed=2)
    likelihood = "gaussian" if case.likelihood == "gaussian" else None
    a = mc_traces(model, x, 64, seed=3, likelihood=likelihood)
    b = mc_traces(model, x, 64, seed=3, likelihood=likelihood)
    c = mc_traces(model, x, 64, seed=4, likelihood=likelihood)
    assert np.array_equal(a.per_sample, b.per_sample)
    assert not np.array_equal(a.per_sample, c.per_sample)


def test_cli_seed_reproducible(tmp_path: Path) -> None:
    """``fitonnx score --fisher mc --seed S`` gives the same report for the same S, another for another S."""
    model = CASES["categorical-logits"].build()
    onnx.save(model.proto, tmp_path / "m.onnx")
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, *model.sample_shape)).astype(np.float32))

    def traces(seed: int, name: str) -> dict[str, float]:
        out = tmp_path / name
        args = ["score", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--fisher", "mc"]
        result = CliRunner().invoke(cli, [*args, "--seed", str(seed), "--json", str(out)])
        assert result.exit_code == 0, result.output
        return {t["name"]: t["ef_trace"] for t in json.loads(out.read_text())["tensors"]}

    first, again, other = traces(7, "a.json"), traces(7, "b.json"), traces(8, "c.json")
    assert first == again
    assert first != other
