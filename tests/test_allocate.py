"""The bit allocator against exhaustive enumeration, and the targets' noise models against numpy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fitonnx.allocate.knapsack import (
    Budget,
    BudgetKind,
    Item,
    budget_from,
    pareto_front,
    pick,
    weight_bytes,
)
from fitonnx.allocate.targets import TARGETS, Scheme, get_target
from fitonnx.errors import FitonnxError
from fitonnx.model.graph import Kind


def random_items(rng: np.random.Generator, n: int, bits: tuple[int, ...], ties: bool = False) -> list[Item]:
    items = []
    for i in range(n):
        numel = int(rng.choice([3, 5, 6, 10])) if ties else int(rng.integers(1, 50))
        if ties:  # small integer FITs: many configurations share a FIT and a size
            fit = sorted(rng.integers(0, 4, len(bits)).astype(float).tolist(), reverse=True)
        else:
            trace, width = 10 ** rng.uniform(-2, 2), rng.uniform(0.1, 3)
            fit = [trace * (width / (2**b - 1)) ** 2 / 12 for b in bits]
        items.append(Item(f"t{i}", numel, bits, tuple(fit)))
    return items


def enumerate_all(items: list[Item]) -> list[tuple[int, float, dict[str, int]]]:
    """Every configuration: (Σ numel·bits, Σ FIT, bits)."""
    out = []
    for choice in itertools.product(*[range(len(it.bits)) for it in items]):
        size = sum(it.numel * it.bits[c] for it, c in zip(items, choice, strict=True))
        fit = math.fsum(it.fit[c] for it, c in zip(items, choice, strict=True))
        out.append((size, fit, {it.name: it.bits[c] for it, c in zip(items, choice, strict=True)}))
    return out


def check_config(items: list[Item], config: dict[str, int], size: int, fit: float) -> None:
    """A configuration's stated size and FIT, recomputed from the items."""
    by_name = {it.name: it for it in items}
    assert set(config) == set(by_name)
    assert sum(by_name[n].numel * b for n, b in config.items()) == size
    assert math.fsum(by_name[n].fit[by_name[n].bits.index(b)] for n, b in config.items()) == pytest.approx(fit)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_exact_front_equals_brute_force(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    bits = (2, 3, 4, 8) if seed % 2 else (4, 8, 16)
    items = random_items(rng, int(rng.integers(2, 6)), bits, ties=ties)
    every = enumerate_all(items)
    front = pareto_front(items)
    # The true front: for each size in increasing order, keep it if its best FIT beats all smaller sizes.
    best: dict[int, float] = {}
    for size, fit, _ in every:
        best[size] = min(best.get(size, math.inf), fit)
    expected, running = [], math.inf
    for size in sorted(best):
        if best[size] < running:
            expected.append((size, best[size]))
            running = best[size]
    assert front.sizes.tolist() == [s for s, _ in expected]
    assert front.fits.tolist() == pytest.approx([f for _, f in expected], rel=1e-12, abs=1e-12)
    for i in range(len(front)):
        check_config(items, front.config(i), int(front.sizes[i]), float(front.fits[i]))
    configs = front.configs(np.arange(len(front)))
    for i, row in enumerate(configs):
        assert dict(zip([it.name for it in front.items], row.tolist(), strict=True)) == front.config(i)
    # Every budget between the extremes: the pick is the brute-force optimum, and within the budget.
    total = sum(it.numel for it in items)
    for avg in np.arange(min(bits), max(bits) + 0.25, 0.25):
        budget = Budget(BudgetKind.AVG_BITS, float(avg))
        limit = budget.max_bits(total)
        optimum = min(f for s, f, _ in every if s <= limit)
        chosen = pick(front, budget)
        assert chosen.size_bits <= limit
        assert chosen.fit == pytest.approx(optimum, rel=1e-12, abs=1e-12)
        check_config(items, dict(chosen.bits), chosen.size_bits, chosen.fit)
    # FIT budgets: the smallest size whose FIT stays within it.
    distinct = sorted({f for _, f, _ in every})
    midpoints = [(a + b) / 2 for a, b in itertools.pairwise(distinct)]  # away from rounding ties
    for max_fit in midpoints[:: max(1, len(midpoints) // 20)]:
        smallest = min(s for s, f, _ in every if f <= max_fit)
        chosen = pick(front, Budget(BudgetKind.MAX_FIT, max_fit))
        assert chosen.size_bits == smallest and chosen.fit <= max_fit


@pytest.mark.parametrize("seed", range(4))
def test_tolerance_keeps_fit_within_bound(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    items = random_items(rng, 7, (2, 3, 4, 5, 6, 8))
    exact = pareto_front(items)
    eps = 0.05
    approx = pareto_front(items, tolerance=eps)
    assert len(approx) <= len(exact)
    total = sum(it.numel for it in items)
    for avg in np.linspace(2, 8, 49):
        budget = Budget(BudgetKind.AVG_BITS, round(float(avg), 3))
        limit = budget.max_bits(total)
        opt = float(exact.fits[exact.best_within(limit)])
        got = pick(approx, budget)
        assert got.size_bits <= limit
        assert opt <= got.fit <= (1 + eps) * opt + 1e-15
        check_config(items, dict(got.bits), got.size_bits, got.fit)


def test_merge_order_does_not_change_the_front() -> None:
    rng = np.random.default_rng(7)
    items = random_items(rng, 5, (2, 4, 8))
    a, b = pareto_front(items), pareto_front(items[::-1])
    assert a.sizes.tolist() == b.sizes.tolist()
    assert a.fits.tolist() == pytest.approx(b.fits.tolist(), rel=1e-12)


def test_infeasible_budgets_say_the_least_feasible() -> None:
    items = [Item("a", 1000, (4, 8), (1.0, 0.1)), Item("b", 24, (4, 8), (2.0, 0.2))]
    front = pareto_front(items)
    with pytest.raises(FitonnxError, match=r"expected an average of at least 4 bits .* found 3\.5"):
        pick(front, Budget(BudgetKind.AVG_BITS, 3.5))
    # 1024 weights at 4 bits = 512 bytes = 0.5 KB.
    with pytest.raises(FitonnxError, match=r"expected a budget of at least 0\.5 KB .* found 0\.4 KB"):
        pick(front, Budget(BudgetKind.SIZE_KB, 0.4))
    with pytest.raises(FitonnxError, match=r"expected --max-fit of at least 0\.3 .* found 0\.29"):
        pick(front, Budget(BudgetKind.MAX_FIT, 0.29))
    # The FIT spent on activations counts against a FIT budget.
    with pytest.raises(FitonnxError, match=r"at least 0\.4"):
        pick(front, Budget(BudgetKind.MAX_FIT, 0.35), fit_offset=0.1)
    assert pick(front, Budget(BudgetKind.SIZE_KB, 0.5)).bits == {"a": 4, "b": 4}
    assert pick(front, Budget(BudgetKind.AVG_BITS, 100)).bits == {"a": 8, "b": 8}


def test_budget_bounds_are_exact_decimals() -> None:
    # 3.3 · 10 = 33 exactly, although 3.3 * 10 in binary floating point is 32.999999999999996.
    assert Budget(BudgetKind.AVG_BITS, 3.3).max_bits(10) == 33
    assert Budget(BudgetKind.SIZE_KB, 1.5).max_bits(0) == 1.5 * 1024 * 8
    assert weight_bytes(9) == 2 and weight_bytes(16) == 2 and weight_bytes(0) == 0
    assert budget_from(avg_bits=4).kind is BudgetKind.AVG_BITS
    with pytest.raises(FitonnxError, match=r"exactly one budget .* found --avg-bits, --max-fit"):
        budget_from(avg_bits=4, max_fit=1.0)
    with pytest.raises(FitonnxError, match="found none"):
        budget_from()
    with pytest.raises(FitonnxError, match="positive --size-kb"):
        budget_from(size_kb=-1)


def test_ties_pick_a_valid_optimum_deterministically() -> None:
    items = [Item("a", 4, (2, 4), (1.0, 0.0)), Item("b", 4, (2, 4), (1.0, 0.0))]
    front = pareto_front(items)
    assert front.sizes.tolist() == [16, 24, 32] and front.fits.tolist() == [2.0, 1.0, 0.0]
    first = pick(front, Budget(BudgetKind.AVG_BITS, 3)).bits
    assert sorted(first.values()) == [2, 4]
    assert pick(pareto_front(items), Budget(BudgetKind.AVG_BITS, 3)).bits == first


def test_targets_noise_models_match_numpy() -> None:
    generic, trt = get_target("generic"), get_target("tensorrt")
    lo, hi, trace = -0.3, 0.9, 2.5
    # Asymmetric: (max − min)/(2^b − 1).
    assert generic.fit(Kind.WEIGHT, trace, lo, hi, 4) == pytest.approx(trace * (1.2 / 15) ** 2 / 12, rel=1e-14)
    # Symmetric narrow range: max|x| / (2^(b−1) − 1).
    assert trt.step(Kind.WEIGHT, lo, hi, 8) == pytest.approx(0.9 / 127)
    # Float16: the spacing of float16 numbers at the largest magnitude, as numpy sees it.
    assert trt.step(Kind.WEIGHT, lo, hi, 16) == float(np.spacing(np.float16(0.9)))
    assert trt.step(Kind.WEIGHT, -5.0, 3.0, 16) == float(np.spacing(np.float16(5.0)))
    # The symmetric grid really has that step: fake-quantize and look at the gaps.
    x = np.linspace(lo, hi, 1001)
    step = trt.step(Kind.WEIGHT, lo, hi, 4)
    levels = np.unique(np.round(x / step) * step)
    assert np.allclose(np.diff(levels), step)
    assert trt.finn_datatype(Kind.ACTIVATION, 8, 0.0) == "INT8"
    assert generic.finn_datatype(Kind.ACTIVATION, 8, 0.0) == "UINT8"
    assert generic.finn_datatype(Kind.WEIGHT, 4, -0.1) == "INT4"
    assert trt.finn_datatype(Kind.WEIGHT, 16, -0.1) == "FLOAT16"
    for t in TARGETS.values():
        assert t.default_activation_bits in t.activation_bits
        assert all(b in t.weight_bits for b in t.float_bits)
        assert isinstance(t.weight_scheme, Scheme)
    with pytest.raises(FitonnxError, match="expected a target among"):
        get_target("tpu")
