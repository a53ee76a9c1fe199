"""Refining a recommendation by measurement (``fitonnx.analysis.refine``): the neighbours against a
brute-force enumeration, the measurement against a numpy forward pass on the calibration data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fitonnx.allocate.knapsack import Item, pareto_front
from fitonnx.analysis.harness import SimulationOptions, harness
from fitonnx.analysis.refine import measurer, neighbours, refine
from fitonnx.analysis.simulate import Config
from fitonnx.errors import FitonnxError
from fitonnx.model.data import Dataset


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
        refine([], lambda a: 0.0)
    with pytest.raises(FitonnxError):
        neighbours(_items(np.random.default_rng(0)), {"t0": 2}, 10**6, 3, moves=3)


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
