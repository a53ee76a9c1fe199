"""Bit allocation under a budget: an exact (or ε-bounded) Pareto front of FIT against size.

The problem is a multiple-choice knapsack: pick one bit width b_t per tensor t to minimise the
additive objective Σ_t FIT_t(b_t) subject to a size Σ_t numel_t·b_t ≤ B. Written here (no
dependency offers it without an ILP solver, and scipy is not a dependency) as the Pareto-front
dynamic programme: merge the tensors one at a time, keeping only the (size, FIT) pairs that no
other pair beats on both. Every optimal configuration is either on that front or tied with a
front point, so the front answers every budget at once (exact, and it IS the FIT–size curve the
user plots). Sizes are exact integers (bits), so no rounding of the budget is involved.

The front can grow with the number of distinct sizes. With ``tolerance`` ε > 0, each merge also
thins the front by grouping points whose FIT lies in the same power of (1 + δ), δ = (1 + ε)^(1/n) − 1,
and keeping the smallest of each group: every dropped point keeps a representative no larger and
at most (1 + δ) worse, the factors compound over n merges to at most 1 + ε (FIT is additive and
non-negative), so the chosen configuration's FIT is within a factor 1 + ε of the optimum at its
size budget (for a FIT budget F: no larger than the smallest configuration with FIT ≤ F/(1 + ε)).
Each thinned front has at most about n·ln(FIT_max/FIT_min)/ε points, FIT_min its smallest
non-zero FIT, whatever the number of distinct sizes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction
from typing import Any

import numpy as np

from fitonnx.allocate.recommendation import ParetoPoint, Recommendation
from fitonnx.allocate.targets import DEFAULT_TARGET, Target, get_target
from fitonnx.errors import FitonnxError, InternalError
from fitonnx.model.graph import Kind
from fitonnx.score.fit import ScoreReport

BYTES_PER_KB = 1024
MAX_POINTS = 500_000  # per front: merging holds k× as many candidates (~40 bytes each); 5 bytes kept per point


@dataclass(frozen=True)
class Item:
    """One tensor's menu: for each candidate bit width, its FIT (size = numel·bits).

    A format menu (``recommend --formats``) also gives ``formats`` (registry names, one per
    candidate; ``bits`` are then their element widths) and ``sizes``, the exact storage in bits
    of each candidate, scales and zero points included, which the front counts instead."""

    name: str
    numel: int
    bits: tuple[int, ...]
    fit: tuple[float, ...]
    sizes: tuple[int, ...] = ()
    formats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.bits) != len(self.fit) or not self.bits:
            raise InternalError(f"item {self.name!r}: {len(self.bits)} bit widths but {len(self.fit)} FIT values")
        if any(len(extra) not in (0, len(self.bits)) for extra in (self.sizes, self.formats)):
            raise InternalError(f"item {self.name!r}: sizes and formats must have one entry per candidate")
        if self.numel < 0 or any(not math.isfinite(f) or f < 0 for f in self.fit):
            raise InternalError(f"item {self.name!r}: expected numel ≥ 0 and finite FIT ≥ 0; found {self}")

    def size(self, j: int) -> int:
        """Storage of candidate ``j`` in bits: its exact size if given, else numel·bits."""
        return int(self.sizes[j]) if self.sizes else self.numel * self.bits[j]


@dataclass(frozen=True)
class Front:
    """Non-dominated configurations: size (total bits) ascending, FIT strictly descending."""

    items: tuple[Item, ...]
    sizes: np.ndarray  # int64 [P], Σ numel·bits
    fits: np.ndarray  # float64 [P]
    tolerance: float
    # per merged item: for each point of the front after that merge, its parent index on the
    # previous front and the index of the chosen bit width (to rebuild configurations)
    steps: tuple[tuple[np.ndarray, np.ndarray], ...] = field(repr=False)

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def choices(self, index: int) -> dict[str, int]:
        """The index of every item's chosen candidate at front point ``index``."""
        picked: dict[str, int] = {}
        i = index
        for item, (parent, choice) in zip(reversed(self.items), reversed(self.steps), strict=True):
            picked[item.name] = int(choice[i])
            i = int(parent[i])
        return {item.name: picked[item.name] for item in self.items}

    def config(self, index: int) -> dict[str, int]:
        """The bit width of every item at front point ``index``."""
        by_name = {item.name: item for item in self.items}
        return {name: by_name[name].bits[c] for name, c in self.choices(index).items()}

    def formats(self, index: int) -> dict[str, str]:
        """The format of every item at front point ``index`` (items of a format menu)."""
        by_name = {item.name: item for item in self.items}
        return {name: by_name[name].formats[c] for name, c in self.choices(index).items()}

    def configs(self, indices: np.ndarray) -> np.ndarray:
        """Bit widths [len(indices), len(items)] of many front points at once (items in merge order)."""
        idx = np.asarray(indices, np.int64)
        out = np.zeros((idx.size, len(self.items)), np.int64)
        for j in range(len(self.items) - 1, -1, -1):
            parent, choice = self.steps[j]
            out[:, j] = np.asarray(self.items[j].bits, np.int64)[choice[idx]]
            idx = parent[idx].astype(np.int64)
        return out

    def best_within(self, max_size: int) -> int:
        """Index of the lowest-FIT point of size ≤ ``max_size`` (-1 if none fits)."""
        return int(np.searchsorted(self.sizes, max_size, side="right")) - 1

    def smallest_under(self, max_fit: float) -> int:
        """Index of the smallest point with FIT ≤ ``max_fit`` (-1 if none)."""
        ok = np.flatnonzero(self.fits <= max_fit)
        return int(ok[0]) if ok.size else -1


