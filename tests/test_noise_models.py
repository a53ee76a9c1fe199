"""The grid noise model and the exact true Fisher, checked against hand-written numpy gradients.

The model is a small MLP, x[N,5] ─MatMul w1─► h ─Relu─► r ─Gemm w2ᵀ + b2─► logits[N,3], whose
per-sample gradients are written out by hand below (independent of onnxruntime). Its data and
weights are built to hold many values exactly on 0, on the minimum and on the maximum: inputs
rounded to a coarse step and clipped to [−1, 1], ReLU zeros, a weight with planted zeros and a
repeated minimum and maximum.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import fitonnx
from fitonnx import api
from fitonnx.allocate.knapsack import AllocationOptions, budget_from
from fitonnx.analysis.harness import SimulationOptions
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.validate import SamplingOptions, validate
from fitonnx.cli.main import cli
from fitonnx.errors import UnsupportedError
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from fitonnx.score import noise
from tests.models import embedding, regression

CLASSES = 3


def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray], Dataset]:
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(5, 8)).astype(np.float32)
    w1[0, :3] = 0.0  # zeros inside the range: exact only where the grid has 0
    w1[1, 0] = w1[2, 1] = w1.min() - 0.5  # a repeated minimum
    w1[3, 2] = w1[4, 3] = w1.max() + 0.5  # a repeated maximum
    p = {
        "w1": w1,
        "w2": rng.normal(size=(CLASSES, 8)).astype(np.float32),
        "b2": rng.normal(size=CLASSES).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "grid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in p.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    x = np.clip(np.round(rng.normal(size=(48, 5)) * 2) / 2, -1.0, 1.0).astype(np.float32)  # 0, ±1 common
    labels = rng.integers(0, CLASSES, 48).astype(np.int64)
    return model, {k: v.astype(np.float64) for k, v in p.items()}, Dataset({"x": x}, labels, "grid")


def forward(p: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float64)
    h = x @ p["w1"]
    r = np.maximum(h, 0.0)
    z = r @ p["w2"].T + p["b2"]
    z = z - z.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return {"x": x, "h": h, "r": r, "p": prob}


def gradients(p: dict[str, np.ndarray], x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample gradients of −log p_label, [N, *tensor shape]."""
    f = forward(p, x)
    gz = f["p"].copy()
    gz[np.arange(len(x)), labels] -= 1.0
    gr = gz @ p["w2"]
    gh = gr * (f["h"] > 0)
    return {
        "w1": f["x"][:, :, None] * gh[:, None, :],
        "w2": gz[:, :, None] * f["r"][:, None, :],
        "x": gh @ p["w1"].T,
        "r": gr,
    }


