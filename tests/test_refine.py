"""Refining a recommendation by measurement (``fitonnx.analysis.refine``): the neighbours against a
brute-force enumeration, the measurement against a numpy forward pass on the calibration data."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fitonnx import api
from fitonnx.allocate.knapsack import AllocationOptions, Item, Objective, budget_from, pareto_front
from fitonnx.analysis.harness import SimulationOptions, harness
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.refine import measurer, neighbours, refine
from fitonnx.analysis.simulate import Config
from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError
from fitonnx.model.data import Dataset

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "mnist_cnn.onnx"


def _items(rng: np.random.Generator) -> list[Item]:
    bits = (2, 3, 4, 8)
    out = []
    for k in range(5):
        fit = np.sort(rng.uniform(0, 1, len(bits)))[::-1] * rng.uniform(0.1, 10)
        out.append(Item(f"t{k}", int(rng.integers(5, 60)), bits, tuple(float(f) for f in fit)))
    return out


@pytest.mark.parametrize("moves", [1, 2])
def test_neighbours_are_the_best_predicted_within_moves_and_budget(moves: int) -> None:
    rng = np.random.default_rng(3)
    items = _items(rng)
    total = sum(it.numel for it in items)
    max_size = int(3.5 * total)
    front = pareto_front(items)
    start = front.config(front.best_within(max_size))
    got = neighbours(items, start, max_size, 12, moves=moves)
    # Brute force: every assignment, kept when it changes 1..moves tensors and fits the budget.
    want = []
    for combo in itertools.product(*(range(len(it.bits)) for it in items)):
        a = {it.name: it.bits[j] for it, j in zip(items, combo, strict=True)}
        changed = sum(a[n] != start[n] for n in a)
        size = sum(it.numel * a[it.name] for it in items)
        if 1 <= changed <= moves and size <= max_size:
            want.append(sum(it.fit[it.bits.index(a[it.name])] for it in items))
    want.sort()
    assert got[0][0] == start
    assert [f for _, f in got[1:]] == pytest.approx(want[:11], rel=1e-12)
    for a, f in got:
        assert sum(it.numel * a[it.name] for it in items) <= max_size
        assert f == pytest.approx(sum(it.fit[it.bits.index(a[it.name])] for it in items), rel=1e-12)
        assert f >= got[0][1] - 1e-12  # the knapsack's answer is the predicted best within the budget


def test_refine_keeps_the_least_measured_and_the_predictors_order_on_ties() -> None:
    cands = [({"a": 4}, 1.0), ({"a": 3}, 2.0), ({"a": 5}, 3.0), ({"a": 2}, 4.0)]
    measured = {4: 0.3, 3: 0.1, 5: 0.1, 2: 0.5}
    r = refine(cands, lambda a: measured[a["a"]])
    assert r.chosen == 1 and r.best == {"a": 3} and r.simulations == 4 and r.measured == (0.3, 0.1, 0.1, 0.5)
    with pytest.raises(FitonnxError):
        refine([], lambda a: np.zeros(1))
    with pytest.raises(FitonnxError):
        neighbours(_items(np.random.default_rng(0)), {"t0": 2}, 10**6, 3, moves=3)


def test_refine_moves_only_on_a_significant_paired_improvement() -> None:
    """Per-sample KL: candidate 1 is lower on average but within the noise of the paired difference,
    candidate 2 lower by far more than two standard errors of it: z = 2 keeps 2, z = 0 keeps 1."""
    rng = np.random.default_rng(1)
    base = rng.gamma(2.0, 0.01, 400)
    e = rng.normal(0, 0.05, 400)
    noisy = base + (e - e.mean()) - 0.003  # mean difference −0.003, standard error ≈ 0.05/20
    better = base * 0.9  # −10% on every sample: mean difference ≈ −0.002
    samples = {4: base, 3: noisy, 5: better}
    cands = [({"a": 4}, 1.0), ({"a": 3}, 2.0), ({"a": 5}, 3.0)]
    d = noisy - base
    assert d.mean() + 2 * d.std(ddof=1) / 20 > 0 > d.mean() and noisy.mean() < better.mean()  # the premise
    assert refine(cands, lambda a: samples[a["a"]], z=2.0).chosen == 2
    assert refine(cands, lambda a: samples[a["a"]], z=0.0).chosen == 1
    assert refine(cands[:2], lambda a: samples[a["a"]], z=2.0).chosen == 0


def test_measurer_simulates_on_the_data_it_is_given() -> None:
    """The KL the refinement measures on calibration samples equals a numpy forward pass's."""
    from tests.test_validate import log_softmax, np_forward, np_quant, small_mlp

    model, p = small_mlp()
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    rng = np.random.default_rng(7)
    x = rng.normal(size=(70, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 70).astype(np.int64)
    calib, held = Dataset({"x": x[:30]}, labels[:30], "c"), Dataset({"x": x[30:]}, labels[30:], "h")
    h = harness(model, calib, held, simulation=SimulationOptions(weight_bits=(2, 3, 8), weights_only=True))
    m = measurer(h.simulator, calib, h.target)
    ref = log_softmax(np_forward(p64, x[:30])["z"])
    for a in ({"w1": 2, "w2": 3}, {"w1": 8, "w2": 2}):
        pq = dict(p64) | {w: np_quant(p64[w], p64[w].min(), p64[w].max(), b) for w, b in a.items()}
        lq = log_softmax(np_forward(pq, x[:30])["z"])
        want = float(np.mean(np.sum(np.exp(ref) * (ref - lq), axis=1)))
        assert m.kl(a) == pytest.approx(want, rel=1e-4)
        assert h.measure(Config(a, {})).kl != pytest.approx(want, rel=1e-2)  # the held-out samples differ


def test_recommend_refine_keeps_the_least_calibration_kl_within_the_budget(tmp_path: Path) -> None:
    """``recommend(refine=4)`` on the bundled CNN: four candidates within the budget, the one kept no
    worse than FIT's answer on the calibration data, each measurement equal to validate's harness simulating the same
    configuration on the calibration samples (activations at the chosen 8 bits)."""
    calib = MODELS / "mnist_cnn.calib.npz"
    result = api.recommend(CNN, calib, budget=budget_from(avg_bits=3.5), choices=AllocationOptions(refine=4))
    r, rec = result.refinement, result.allocation.recommendation
    assert r is not None and r.simulations == 4 and rec.budget["refine"] == 4.0
    assert dict(rec.weight_bits) == r.best and r.measured[r.chosen] <= r.measured[0]
    numel = {t.name: t.numel for t in result.report.tensors}
    for a in r.candidates:
        assert sum(numel[w] * b for w, b in a.items()) <= 3.5 * sum(numel[w] for w in a)
    assert rec.fit == pytest.approx(
        sum(rec.fit_per_tensor[w][b] for w, b in {**rec.weight_bits, **rec.activation_bits}.items()), rel=1e-9
    )
    h = harness(
        CNN, calib, calib, simulation=SimulationOptions(weight_bits=(2, 3, 4, 5, 6, 7, 8), activation_bits=(8,))
    )
    acts = {name: 8 for name in h.activations}
    for a, kl in zip(r.candidates, r.measured, strict=True):
        assert kl == pytest.approx(h.measure(Config(a, acts)).kl, rel=1e-6)


def test_refine_refuses_formats_and_float_widths_before_any_work() -> None:
    runner = CliRunner()
    for extra in (["--formats"], ["--target", "tensorrt"]):
        out = runner.invoke(
            cli, ["recommend", str(CNN), "--avg-bits", "6", "--refine", "3", "-o", "/nonexistent/x", *extra]
        )
        assert out.exit_code == 2 and "--refine" in out.output and "Traceback" not in out.output, out.output


def test_output_space_objective_is_the_knapsack_optimum_of_validates_output_space_table() -> None:
    """``objective=output_space``: the weights' widths minimise, within the budget, the sum of the
    output-space scores validate's harness computes for the same grids and calibration samples
    (checked by enumerating every assignment)."""
    calib, widths = MODELS / "mnist_cnn.calib.npz", (2, 4, 8)
    opts = AllocationOptions(weight_bits=widths, objective=Objective.OUTPUT_SPACE)
    rec = api.recommend(CNN, calib, budget=budget_from(avg_bits=4.0), choices=opts).allocation.recommendation
    assert rec.budget["output_space_objective"] == 1.0
    h = harness(CNN, calib, simulation=SimulationOptions(weight_bits=widths, weights_only=True))
    table = h.tables.values[Predictor.OUTPUT_SPACE]
    numel = {w: int(h.simulator.sim.weights[w].size) for w in h.weights}
    best, best_score = None, np.inf
    for combo in itertools.product(widths, repeat=len(h.weights)):
        a = dict(zip(h.weights, combo, strict=True))
        if sum(numel[w] * b for w, b in a.items()) <= 4.0 * sum(numel.values()):
            score = sum(table[h.tables.names.index(w), h.tables.bits.index(b)] for w, b in a.items())
            best, best_score = (a, score) if score < best_score else (best, best_score)
    assert dict(rec.weight_bits) == best


def test_neighbours_of_a_large_model_pair_only_the_most_promising_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_NEIGHBOURS two-tensor moves the pairs are drawn from a subset: still valid
    candidates within the budget, sorted, the start first."""
    from fitonnx.analysis import refine as refine_mod

    rng = np.random.default_rng(4)
    items = [*_items(rng), *_items(rng)]
    items = [Item(f"u{k}", it.numel, it.bits, it.fit) for k, it in enumerate(items)]
    total = sum(it.numel for it in items)
    front = pareto_front(items)
    start = front.config(front.best_within(int(4 * total)))
    monkeypatch.setattr(refine_mod, "MAX_NEIGHBOURS", 200)  # 10 tensors, 4 widths: 800 pairs
    got = neighbours(items, start, int(4 * total), 10)
    assert got[0][0] == start and len(got) == 10
    assert [f for _, f in got] == sorted(f for _, f in got)
    for a, _ in got[1:]:
        assert 1 <= sum(a[n] != start[n] for n in a) <= 2
        assert sum(it.numel * a[it.name] for it in items) <= 4 * total


def test_progress_of_an_output_space_refinement_never_passes_its_total() -> None:
    """Each bar's count stays within its total (the output-space pass's bar read 257/256: the
    measuring bar was started before that pass and advanced after it)."""
    bars: list[list] = []

    class Record:
        def start(self, total: int, label: str) -> None:
            bars.append([label, total, 0])

        def advance(self, n: int = 1) -> None:
            bars[-1][2] += n

    opts = AllocationOptions(weight_bits=(2, 4, 8), objective=Objective.OUTPUT_SPACE, refine=2)
    api.recommend(
        CNN, MODELS / "mnist_cnn.calib.npz", budget=budget_from(avg_bits=4.0), choices=opts, progress=Record()
    )
    assert all(done <= total for _, total, done in bars), bars
    assert any(label.startswith("Measuring") and done == total for label, total, done in bars), bars
