"""Recommendation quality against an exhaustive oracle, for models with few weight tensors.

Every per-tensor assignment of candidate widths to the weights whose average bits per weight
(weighted by element count) is within a budget is simulated; the oracle is the one with the least
measured KL. A predictor's recommendation is the assignment it scores lowest under the same budget
(what an exact knapsack over its table returns); its regret is KL(recommended) / KL(oracle) ≥ 1,
and its rank is where it falls among all assignments ordered by measured KL.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.allocate.knapsack import Budget, BudgetKind, Item, pareto_front
from fitonnx.analysis.harness import Harness
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.simulate import Config
from fitonnx.errors import FitonnxError

MAX_ASSIGNMENTS = 20000


@dataclass(frozen=True)
class OracleResult:
    """One budget: the oracle's and each predictor's choice, with measured KL, regret and rank."""

    budget: float
    assignments: int  # within the budget
    best: dict[str, int]
    best_kl: float
    recommended: dict[str, dict[str, int]]  # per scorer (a predictor's name, or the caller's label)
    kl: dict[str, float]
    regret: dict[str, float]
    rank: dict[str, int]  # 1 = the oracle's own choice


Scorer = Callable[[Mapping[str, int]], float]


def predictor_scorers(h: Harness, predictors: Sequence[Predictor]) -> dict[str, Scorer]:
    """Each predictor's score of a weight assignment (its table summed along it)."""
    return {p.value: (lambda a, p=p: h.tables.total(p, Config(dict(a), {}))) for p in predictors}


def one_at_a_time(
    h: Harness, widths: Sequence[int], measure: Callable[[Config], float] | None = None
) -> tuple[Scorer, int]:
    """The AIMET/Quark baseline: each weight alone at each width measured (``measure``, default the
    held-out KL; AIMET measures on calibration data), summed over an assignment; returns the scorer
    and how many simulations it took."""
    kl = measure or (lambda c: h.measure(c).kl)
    single = {(w, b): kl(Config({w: b}, {})) for w in h.weights for b in widths}
    return (lambda a: sum(single[(w, b)] for w, b in a.items())), len(single)


def scorer_items(h: Harness, widths: Sequence[int], score: Scorer) -> list[Item]:
    """The knapsack's menu of every weight at every width, each cell ``score`` of that weight
    alone at that width (an additive scorer's table: a predictor's, the one-at-a-time KL)."""
    return [
        Item(w, int(h.simulator.sim.weights[w].size), tuple(widths), tuple(max(0.0, score({w: b})) for b in widths))
        for w in h.weights
    ]


def knapsack_answer(items: Sequence[Item], avg_bits: float) -> tuple[dict[str, int], int]:
    """The exact knapsack's assignment within ``avg_bits`` average bits and the size bound in bits."""
    max_size = Budget(BudgetKind.AVG_BITS, avg_bits).max_bits(sum(it.numel for it in items))
    front = pareto_front(items)
    index = front.best_within(max_size)
    if index < 0:
        raise FitonnxError(f"expected an assignment within {avg_bits} bits; every weight at its lowest is larger")
    return front.config(index), max_size


def average_bits(bits: Sequence[int], numels: Sequence[int]) -> float:
    return float(np.dot(bits, numels) / np.sum(numels))


def assignments(
    names: Sequence[str], numels: Sequence[int], widths: Sequence[int], budget: float
) -> list[dict[str, int]]:
    """Every assignment of ``widths`` to the tensors with average bits ≤ ``budget``."""
    total = len(widths) ** len(names)
    if total > MAX_ASSIGNMENTS:
        raise FitonnxError(f"expected at most {MAX_ASSIGNMENTS} assignments to enumerate; found {total}")
    return [
        dict(zip(names, combo, strict=True))
        for combo in itertools.product(widths, repeat=len(names))
        if average_bits(combo, numels) <= budget + 1e-9
    ]


def measure_assignments(h: Harness, budgets: Sequence[float]) -> dict[tuple[int, ...], float]:
    """The measured KL of every assignment within the largest budget, keyed by its widths in
    ``h.weights`` order (what ``oracle`` takes as ``measured``; a caller may store it)."""
    names = list(h.weights)
    numels = [int(h.simulator.sim.weights[w].size) for w in names]
    widths = [b for b in h.weight_bits if isinstance(b, int)]
    return {tuple(a.values()): h.measure(Config(a, {})).kl for a in assignments(names, numels, widths, max(budgets))}


def oracle(
    h: Harness,
    budgets: Sequence[float],
    scorers: Mapping[str, Scorer],
    measured: Mapping[tuple[int, ...], float] | None = None,
) -> list[OracleResult]:
    """The oracle and each scorer's recommendation at each budget (weights only, the harness's
    integer candidate widths; activations stay float). Each assignment is simulated once, or
    read from ``measured`` (``measure_assignments``'s answer, e.g. stored by a previous run)."""
    names = list(h.weights)
    numels = [int(h.simulator.sim.weights[w].size) for w in names]
    widths = [b for b in h.weight_bits if isinstance(b, int)]
    every = assignments(names, numels, widths, max(budgets))
    kl = dict(measured) if measured is not None else measure_assignments(h, budgets)
    missing = [a for a in every if tuple(a.values()) not in kl]
    if missing:
        raise FitonnxError(f"expected a measured KL for every assignment; {len(missing)} missing, e.g. {missing[0]}")
    out = []
    for budget in budgets:
        inside = [a for a in every if average_bits(list(a.values()), numels) <= budget + 1e-9]
        if not inside:
            raise FitonnxError(f"expected an assignment within {budget} bits; the lowest width is {min(widths)}")
        measured = np.array([kl[tuple(a.values())] for a in inside])
        best = int(np.argmin(measured))
        rec, rec_kl, regret, rank = {}, {}, {}, {}
        for label, score in scorers.items():
            k = int(np.argmin([score(a) for a in inside]))
            rec[label], rec_kl[label] = inside[k], float(measured[k])
            regret[label] = float(measured[k] / measured[best]) if measured[best] > 0 else float("inf")
            rank[label] = int(np.sum(measured < measured[k])) + 1
        out.append(OracleResult(budget, len(inside), inside[best], float(measured[best]), rec, rec_kl, regret, rank))
    return out