def _prune(sizes: np.ndarray, fits: np.ndarray, delta: float) -> np.ndarray:
    """Indices of the non-dominated points (ties: the first in input order), sorted by size."""
    order = np.lexsort((fits, sizes))  # by size, then FIT; stable, so ties keep input order
    f = fits[order]
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(f)[:-1]))
    keep = f < best_before  # strictly better than every smaller-or-equal-size point
    idx, f = order[keep], f[keep]
    if delta > 0 and idx.size > 1:
        # FIT decreases along the front, so equal buckets of log(FIT) are contiguous runs.
        with np.errstate(divide="ignore"):
            bucket = np.where(f > 0, np.floor(np.log(f) / math.log1p(delta)), -np.inf)
        first = np.concatenate(([True], bucket[1:] != bucket[:-1]))
        idx = idx[first]
    return idx


def pareto_front(items: Sequence[Item], tolerance: float = 0.0, max_points: int = MAX_POINTS) -> Front:
    """The (1 + ``tolerance``)-approximate Pareto front of Σ FIT against Σ numel·bits (exact at 0).

    Items are merged largest first: the intermediate fronts stay smaller that way (measured: 3×
    fewer stored points on 100 random tensors); the exact front does not depend on the order.
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise FitonnxError(f"expected a tolerance ≥ 0; found {tolerance}")
    items = tuple(sorted(items, key=lambda item: -item.numel))
    delta = (1.0 + tolerance) ** (1.0 / max(len(items), 1)) - 1.0 if tolerance > 0 else 0.0
    sizes = np.zeros(1, np.int64)
    fits = np.zeros(1, np.float64)
    steps: list[tuple[np.ndarray, np.ndarray]] = []
    for item in items:
        k = len(item.bits)
        add_size = np.array([item.size(j) for j in range(k)], np.int64)
        add_fit = np.array(item.fit, np.float64)
        cand_size = (sizes[:, None] + add_size[None, :]).ravel()
        cand_fit = (fits[:, None] + add_fit[None, :]).ravel()
        keep = _prune(cand_size, cand_fit, delta)
        if keep.size > max_points:
            raise FitonnxError(
                f"expected a Pareto front of at most {max_points} points; merging {item.name!r} gives {keep.size}",
                hint="pass a tolerance (e.g. --tolerance 0.01) to keep an ε-approximate front",
            )
        steps.append(((keep // k).astype(np.int32), (keep % k).astype(np.int8)))
        sizes, fits = cand_size[keep], cand_fit[keep]
    return Front(items=items, sizes=sizes, fits=fits, tolerance=tolerance, steps=tuple(steps))


class BudgetKind(str, Enum):
    AVG_BITS = "avg_bits"  # Σ numel·bits / Σ numel ≤ value
    SIZE_KB = "size_kb"  # ⌈Σ numel·bits / 8⌉ bytes ≤ value·1024
    MAX_FIT = "max_fit"  # the smallest configuration whose total FIT ≤ value


@dataclass(frozen=True)
class Budget:
    kind: BudgetKind
    value: float

    def max_bits(self, total_numel: int) -> int:
        """The budget as an exact bound on Σ numel·bits (sizes only).

        The value is read as the decimal the user typed (``Fraction(str(x))``), so 3.3 bits means
        exactly 33/10 and the bound does not depend on binary floating-point rounding.
        """
        value = Fraction(str(self.value))
        if self.kind is BudgetKind.AVG_BITS:
            return math.floor(value * total_numel)
        if self.kind is BudgetKind.SIZE_KB:
            return math.floor(value * BYTES_PER_KB * 8)
        raise InternalError(f"budget {self.kind.value} is not a size bound")

    def describe(self) -> str:
        return {
            BudgetKind.AVG_BITS: f"average weight bits ≤ {self.value:g}",
            BudgetKind.SIZE_KB: f"weight size ≤ {self.value:g} KB",
            BudgetKind.MAX_FIT: f"FIT ≤ {self.value:.4g}",
        }[self.kind]


def budget_from(*, avg_bits: float | None = None, size_kb: float | None = None, max_fit: float | None = None) -> Budget:
    """The one budget given among the three ways of stating it."""
    given = [
        (k, v)
        for k, v in ((BudgetKind.AVG_BITS, avg_bits), (BudgetKind.SIZE_KB, size_kb), (BudgetKind.MAX_FIT, max_fit))
        if v is not None
    ]
    if len(given) != 1:
        found = ", ".join(f"--{k.value.replace('_', '-')}" for k, _ in given) or "none"
        raise FitonnxError(f"expected exactly one budget among --avg-bits, --size-kb and --max-fit; found {found}")
    kind, value = given[0]
    if not math.isfinite(value) or value <= 0:
        raise FitonnxError(f"expected a positive --{kind.value.replace('_', '-')}; found {value}")
    return Budget(kind, float(value))


class Objective(str, Enum):
    """What ``recommend``'s knapsack minimises over the weights (``analysis.refine`` measures the others)."""

    FIT = "fit"  # the paper's FIT (the score report's)
    OUTPUT_SPACE = "output_space"  # ModelOpt AutoQuantize's output-space score (one more pass)


