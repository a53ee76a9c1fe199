"""Refining a recommendation by measurement on the calibration data.

The predictors are additive over tensors and second order, and the damage is neither: tensors'
rounding errors interact, and the knapsack's exact answer for the predicted damage is not the
least damaging assignment the budget allows (``oracle`` measures by how much). The refinement
takes the knapsack's answer and its neighbours within the same size bound (assignments that
differ from it in at most ``moves`` tensors, any widths), keeps the ``k`` the predictor scores
lowest, simulates each on the CALIBRATION samples and keeps the one with the least measured KL
among those lower than the answer's by more than z paired standard errors (the answer when none
is). Its cost is ``k`` simulations; it never reads held-out data, so the held-out damage still
judges it fairly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.allocate.knapsack import (
    Allocation,
    Budget,
    BudgetKind,
    Item,
    Objective,
    pareto_front,
    pick,
    with_weights,
)
from fitonnx.allocate.targets import Scheme, Target
from fitonnx.analysis import simulate
from fitonnx.analysis.damage import Reference, damage, reference
from fitonnx.analysis.output_space import measure_output_space
from fitonnx.analysis.simulate import Config
from fitonnx.errors import FitonnxError
from fitonnx.fisher import engine, parallel
from fitonnx.fisher import session as fisher_session
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import OutputTarget
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import Session
from fitonnx.model.data import Dataset
from fitonnx.progress import Progress, as_progress

DEFAULT_MOVES = 2
DEFAULT_Z = 2.0  # a candidate replaces the knapsack's answer only if better by 2 paired standard errors
MAX_NEIGHBOURS = 5_000_000  # two-tensor moves scored at once: n²·k²/2 floats


@dataclass(frozen=True)
class Refinement:
    """The candidates (``[0]`` the knapsack's answer), what the predictor and the calibration
    simulation said of each, and the index of the one kept (least measured KL)."""

    candidates: tuple[dict[str, int], ...]
    predicted: tuple[float, ...]
    measured: tuple[float, ...]
    chosen: int

    @property
    def simulations(self) -> int:
        return len(self.candidates)

    @property
    def best(self) -> dict[str, int]:
        return self.candidates[self.chosen]


def _tables(items: Sequence[Item], start: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item and candidate (padded with +inf): size and predicted change from ``start``, and
    the index of the start's candidate."""
    width = max(len(it.bits) for it in items)
    dsize = np.full((len(items), width), np.inf)
    dfit = np.full((len(items), width), np.inf)
    at = np.zeros(len(items), np.int64)
    for row, it in enumerate(items):
        if start[it.name] not in it.bits:
            raise FitonnxError(f"expected {it.name!r} at one of its candidates {it.bits}; found {start[it.name]}")
        at[row] = it.bits.index(start[it.name])
        for j in range(len(it.bits)):
            dsize[row, j] = it.size(j) - it.size(int(at[row]))
            dfit[row, j] = it.fit[j] - it.fit[at[row]]
    return dsize, dfit, at


def neighbours(
    items: Sequence[Item], start: Mapping[str, int], max_size: int, k: int, moves: int = DEFAULT_MOVES
) -> list[tuple[dict[str, int], float]]:
    """``start`` and the ``k − 1`` assignments differing from it in 1..``moves`` (1 or 2) tensors,
    of total size ≤ ``max_size``, that the items' additive FIT scores lowest; (assignment, FIT)
    pairs in ascending FIT (ties: fewer moves first), ``start`` always first."""
    if moves not in (1, 2):
        raise FitonnxError(f"expected 1 or 2 tensors changed per neighbour; found {moves}")
    dsize, dfit, at = _tables(items, start)
    n, w = dfit.shape
    base_size = sum(it.size(int(at[r])) for r, it in enumerate(items))
    base_fit = float(sum(it.fit[int(at[r])] for r, it in enumerate(items)))
    slack = max_size - base_size
    same = np.arange(w)[None, :] == at[:, None]
    found: list[tuple[float, int, tuple[tuple[int, int], ...]]] = []
    ok1 = (~same) & (dsize <= slack) & np.isfinite(dfit)
    found += [(float(dfit[r, j]), 1, ((r, j),)) for r, j in zip(*np.nonzero(ok1), strict=True)]
    if moves == 2 and n > 1:
        found += _pair_moves(dsize, dfit, same, slack, k)
    found.sort(key=lambda c: (c[0], c[1]))
    out = [(dict(start), base_fit)]
    for delta, _, changes in found[: max(k - 1, 0)]:
        a = dict(start)
        for r, j in changes:
            a[items[r].name] = items[r].bits[j]
        out.append((a, base_fit + delta))
    return out


def _kept(samples: Sequence[np.ndarray], z: float) -> int:
    """The candidate kept: the least mean among those whose per-sample KL is below the first
    candidate's by more than ``z`` paired standard errors (the first when none is)."""
    base = samples[0]
    best, best_mean = 0, float(base.mean())
    for i, x in enumerate(samples[1:], start=1):
        d = x - base
        se = float(d.std(ddof=1)) / np.sqrt(d.size) if d.size > 1 else 0.0
        if float(d.mean()) + z * se < 0 and float(x.mean()) < best_mean:
            best, best_mean = i, float(x.mean())
    return best


def _pair_moves(
    dsize: np.ndarray, dfit: np.ndarray, same: np.ndarray, slack: float, k: int
) -> list[tuple[float, int, tuple[tuple[int, int], ...]]]:
    """The ``k − 1`` best two-tensor moves within ``slack``. Past ``MAX_NEIGHBOURS`` pairs, only
    among the tensors whose best single change predicts the least damage (a large model)."""
    n, w = dfit.shape
    rows = np.arange(n)
    if n * n * w * w // 2 > MAX_NEIGHBOURS:
        keep = max(2, int(np.sqrt(2 * MAX_NEIGHBOURS)) // w)
        rows = np.sort(np.argsort(np.where(same, np.inf, dfit).min(axis=1), kind="stable")[:keep])
    ds, df, sm = dsize[rows], dfit[rows], same[rows]
    s = ds[:, :, None, None] + ds[None, None, :, :]
    f = df[:, :, None, None] + df[None, None, :, :]
    upper = np.triu(np.ones((rows.size, rows.size), bool), 1)[:, None, :, None]
    ok = upper & (~sm)[:, :, None, None] & (~sm)[None, None, :, :] & (s <= slack) & np.isfinite(f)
    idx = np.nonzero(ok)
    order = np.argsort(f[idx], kind="stable")[: max(k - 1, 0)]
    return [
        (float(f[idx][q]), 2, ((int(rows[idx[0][q]]), int(idx[1][q])), (int(rows[idx[2][q]]), int(idx[3][q]))))
        for q in order
    ]


def refine(
    candidates: Sequence[tuple[dict[str, int], float]],
    measure: Callable[[dict[str, int]], np.ndarray],
    z: float = DEFAULT_Z,
) -> Refinement:
    """Measure every candidate (``measure``: its per-sample KL on the calibration data) and keep
    the least damaging among those measurably better than the first (the knapsack's answer) by a
    paired one-sided test at ``z`` standard errors; ``z = 0``: the least mean KL, ties the earlier.
    The test keeps sampling noise from moving the answer: the candidates are often within it."""
    if not candidates:
        raise FitonnxError("expected at least one candidate assignment to refine")
    samples = [np.asarray(measure(a), np.float64).reshape(-1) for a, _ in candidates]
    return Refinement(
        candidates=tuple(dict(a) for a, _ in candidates),
        predicted=tuple(float(p) for _, p in candidates),
        measured=tuple(float(x.mean()) for x in samples),
        chosen=_kept(samples, z),
    )


@dataclass(frozen=True)
class Measurer:
    """KL of a configuration against the float model on fixed data (a simulator and its reference)."""

    simulator: simulate.Simulator
    reference: Reference
    fixed: Mapping[str, int]  # activation widths every configuration keeps (empty: float)

    def samples(self, weight_bits: Mapping[str, int]) -> np.ndarray:
        """Per-sample KL of the weights at ``weight_bits`` (activations as ``fixed``)."""
        return damage(self.reference, self.simulator.run(Config(dict(weight_bits), dict(self.fixed)))).sample_kl

    def kl(self, weight_bits: Mapping[str, int]) -> float:
        return float(self.samples(weight_bits).mean())


def measurer(
    simulator: simulate.Simulator, data: Dataset, target: OutputTarget, fixed: Mapping[str, int] | None = None
) -> Measurer:
    """A ``Measurer`` of ``simulator``'s model on ``data`` (the calibration samples), the float
    reference computed here."""
    sim = simulator.on(data)
    ref = reference(target, sim.run(Config.floating()), None, data.source)
    return Measurer(sim, ref, dict(fixed or {}))


def _session_measurer(
    s: Session, alloc: Allocation, gm: GradientModel, out: OutputTarget
) -> tuple[Measurer, str | None]:
    """A measurer of ``s``'s model on its calibration data with ``alloc``'s target grids, and a note
    when the activations are simulated in float (their grid scheme differs from the weights')."""
    target = alloc.target
    symmetric = target.weight_scheme is Scheme.SYMMETRIC
    rec = alloc.recommendation
    acts = {t.name: rec.activation_bits[t.name] for t in gm.tensors if t.name in rec.activation_bits}
    note = None
    if acts and target.activation_scheme is not target.weight_scheme:
        acts, note = {}, "activations simulated in float (the target's activation grid is not its weights')"
    ranges = {name: rec.ranges[name] for name in acts}
    sim = simulate.Simulator(
        simulate.build(s.prepared.model, gm.tensors, out.tap, s.specs),
        s.prepared.model,
        gm.tensors,
        ranges,
        simulate.GridScheme(symmetric=symmetric),
        s.data,
        s.specs,
    )
    ref = reference(out, sim.run(Config.floating()), None, s.data.source)
    return Measurer(sim, ref, acts), note


def check_refine(
    k: int, target: Target, weight_bits: Sequence[int], by_format: bool, objective: Objective, budget: Budget
) -> None:
    """Fail before any work when ``recommend --refine k`` / ``--objective`` cannot be simulated:
    formats, float widths, an output-space objective under a FIT budget."""
    if k < 1:
        raise FitonnxError(f"expected --refine of at least 1 candidate; found {k}")
    measured = k > 1 or objective is not Objective.FIT
    if measured and by_format:
        raise FitonnxError("expected bit widths with --refine/--objective; a --formats recommendation is FIT's")
    floats = sorted(set(weight_bits) & set(target.float_bits))
    if measured and floats:
        raise FitonnxError(
            f"expected integer widths with --refine/--objective; target {target.name!r} stores {floats} bits as float",
            hint="restrict --weight-bits to the integer widths",
        )
    if objective is not Objective.FIT and budget.kind is BudgetKind.MAX_FIT:
        raise FitonnxError(f"expected a size budget (--avg-bits, --size-kb) with --objective {objective.value}")


def _output_space_items(
    s: Session, options: FisherOptions, m: Measurer, items: Sequence[Item], progress: Progress | None
) -> list[Item]:
    """The weights' menus with the output-space score of each width instead of FIT (one pass)."""

    def run(gm: GradientModel, extra: Sequence[str]) -> engine.FisherTraces:
        return parallel.run(gm, s.data, s.specs, options.run_options(), options.workers, progress, extra_outputs=extra)

    widths = sorted({b for it in items for b in it.bits})
    scores = measure_output_space(s, options, m.simulator, (widths, ()), run)
    return [
        dataclasses.replace(it, fit=tuple(max(0.0, scores.get((it.name, b), 0.0)) for b in it.bits)) for it in items
    ]


def rework_allocation(
    s: Session, alloc: Allocation, options: FisherOptions, request: Rework, progress: Progress | None = None
) -> tuple[Allocation, Refinement | None, str | None]:
    """``alloc`` re-chosen by measurement on ``s``'s calibration data: the knapsack's answer for
    ``request.objective``, then its ``request.refine − 1`` best-predicted neighbours within the same
    size simulated with it (``refine``); also the refinement (None without) and a note."""
    check_refine(
        request.refine, alloc.target, [b for it in alloc.front.items for b in it.bits],
        alloc.recommendation.by_format, request.objective, alloc.budget,
    )  # fmt: skip
    gm, out, _ = fisher_session.gradient_model(s, options)
    measure, note = _session_measurer(s, alloc, gm, out)
    items, start = list(alloc.front.items), dict(alloc.chosen.bits)
    if request.objective is Objective.OUTPUT_SPACE:
        items = _output_space_items(s, options, measure, items, progress)
        start = dict(pick(pareto_front(items, alloc.front.tolerance), alloc.budget).bits)
    if alloc.budget.kind is BudgetKind.MAX_FIT:
        max_size = alloc.chosen.size_bits  # no larger than the knapsack's answer
    else:
        max_size = alloc.budget.max_bits(alloc.total_numel)
    r = None
    if request.refine > 1:
        candidates = neighbours(items, start, max_size, request.refine)
        if alloc.budget.kind is BudgetKind.MAX_FIT:  # neighbours within the FIT budget too
            limit = alloc.budget.value - alloc.activation_fit
            candidates = [c for i, c in enumerate(candidates) if i == 0 or c[1] <= limit]
        bar = as_progress(progress)  # after the output-space pass, which starts its own bar
        bar.start(1, f"Measuring on the calibration data ({request.refine} candidates)")
        r = refine(candidates, measure.samples, request.z)
        bar.advance(1)
    record = {"refine": float(request.refine), "output_space_objective": float(request.objective is not Objective.FIT)}
    return with_weights(alloc, r.best if r else start, record), r, note


@dataclass(frozen=True)
class Rework:
    """``recommend``'s measured stage: the knapsack's objective, candidates to simulate, the test's z."""

    objective: Objective = Objective.FIT
    refine: int = 1
    z: float = DEFAULT_Z

    @property
    def active(self) -> bool:
        return self.refine > 1 or self.objective is not Objective.FIT
