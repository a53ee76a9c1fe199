"""The ``joint`` predictors (cross terms between tensors' errors), checked against numpy: the
linearised logit change computed by hand (forward mode through the MLP) and per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest

from fitonnx.analysis.harness import BaselineOptions, Extras, Harness, SimulationOptions, harness
from fitonnx.analysis.predictors import Predictor, Projections
from fitonnx.analysis.simulate import Config
from fitonnx.model.data import Dataset
from tests.test_validate import log_softmax, mlp_case, np_forward, np_gradients, np_quant, small_mlp  # noqa: F401

SIM = SimulationOptions(weight_bits=(3, 5, 8), activation_bits=(4, 6, 8))
CONFIGS = (
    Config({"w1": 3, "w2": 5}, {"x": 4, "r": 6}),
    Config({"w1": 8, "w2": 8}, {"x": 8, "r": 8}),
    Config({"w1": 3, "w2": 3}, {}),
    Config({"w2": 5}, {"r": 4}),
)


@pytest.fixture(scope="module")
def harnesses(mlp_case: tuple) -> tuple[Harness, Harness]:  # noqa: F811
    model, _, calib, held = mlp_case
    enumerated = harness(
        model,
        calib,
        held,
        simulation=SIM,
        baselines=BaselineOptions(extras=Extras(enumerate_outcomes=True, superpose=True)),
    )
    labels = harness(
        model,
        calib,
        held,
        simulation=SIM,
        baselines=BaselineOptions(extras=Extras(enumerate_outcomes=False)),
        session=enumerated.session,
    )
    return enumerated, labels


def _ranges(p64: dict[str, np.ndarray], x: np.ndarray) -> dict[str, tuple[float, float]]:
    f = np_forward(p64, x)
    out = {name: (float(f[name].min()), float(f[name].max())) for name in ("x", "r")}
    return out | {name: (float(p64[name].min()), float(p64[name].max())) for name in ("w1", "w2")}


def _errors(p64: dict, x: np.ndarray, config: Config) -> dict[str, np.ndarray]:
    """Each quantized tensor's rounding error (activations: per calibration sample)."""
    ranges, f = _ranges(p64, x), np_forward(p64, x)
    bits = {**config.weight_bits, **config.activation_bits}
    return {
        k: np_quant((p64 if k in p64 else f)[k], *ranges[k], b) - (p64 if k in p64 else f)[k] for k, b in bits.items()
    }


def _logit_shift(p64: dict, x: np.ndarray, e: dict[str, np.ndarray]) -> np.ndarray:
    """Δz = Σ_t J_t·e_t at the float point, by forward mode through x → MatMul w1 → Relu → Gemm w2."""
    f = np_forward(p64, x)
    on = f["h"] > 0
    dh = e.get("x", np.zeros_like(f["x"])) @ p64["w1"] + f["x"] @ e.get("w1", np.zeros_like(p64["w1"]))
    dr = dh * on + e.get("r", 0.0)
    return dr @ p64["w2"].T + f["r"] @ e.get("w2", np.zeros_like(p64["w2"])).T


def test_enumerated_joint_is_the_exact_second_order_and_the_moved_kl(
    mlp_case: tuple,  # noqa: F811
    harnesses: tuple[Harness, Harness],
) -> None:
    _, p64, calib, _ = mlp_case
    h, _ = harnesses
    assert isinstance(h.tables.projections, Projections) and h.tables.projections.enumerated
    x = calib.arrays["x"]
    logp = log_softmax(np_forward(p64, x)["z"])
    p = np.exp(logp)
    for c in CONFIGS:
        dz = _logit_shift(p64, x, _errors(p64, x, c))
        centred = dz - np.sum(p * dz, axis=1, keepdims=True)
        second = np.mean(np.sum(p * centred**2, axis=1))  # Δzᵀ(diag p − ppᵀ)Δz
        moved = np.mean(np.sum(p * (logp - log_softmax(logp + dz)), axis=1))
        assert h.tables.total(Predictor.JOINT, c) == pytest.approx(second, rel=1e-4)
        assert h.tables.total(Predictor.JOINT_KL, c) == pytest.approx(moved, rel=1e-4)


def test_joint_uniform_is_the_mean_squared_move_of_the_centred_logits(
    mlp_case: tuple,  # noqa: F811
    harnesses: tuple[Harness, Harness],
) -> None:
    _, p64, calib, _ = mlp_case
    h, labels = harnesses
    x = calib.arrays["x"]
    for c in CONFIGS:
        dz = _logit_shift(p64, x, _errors(p64, x, c))  # forward mode, numpy
        expected = np.mean(np.var(dz, axis=1))  # every sample and class weighted alike
        assert h.tables.total(Predictor.JOINT_UNIFORM, c) == pytest.approx(expected, rel=1e-4)
        # It differs from the Fisher-weighted form, and without enumerated outcomes falls back to it.
        assert abs(h.tables.total(Predictor.JOINT, c) / expected - 1) > 0.01
        assert labels.tables.total(Predictor.JOINT_UNIFORM, c) == labels.tables.total(Predictor.JOINT, c)
    one = Config({"w1": 3}, {})
    dz = _logit_shift(p64, x, _errors(p64, x, one))
    row = h.tables.names.index("w1")
    assert h.tables.values[Predictor.JOINT_UNIFORM][row, h.tables.bits.index(3)] == pytest.approx(
        np.mean(np.var(dz, axis=1)), rel=1e-4
    )