@dataclass(frozen=True)
class AllocationOptions:
    """What ``allocate`` may choose from: the target, its weight bit widths, the activations' rule;
    and how ``recommend`` measures after it: the knapsack's ``objective`` and ``refine`` candidates
    simulated on the calibration data (1: none; ``analysis.refine``)."""

    target: str = DEFAULT_TARGET
    weight_bits: tuple[int, ...] | None = None  # None: the target's own
    # every activation at this width (default: the target's); with act_avg_bits, the candidate widths
    act_bits: int | tuple[int, ...] | None = None
    act_avg_bits: float | None = None  # or an exact allocation of activation bits under this average
    tolerance: float = 0.0  # accept a front within (1 + tolerance) of the optimum
    objective: Objective = Objective.FIT
    refine: int = 1

    def check(self) -> Target:
        """The target, once every option is known to be valid for it."""
        return check_options(
            self.target, weight_bits=self.weight_bits, act_bits=self.act_bits, act_avg_bits=self.act_avg_bits
        )


def check_options(
    target: Target | str,
    *,
    weight_bits: Sequence[int] | None = None,
    act_bits: int | Sequence[int] | None = None,
    act_avg_bits: float | None = None,
) -> Target:
    """Validate the options ``allocate`` takes before anything expensive runs; return the target."""
    target = get_target(target) if isinstance(target, str) else target
    if weight_bits is not None:
        _check_bits(weight_bits, target.weight_bits, "weight bits", target)
    act_choices(target, act_bits, act_avg_bits)
    if act_avg_bits is not None and (not math.isfinite(act_avg_bits) or act_avg_bits <= 0):
        raise FitonnxError(f"expected a positive --act-avg-bits; found {act_avg_bits}")
    return target


def act_choices(
    target: Target, act_bits: int | Sequence[int] | None, act_avg_bits: float | None
) -> tuple[tuple[int, ...], int | None]:
    """The candidate activation widths and the one fixed width (None under ``act_avg_bits``):
    ``--act-bits 8`` fixes every activation; ``--act-bits 8,16 --act-avg-bits 10`` chooses among them."""
    widths = None if act_bits is None else (act_bits,) if isinstance(act_bits, int) else tuple(sorted(set(act_bits)))
    if widths is not None:
        _check_bits(widths, target.activation_bits, "activation bits", target)
    if act_avg_bits is not None:
        return widths or tuple(target.activation_bits), None
    if widths is not None and len(widths) > 1:
        raise FitonnxError(
            f"expected one --act-bits width for every activation; found {','.join(map(str, widths))}",
            hint="several widths are candidates only with --act-avg-bits (an average over activation elements)",
        )
    return tuple(target.activation_bits), target.default_activation_bits if widths is None else widths[0]