def values(p: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """Each quantizable tensor's values per sample, [N, *shape] (weights repeated)."""
    f = forward(p, x)
    n = len(x)
    return {"w1": np.broadcast_to(p["w1"], (n, 5, 8)), "w2": np.broadcast_to(p["w2"], (n, CLASSES, 8))} | {
        a: f[a] for a in ("x", "r")
    }


def point_masses(grads: dict[str, np.ndarray], vals: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per sample Σ_j g_ij²·1[t_ij = v] for v = 0, the global min and the global max."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, g in grads.items():
        t = vals[name].reshape(len(g), -1)
        sq = g.reshape(len(g), -1) ** 2
        out[name] = {
            "zero": (sq * (t == 0)).sum(1),
            "at_min": (sq * (t == t.min())).sum(1),
            "at_max": (sq * (t == t.max())).sum(1),
        }
    return out


@pytest.fixture(scope="module")
def case() -> tuple[onnx.ModelProto, dict[str, np.ndarray], Dataset]:
    return build()


def test_point_traces_match_numpy(case: tuple) -> None:
    model, p, data = case
    s = fitonnx.open_model(model, data)
    traces, _, _ = fitonnx.fisher_traces(s, exact_points=True, options=FisherOptions(fisher="empirical"))
    assert traces.points is not None
    want = point_masses(gradients(p, data.arrays["x"], data.labels), values(p, data.arrays["x"]))
    checked = 0
    for j, t in enumerate(traces.tensors):
        for kind in ("zero", "at_min", "at_max"):
            got = getattr(traces.points, kind)[:, j]
            np.testing.assert_allclose(got, want[t.name][kind], rtol=1e-4, atol=1e-9, err_msg=f"{t.name} {kind}")
            checked += int(np.count_nonzero(want[t.name][kind]) > 0)
    # every statistic of every tensor is non-trivial here except w2's (no planted values) and r's minimum
    # (0: the same elements as its zeros), so the comparison cannot pass on zeros alone
    assert checked >= 8


def _grid_fit(trace: float, masses: dict[str, float], lo: float, hi: float, bits: int, symmetric: bool) -> float:
    """(Tr − Σ masses of the distinct values among 0, min, max that are grid levels)·Δ²/12, numpy."""
    if symmetric:
        m = max(abs(lo), abs(hi))
        start, step, levels = -m, m / (2 ** (bits - 1) - 1), 2**bits - 2
    else:  # integer zero point: the range widened to hold 0, and 0 a level
        step, levels = (max(hi, 0.0) - min(lo, 0.0)) / (2**bits - 1), 2**bits - 1
        start = round(min(lo, 0.0) / step) * step
    held, seen = 0.0, set()
    for v, kind in ((0.0, "zero"), (lo, "at_min"), (hi, "at_max")):
        k = np.clip(np.rint((v - start) / step), 0, levels)
        if v in seen or not lo <= v <= hi or abs(start + k * step - v) > 1e-9 * step:
            continue
        seen.add(v)
        held += masses[kind]
    return (trace - held) * step**2 / 12


def test_score_grid_noise_model_matches_numpy(case: tuple) -> None:
    model, p, data = case
    report = api.score(model, data, noise_model="grid", weight_bits=(3, 4), activation_bits=(3, 4))
    uniform = api.score(model, data, weight_bits=(3, 4), activation_bits=(3, 4))
    assert report.noise_model == "grid" and uniform.noise_model == "uniform"
    grads = gradients(p, data.arrays["x"], data.labels)
    vals = values(p, data.arrays["x"])
    masses = point_masses(grads, vals)
    for name, g in grads.items():
        trace = float((g.reshape(len(g), -1) ** 2).sum(1).mean())
        lo, hi = float(vals[name].min()), float(vals[name].max())
        mean_masses = {k: float(v.mean()) for k, v in masses[name].items()}
        row = report.tensor(name)
        for b in (3, 4):
            want = _grid_fit(trace, mean_masses, lo, hi, b, symmetric=False)
            assert row.fit[b] == pytest.approx(want, rel=1e-4), (name, b)
            assert uniform.tensor(name).fit[b] == pytest.approx(trace * ((hi - lo) / (2**b - 1)) ** 2 / 12, rel=1e-4)
    # The min/max grid keeps x's zeros (0 lies inside [−1, 1]) but not r's (0 is its minimum).
    assert report.tensor("x").fit[4] < 0.95 * uniform.tensor("x").fit[4]  # ±1 saturate
    assert report.tensor("r").fit[4] < 0.9 * uniform.tensor("r").fit[4]
    assert report.tensor("w2").fit[4] == pytest.approx(uniform.tensor("w2").fit[4], rel=0.2)


@pytest.mark.parametrize("symmetric", [False, True])
def test_validate_fit_grid_matches_numpy(case: tuple, symmetric: bool) -> None:
    model, p, data = case
    calib = Dataset({"x": data.arrays["x"][:32]}, data.labels[:32], "calib")
    held = Dataset({"x": data.arrays["x"][32:]}, data.labels[32:], "held")
    report = validate(
        model,
        calib,
        held,
        simulation=SimulationOptions(weight_bits=(3, 4), activation_bits=(3, 4), symmetric=symmetric),
        sampling=SamplingOptions(configs=4),
    )
    grads = gradients(p, calib.arrays["x"], calib.labels)
    vals = values(p, calib.arrays["x"])
    masses = point_masses(grads, vals)
    table = {}
    for name, g in grads.items():
        trace = float((g.reshape(len(g), -1) ** 2).sum(1).mean())
        lo, hi = float(vals[name].min()), float(vals[name].max())
        mean_masses = {k: float(v.mean()) for k, v in masses[name].items()}
        for b in (3, 4):
            table[(name, b)] = _grid_fit(trace, mean_masses, lo, hi, b, symmetric)
    for c in report.configs:
        want = sum(table[(k, b)] for k, b in {**c.weight_bits, **c.activation_bits}.items())
        assert c.predicted[Predictor.FIT_GRID] == pytest.approx(want, rel=1e-4)
        assert c.predicted[Predictor.FIT_GRID] < c.predicted[Predictor.FIT]


def test_represented_and_unperturbed() -> None:
    assert noise.represented(0.0, 0.0, 0.25, 4) and noise.represented(1.0, 0.0, 0.25, 4)
    assert not noise.represented(0.0, -0.3, 0.2, 7)  # levels −0.3, −0.1, 0.1, ...
    assert not noise.represented(2.0, 0.0, 0.25, 4)  # clipped to 1.0
    # 0 is the minimum here: its mass counts once; the maximum is a level too.
    assert noise.unperturbed(1.0, 1.0, 2.0, 0.0, 3.0, lambda v: True) == 3.0
    assert noise.unperturbed(1.0, 5.0, 2.0, -1.0, 3.0, lambda v: v != 0.0) == 7.0


# ---------------------------------------------------------------------------------------------
# The exact true Fisher
# ---------------------------------------------------------------------------------------------


def test_exact_fisher_matches_numpy(case: tuple) -> None:
    model, p, data = case
    s = fitonnx.open_model(model, data)
    traces, _, mode = fitonnx.fisher_traces(
        s, keep_gradients=True, exact_points=True, options=FisherOptions(fisher="exact")
    )
    assert mode.value == "exact"
    x = data.arrays["x"]
    prob = forward(p, x)["p"]
    per_class = [gradients(p, x, np.full(len(x), c)) for c in range(CLASSES)]
    vals = values(p, x)
    for j, t in enumerate(traces.tensors):
        sq = [g[t.name].reshape(len(x), -1) ** 2 for g in per_class]
        want = sum(prob[:, c] * sq[c].sum(1) for c in range(CLASSES))
        np.testing.assert_allclose(traces.per_sample[:, j], want, rtol=1e-4)
        diag = sum(prob[:, c, None] * sq[c] for c in range(CLASSES)).mean(0)
        assert traces.diag is not None and traces.points is not None
        np.testing.assert_allclose(traces.diag[t.name].reshape(-1), diag, rtol=1e-4, atol=1e-12)
        zero = sum(prob[:, c] * (sq[c] * (vals[t.name].reshape(len(x), -1) == 0)).sum(1) for c in range(CLASSES))
        np.testing.assert_allclose(traces.points.zero[:, j], zero, rtol=1e-4, atol=1e-12)
    # Not the empirical Fisher: the labels here are random, the exact Fisher never looks at them.
    emp, _, _ = fitonnx.fisher_traces(s, options=FisherOptions(fisher="empirical"))
    assert not np.allclose(emp.per_sample, traces.per_sample, rtol=0.05)


def test_exact_fisher_needs_one_categorical_distribution_per_sample() -> None:
    reg = regression(25)
    data = Dataset({reg.input_name: np.random.default_rng(0).normal(size=(4, *reg.sample_shape)).astype(np.float32)})
    s = fitonnx.open_model(reg.proto, data)
    with pytest.raises(UnsupportedError, match="expected a categorical or Bernoulli output for --fisher exact"):
        fitonnx.fisher_traces(s, options=FisherOptions(fisher="exact", likelihood="gaussian"))
    tok = embedding(23, reduce="none")
    tokens = np.random.default_rng(1).integers(0, tok.params["E"].shape[0], (4, *tok.sample_shape)).astype(np.int64)
    s = fitonnx.open_model(tok.proto, Dataset({tok.input_name: tokens}))
    with pytest.raises(UnsupportedError, match="expected one class distribution per sample for --fisher exact"):
        fitonnx.fisher_traces(s, options=FisherOptions(fisher="exact"))


def test_cli_score_noise_model_and_exact_fisher(case: tuple, tmp_path: Path) -> None:
    model, _, data = case
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=data.arrays["x"], labels=data.labels)
    reports = {}
    for extra in (["--noise-model", "grid", "--fisher", "exact"], ["--fisher", "exact"]):
        out = tmp_path / f"{len(extra)}.json"
        args = ["score", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), *extra, "--json", str(out)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        reports[extra[1]] = json.loads(out.read_text())
    assert "grid noise model" in CliRunner().invoke(cli, [*args[:-2], "--noise-model", "grid"]).stdout
    grid, uniform = reports["grid"], reports["exact"]
    assert grid["noise_model"] == "grid" and uniform["noise_model"] == "uniform" and grid["fisher"] == "exact"
    fit = {m: {t["name"]: t["fit"]["4"] for t in r["tensors"]} for m, r in reports.items()}
    assert fit["grid"]["r"] < fit["exact"]["r"]


def _on_levels(v: float, levels: np.ndarray) -> bool:
    return bool(np.min(np.abs(levels - v)) <= 1e-6 * (levels[1] - levels[0]))


@pytest.mark.parametrize("target", ["generic", "tensorrt"])
def test_recommend_grid_noise_uses_the_targets_own_grid(case: tuple, target: str) -> None:
    # generic: the same asymmetric zero-point grid as `score --noise-model grid`; tensorrt: symmetric
    # grids, where ±max|x| and 0 are levels but a min/max of smaller magnitude is not. Levels are
    # enumerated here, not tested by formula.
    model, p, data = case
    rec = api.recommend(
        model, data, budget=budget_from(avg_bits=4), choices=AllocationOptions(target=target), noise_model="grid"
    ).allocation.recommendation
    assert rec.noise_model == "grid"
    grads = gradients(p, data.arrays["x"], data.labels)
    vals = values(p, data.arrays["x"])
    masses = point_masses(grads, vals)
    scored = api.score(model, data, noise_model="grid", weight_bits=(4, 8), activation_bits=(8,))
    for name, per_bits in rec.fit_per_tensor.items():
        trace = float((grads[name].reshape(len(grads[name]), -1) ** 2).sum(1).mean())
        lo, hi = float(vals[name].min()), float(vals[name].max())
        mass = {k: float(v.mean()) for k, v in masses[name].items()}
        for b, got in per_bits.items():
            if b == 16 and target == "tensorrt":
                continue  # float16: not an integer grid
            if target == "tensorrt":
                m, half = max(abs(lo), abs(hi)), 2 ** (b - 1) - 1
                levels = np.arange(-half, half + 1) * (m / half)
            else:
                step = (max(hi, 0) - min(lo, 0)) / (2**b - 1)
                levels = (np.arange(2**b) - round(-min(lo, 0) / step)) * step
            held, seen = 0.0, set()
            for v, kind in ((0.0, "zero"), (lo, "at_min"), (hi, "at_max")):
                if v not in seen and lo <= v <= hi and _on_levels(v, levels):
                    seen.add(v)
                    held += mass[kind]
            step = levels[1] - levels[0]
            assert got == pytest.approx((trace - held) * step**2 / 12, rel=1e-4), (name, b)
            if target == "generic" and b in scored.tensor(name).fit:
                assert got == pytest.approx(scored.tensor(name).fit[b], rel=1e-6)