def test_joint_with_the_fisher_labels_is_the_whole_quadratic_form(
    mlp_case: tuple,  # noqa: F811
    harnesses: tuple[Harness, Harness],
) -> None:
    _, p64, calib, _ = mlp_case
    _, h = harnesses
    x = calib.arrays["x"]
    grads = np_gradients(p64, x, calib.labels)  # per-sample gradients of the true label's loss
    for c in CONFIGS:
        e = _errors(p64, x, c)
        dot = sum(
            np.sum(grads[k].reshape(len(x), -1) * (v.reshape(-1) if k in p64 else v.reshape(len(x), -1)), axis=1)
            for k, v in e.items()
        )
        assert h.tables.total(Predictor.JOINT, c) == pytest.approx(np.mean(dot**2), rel=1e-4)
        # Its diagonal is the additive ``quadratic``; the cross terms are not zero here.
        alone = sum(h.tables.total(Predictor.JOINT, Config({k: b}, {}) if k in p64 else Config({}, {k: b})) for k, b in
                    {**c.weight_bits, **c.activation_bits}.items())  # fmt: skip
        assert h.tables.total(Predictor.QUADRATIC, c) == pytest.approx(alone, rel=1e-4)
    assert abs(h.tables.total(Predictor.JOINT, CONFIGS[0]) / h.tables.total(Predictor.QUADRATIC, CONFIGS[0]) - 1) > 0.01


def test_joint_kl_is_twice_the_measured_kl_for_small_errors() -> None:
    # Finite differences: for a small error, 2·KL(p ‖ p moved by the error) → the quadratic form.
    model, p = small_mlp()
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    x = np.random.default_rng(3).normal(size=(24, 5)).astype(np.float32)
    data = Dataset({"x": x}, np_forward(p64, x)["z"].argmax(1).astype(np.int64), "calib")
    h = harness(
        model,
        data,
        data,
        simulation=SimulationOptions(weight_bits=(8,), activation_bits=(8,)),
        baselines=BaselineOptions(extras=Extras(enumerate_outcomes=True)),
    )
    c = Config({"w1": 8, "w2": 8}, {})
    pq = dict(p64) | {k: np_quant(p64[k], p64[k].min(), p64[k].max(), 8) for k in ("w1", "w2")}
    ref, moved = log_softmax(np_forward(p64, x)["z"]), log_softmax(np_forward(pq, x)["z"])
    kl = np.mean(np.sum(np.exp(ref) * (ref - moved), axis=1))
    assert h.tables.total(Predictor.JOINT, c) == pytest.approx(2 * kl, rel=0.05)
    assert h.tables.total(Predictor.JOINT_KL, c) == pytest.approx(kl, rel=0.05)


def _z(p64: dict, x: np.ndarray, states: dict[str, int | None]) -> np.ndarray:
    """The MLP's logits with each tensor at its bits (None: float), by numpy."""
    ranges = _ranges(p64, x)
    pq = p64 | {k: np_quant(p64[k], *ranges[k], b) for k, b in states.items() if k in p64 and b is not None}
    quant = {k: (lambda t, k=k, b=b: np_quant(t, *ranges[k], b)) for k, b in states.items() if k not in p64 and b}
    return np_forward(pq, x, quant)["z"]


def test_superposed_adds_each_tensors_measured_output_shift_from_the_base(
    mlp_case: tuple,  # noqa: F811
    harnesses: tuple[Harness, Harness],
) -> None:
    _, p64, calib, _ = mlp_case
    h, _ = harnesses
    x = calib.arrays["x"]
    ref = log_softmax(np_forward(p64, x)["z"])
    base = {k: 8 for k in ("w1", "w2", "x", "r")}  # the family's dearest uniform configuration
    z_base = _z(p64, x, base)
    for c in (*CONFIGS, Config({"w1": 3}, {})):
        bits = {**c.weight_bits, **c.activation_bits}
        z = z_base.copy()
        for k in base:  # each change from the base alone, measured (to float where c leaves k float)
            if bits.get(k) != 8:
                z += _z(p64, x, base | {k: bits.get(k)}) - z_base
        expected = np.mean(np.sum(np.exp(ref) * (ref - log_softmax(z)), axis=1))
        assert h.tables.total(Predictor.SUPERPOSED, c) == pytest.approx(expected, rel=1e-3)
    # The base itself: its measured KL on the calibration samples.
    kl = np.mean(np.sum(np.exp(ref) * (ref - log_softmax(z_base)), axis=1))
    assert h.tables.total(Predictor.SUPERPOSED, Config({"w1": 8, "w2": 8}, {"x": 8, "r": 8})) == pytest.approx(
        kl, rel=1e-3
    )