def weight_bytes(total_bits: int) -> int:
    """Weights packed densely: ⌈Σ numel·bits / 8⌉ bytes."""
    return -(-int(total_bits) // 8)


@dataclass(frozen=True)
class Pick:
    """A point chosen from a front: its index, configuration, size in bits and FIT."""

    index: int
    bits: Mapping[str, int]
    size_bits: int
    fit: float


def pick(front: Front, budget: Budget, *, fit_offset: float = 0.0, what: str = "weights") -> Pick:
    """The configuration a budget selects; ``fit_offset`` is FIT spent elsewhere (activations).

    Size budgets: the lowest FIT within the size. FIT budget: the smallest size whose FIT plus
    ``fit_offset`` stays within it. Infeasible budgets fail with the smallest feasible one
    (``what`` names the tensors in that message).
    """
    total_numel = sum(item.numel for item in front.items)
    if budget.kind is BudgetKind.MAX_FIT:
        index = front.smallest_under(budget.value - fit_offset)
        if index < 0:
            least = float(front.fits[-1]) + fit_offset
            raise FitonnxError(
                f"expected --max-fit of at least {least:.6g} (every weight at its highest bits, activations as "
                f"chosen); found {budget.value:.6g}"
            )
    else:
        index = front.best_within(budget.max_bits(total_numel))
        if index < 0:
            scaled = any(item.sizes for item in front.items)
            raise too_small(budget, int(front.sizes[0]), total_numel, SMALLEST_FORMATS if scaled else LOWEST_BITS, what)
    return Pick(index, front.config(index), int(front.sizes[index]), float(front.fits[index]))


LOWEST_BITS = "all {what} at the lowest bits"
SMALLEST_FORMATS = "all {what} in their smallest formats, scales and zero points included"


def too_small(budget: Budget, least: int, total_numel: int, how: str, what: str = "weights") -> FitonnxError:
    """The error of a size budget below ``least`` bits over ``total_numel`` elements; ``how`` (with
    ``{what}``) says what that smallest configuration is. The minimum is rounded up, so that a budget
    of the figure it names fits."""
    why = how.format(what=what)
    if budget.kind is BudgetKind.AVG_BITS:
        need = math.ceil(Fraction(least, max(total_numel, 1)) * 10**5)
        text = f"{need // 10**5}.{need % 10**5:05d}".rstrip("0").rstrip(".")
        return FitonnxError(f"expected an average of at least {text} bits ({why}); found {budget.value:g}")
    return FitonnxError(
        f"expected a budget of at least {math.ceil(weight_bytes(least) / BYTES_PER_KB * 1000) / 1000:g} KB "
        f"({why}); found {budget.value:g} KB"
    )


def check_budget(budget: Budget, numels: Sequence[int], lowest_bits: int, what: str = "weights") -> None:
    """Fail before any scoring when a size budget is below every weight at ``lowest_bits`` (a FIT
    budget needs the scores and is checked by ``pick``)."""
    total = int(sum(numels))
    check_least(budget, total * int(lowest_bits), total, LOWEST_BITS, what)


def check_least(budget: Budget, least: int, total_numel: int, how: str, what: str = "weights") -> None:
    """Fail when a size budget is below ``least`` bits, the smallest configuration (``how``) of
    ``total_numel`` elements (a FIT budget needs the scores and is checked by ``pick``)."""
    if budget.kind is not BudgetKind.MAX_FIT and total_numel and least > budget.max_bits(total_numel):
        raise too_small(budget, least, total_numel, how, what)


# --- from a FIT report to a recommendation ---------------------------------------------------

PARETO_IN_RECOMMENDATION = 256  # front points kept in recommendation.json (pareto.json has all)


@dataclass(frozen=True)
class UniformConfig:
    """Every weight at ``bits`` (activations as chosen): the baseline a recommendation beats."""

    bits: int
    weight_bytes: int
    fit: float
    format: str | None = None  # a format menu's uniform configuration: this format everywhere
    size_bits: int | None = None  # exact storage with scales (default bits · numel)


@dataclass(frozen=True)
class Allocation:
    """The chosen configuration, the front it came from, and the uniform baselines."""

    recommendation: Recommendation
    target: Target
    budget: Budget
    front: Front  # weights; FIT values exclude the activations' ``activation_fit``
    chosen: Pick
    activation_fit: float
    total_numel: int
    uniform: tuple[UniformConfig, ...]

    @property
    def avg_bits(self) -> float:
        return self.chosen.size_bits / self.total_numel if self.total_numel else 0.0

    def comparable_uniform(self) -> UniformConfig | None:
        """The uniform configuration the budget also allows: the largest within a size budget, the
        smallest within a FIT budget."""
        if self.budget.kind is BudgetKind.MAX_FIT:
            ok = [u for u in self.uniform if u.fit <= self.budget.value]
            return min(ok, key=lambda u: u.weight_bytes) if ok else None
        limit = self.budget.max_bits(self.total_numel)
        ok = [u for u in self.uniform if (u.size_bits or u.bits * self.total_numel) <= limit]
        return max(ok, key=lambda u: u.weight_bytes) if ok else None


def _items(report: ScoreReport, target: Target, kind: Kind, bits: Sequence[int]) -> list[Item]:
    return [
        Item(
            t.name,
            t.numel,
            tuple(bits),
            tuple(target.fit(kind, t.ef_trace, t.min, t.max, b, t.point_mass) for b in bits),
        )
        for t in report.tensors
        if t.kind is kind
    ]


def _check_bits(bits: Sequence[int], allowed: Sequence[int], what: str, target: Target) -> tuple[int, ...]:
    bad = sorted(set(bits) - set(allowed))
    if bad or not bits:
        raise FitonnxError(
            f"expected {what} among target {target.name!r}'s {', '.join(map(str, allowed))}; found "
            f"{', '.join(map(str, bad)) if bad else 'none'}"
        )
    return tuple(sorted(set(bits)))


def _activation_bits(
    items: Sequence[Item], target: Target, act_bits: int | None, act_avg_bits: float | None, tolerance: float
) -> tuple[dict[str, int], float]:
    """Activations do not count toward the weight size: a fixed width for all (default: the
    target's), or their own exact allocation under an average-bits budget over activation elements."""
    if act_avg_bits is not None:
        front = pareto_front(items, tolerance)
        chosen = pick(front, Budget(BudgetKind.AVG_BITS, act_avg_bits), what="activations")
        return dict(chosen.bits), chosen.fit
    b = target.default_activation_bits if act_bits is None else act_bits
    return {item.name: b for item in items}, sum(item.fit[item.bits.index(b)] for item in items)


def _front_sample(front: Front, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` front points: the best configuration at evenly spaced sizes."""
    if len(front) <= limit:
        return np.arange(len(front))
    budgets = np.linspace(front.sizes[0], front.sizes[-1], limit)
    return np.unique(np.searchsorted(front.sizes, budgets, side="right") - 1)


def pareto_points(front: Front, activation_fit: float, indices: np.ndarray | None = None) -> tuple[ParetoPoint, ...]:
    """Front points as ParetoPoints (total FIT, i.e. including the activations' FIT)."""
    idx = np.arange(len(front)) if indices is None else np.asarray(indices, np.int64)
    bits = front.configs(idx)
    total = sum(item.numel for item in front.items)
    names = [item.name for item in front.items]
    return tuple(
        ParetoPoint(
            weight_bytes=weight_bytes(int(front.sizes[i])),
            avg_weight_bits=float(front.sizes[i]) / total if total else 0.0,
            fit=float(front.fits[i]) + activation_fit,
            weight_bits=dict(zip(names, row.tolist(), strict=True)),
        )
        for i, row in zip(idx.tolist(), bits, strict=True)
    )


@dataclass(frozen=True)
class ActivationChoice:
    """The activations' configuration, chosen before the weights: bits per tensor, their total FIT,
    and the average-bits budget they were allocated under (None: one width for all)."""

    bits: Mapping[str, int]
    fit: float
    avg_bits: float | None = None


def make_allocation(
    report: ScoreReport,
    target: Target,
    budget: Budget,
    front: Front,
    chosen: Pick,
    activations: ActivationChoice,
    uniform: tuple[UniformConfig, ...],
    pareto: Callable[[Front, float, np.ndarray], tuple[ParetoPoint, ...]] = pareto_points,
    **per_tensor: Mapping[str, Any],
) -> Allocation:
    """The Allocation of ``chosen`` on the weights' ``front``, with its Recommendation: tensors in the
    report's order (most sensitive first, as ``fitonnx score`` lists them), ``per_tensor`` being more
    Recommendation fields keyed by tensor name, and a sample of the front drawn by ``pareto``."""
    order = [t.name for t in report.tensors]

    def in_order(by_name: Mapping[str, Any]) -> dict[str, Any]:
        return {n: by_name[n] for n in order if n in by_name}

    budget_dict = {budget.kind.value: float(budget.value), "tolerance": front.tolerance}
    if activations.avg_bits is not None:
        budget_dict["act_avg_bits"] = float(activations.avg_bits)
    sample = np.union1d(_front_sample(front, PARETO_IN_RECOMMENDATION), [chosen.index])
    rec = Recommendation(
        model=report.model,
        target=target.name,
        weight_bits=in_order(chosen.bits),
        activation_bits=in_order(activations.bits),
        fit=chosen.fit + activations.fit,
        weight_bytes=weight_bytes(chosen.size_bits),
        ranges={t.name: (t.min, t.max) for t in report.tensors},
        budget=budget_dict,
        noise_model=report.noise_model,
        pareto=pareto(front, activations.fit, sample),
        **{field_name: in_order(value) for field_name, value in per_tensor.items()},
    )
    return Allocation(
        recommendation=rec,
        target=target,
        budget=budget,
        front=front,
        chosen=chosen,
        activation_fit=activations.fit,
        total_numel=sum(item.numel for item in front.items),
        uniform=uniform,
    )


def allocate(
    report: ScoreReport,
    target: Target | str,
    budget: Budget,
    *,
    weight_bits: Sequence[int] | None = None,
    act_bits: int | Sequence[int] | None = None,
    act_avg_bits: float | None = None,
    tolerance: float = 0.0,
) -> Allocation:
    """Per-tensor bit widths for ``target`` under ``budget`` from a FIT report.

    FIT is recomputed from each tensor's trace and range with the target's own grid (symmetric,
    asymmetric or float16), so the report's bit widths do not matter. Activations are chosen first
    (``act_bits`` for all, default the target's, or an exact allocation under ``act_avg_bits``);
    weights then get the exact (or 1 + ``tolerance``) optimum under the budget, a FIT budget
    counting the activations' FIT too.
    """
    target = check_options(target, weight_bits=weight_bits, act_bits=act_bits, act_avg_bits=act_avg_bits)
    w_bits = target.weight_bits if weight_bits is None else tuple(sorted(set(weight_bits)))
    w_items = _items(report, target, Kind.WEIGHT, w_bits)
    if not w_items:
        raise FitonnxError(f"expected quantizable weights in {report.model}; found none")
    a_widths, a_fixed = act_choices(target, act_bits, act_avg_bits)
    a_items = _items(report, target, Kind.ACTIVATION, a_widths)
    a_config, a_fit = _activation_bits(a_items, target, a_fixed, act_avg_bits, tolerance)
    front = pareto_front(w_items, tolerance)
    chosen = pick(front, budget, fit_offset=a_fit)
    total_numel = sum(item.numel for item in w_items)
    uniform = tuple(
        UniformConfig(b, weight_bytes(b * total_numel), sum(it.fit[it.bits.index(b)] for it in w_items) + a_fit)
        for b in w_bits
    )
    per_tensor = {it.name: dict(zip(it.bits, it.fit, strict=True)) for it in [*w_items, *a_items]}
    activations = ActivationChoice(a_config, a_fit, act_avg_bits)
    return make_allocation(report, target, budget, front, chosen, activations, uniform, fit_per_tensor=per_tensor)


def with_weights(alloc: Allocation, bits: Mapping[str, int], record: Mapping[str, float]) -> Allocation:
    """``alloc`` with other weight widths (``recommend --refine``'s measured choice), size and FIT
    recomputed from the front's items. The front and its chosen index stay FIT's knapsack's (the
    plots mark that point); the recommendation's budget adds ``record`` (how it was chosen)."""
    items = {item.name: item for item in alloc.front.items}
    if set(bits) != set(items):
        raise InternalError(f"expected widths for the weights {sorted(items)}; found {sorted(bits)}")
    at = {name: items[name].bits.index(b) for name, b in bits.items()}
    size = sum(items[n].size(j) for n, j in at.items())
    fit = float(sum(items[n].fit[j] for n, j in at.items()))
    rec = alloc.recommendation
    rec = dataclasses.replace(
        rec,
        weight_bits={n: int(bits[n]) for n in rec.weight_bits},
        fit=fit + alloc.activation_fit,
        weight_bytes=weight_bytes(size),
        budget={**rec.budget, **record},
    )
    return dataclasses.replace(alloc, recommendation=rec, chosen=Pick(alloc.chosen.index, dict(bits), size, fit))
