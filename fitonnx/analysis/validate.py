"""``fitonnx validate``: measure real quantization damage and how well FIT predicts it.

Configurations are simulated in ONNX Runtime (``simulate``) on held-out data; the damage each one
does (``damage``: KL of the outputs, change of loss, accuracy) is ranked against FIT and against
simple baselines (``predictors``), with bootstrap confidence intervals over configurations.

Where configurations come from (``Sampler``): by default (``budget``) where a user decides, between
the cheapest uniform configuration that still works (``damage.Threshold``) and the most expensive:
a budget is drawn in that band and each tensor takes a choice near it. Configurations past the
threshold are flagged and counted, and ρ is reported for all and for the working ones. ``random``
(the old sampler) draws every tensor's choice uniformly. With formats (``SimulationOptions.formats``)
each family of formats gets its own configurations and its own ρ. ``harness`` holds the stage before
any configuration; the views of the report are in ``fitonnx.render.validate``. Expensive peers
(``harness.Baseline``: HAWQ's Hessian trace) are ranked only when asked; every predictor's cost is
reported (``ValidationReport.costs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fitonnx.analysis.choices import Choice, Family, cost_bits
from fitonnx.analysis.damage import (
    Damage,
    Measure,
    Reliability,
    Threshold,
    measure_table,
    per_sample_measures,
    reliability,
)
from fitonnx.analysis.harness import (
    Baseline,
    BaselineOptions,
    Cost,
    EvalSource,
    Harness,
    SimulationOptions,
    harness,
    measure_all,
)
from fitonnx.analysis.predictors import ON_REQUEST, Predictor
from fitonnx.analysis.simulate import Config, GridScheme
from fitonnx.errors import FitonnxError
from fitonnx.fisher import session as api
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.progress import Progress, as_progress
from fitonnx.scale import Workers
from fitonnx.score.ranks import Correlation, rank_correlations
from fitonnx.values import TextEnum

DEFAULT_CONFIGS = 100
DEFAULT_RESAMPLES = 1000
# The budget sampler's spread of a tensor's bits around the drawn budget (a Gaussian weight, in bits).
BUDGET_SPREAD = 1.0
# Fewer working configurations than this give no working-regime correlations.
MIN_WORKING = 5
# The predictor validate leads with. The study of issue 17 (BENCHMARKS.md) found none that beats the
# paper's FIT in the working regime of three real models, the cross-tensor ``joint``, ``joint_kl``
# and ``superposed`` included (2026-12-06), so it stays; the others are shown beside it.
DEFAULT_PREDICTOR = Predictor.FIT


class Sampler(TextEnum):
    """Where configurations are drawn."""

    BUDGET = "budget"  # between the cheapest working uniform configuration and the dearest
    RANDOM = "random"  # every tensor's choice uniformly among all candidates


@dataclass(frozen=True)
class SamplingOptions:
    """Which configurations are simulated and how their rank correlations are bootstrapped."""

    configs: int = DEFAULT_CONFIGS  # mixed-precision configurations per family
    uniform: bool = True  # add every tensor at the same choice, for each candidate
    resamples: int = DEFAULT_RESAMPLES  # bootstrap resamples of the configurations (0: no intervals)
    sampler: Sampler = Sampler.BUDGET
    threshold: Threshold = field(default_factory=Threshold)
    predictor: Predictor = DEFAULT_PREDICTOR  # the one the report leads with (the paper's FIT beside it)
    baselines: BaselineOptions = field(default_factory=BaselineOptions)  # expensive peers ranked too


@dataclass(frozen=True)
class ConfigResult:
    """One simulated configuration: its bit widths, what each predictor says and the measured damage."""

    weight_bits: Mapping[str, Choice]
    activation_bits: Mapping[str, Choice]
    uniform: bool
    predicted: Mapping[Predictor, float]
    kl: float
    dloss: float | None
    accuracy: float | None
    family: str = ""
    working: bool = True  # within the damage threshold
    agreement: float | None = None  # share of outputs deciding as the float model


@dataclass(frozen=True)
class FamilySummary:
    """One family's configurations: the band the budget sampler drew in, how many were past the
    threshold, and ρ over all and over the working ones (with their own ceiling)."""

    name: str
    weight_choices: tuple[Choice, ...]
    activation_choices: tuple[Choice, ...]
    band: tuple[Choice, Choice] | None  # (cheapest working uniform choice, dearest); None: random sampler
    configs: int
    rejected: int
    correlations: tuple[Correlation, ...]
    working: tuple[Correlation, ...]
    working_reliability: tuple[Reliability, ...] = ()

    def correlation(self, predictor: Predictor | str, measure: Measure | str, working: bool = False) -> Correlation:
        for c in self.working if working else self.correlations:
            if c.predictor == predictor and c.measure == measure:
                return c
        raise FitonnxError(f"expected a predictor and measure of family {self.name}; found {predictor}, {measure}")


@dataclass(frozen=True)
class ValidationReport:
    """The result of ``fitonnx validate``."""

    model: str
    fisher: str
    likelihood: str
    output: str
    data_source: str
    samples: int
    eval_source: str
    eval_samples: int
    scheme: GridScheme
    weight_bits: tuple[Choice, ...]
    activation_bits: tuple[Choice, ...]
    seed: int
    resamples: int
    float_loss: float | None
    float_accuracy: float | None
    configs: tuple[ConfigResult, ...]
    correlations: tuple[Correlation, ...]
    reliability: tuple[Reliability, ...] = ()
    notes: tuple[str, ...] = ()  # what the simulation could not do as asked (e.g. per channel)
    sampler: Sampler = Sampler.RANDOM
    threshold: Threshold = field(default_factory=Threshold)
    families: tuple[FamilySummary, ...] = ()
    default_predictor: Predictor = DEFAULT_PREDICTOR
    # The predictors computed (baselines only when asked), and what each cost: gradient passes, seconds.
    predictors: tuple[Predictor, ...] = tuple(p for p in Predictor if p not in ON_REQUEST)
    costs: Mapping[Predictor, Cost] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(not r.working for r in self.configs)

    def correlation(self, predictor: Predictor | str, measure: Measure | str) -> Correlation:
        for c in self.correlations:
            if c.predictor == predictor and c.measure == measure:
                return c
        raise FitonnxError(
            f"expected a predictor in {[p.value for p in Predictor]} and a measure in {list(self.measures)}"
        )

    @property
    def measures(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.measure for c in self.correlations))


def measures_of(results: Sequence[ConfigResult], float_accuracy: float | None) -> dict[Measure, np.ndarray]:
    """Each measure defined for every configuration, one value per configuration."""
    return measure_table(
        [r.kl for r in results], [r.dloss for r in results], [r.accuracy for r in results], float_accuracy
    )


def sample_configs(
    weights: Sequence[str],
    activations: Sequence[str],
    weight_bits: Sequence[Choice],
    activation_bits: Sequence[Choice],
    n: int,
    seed: int,
    uniform: bool = True,
) -> tuple[tuple[Config, bool], ...]:
    """The random sampler: ``n`` configurations with choices drawn uniformly per tensor, then (if
    asked) every tensor at b bits for each b both candidate lists share. Returns (configuration, is
    uniform) pairs."""
    rng = np.random.default_rng(seed)
    wb, ab = list(weight_bits), list(activation_bits)
    out: list[tuple[Config, bool]] = []
    for _ in range(n):
        w = {t: wb[int(rng.integers(len(wb)))] for t in weights}
        a = {t: ab[int(rng.integers(len(ab)))] for t in activations} if ab else {}
        out.append((Config(weight_bits=w, activation_bits=a), False))
    if uniform:
        shared = [b for b in wb if b in ab] if ab else wb
        for b in shared:
            out.append((Config({w: b for w in weights}, {a: b for a in activations} if ab else {}), True))
    return tuple(out)


def _nearest(choice: Choice, candidates: Sequence[Choice]) -> Choice:
    """The candidate closest in bits (the dearer one on a tie)."""
    return min(candidates, key=lambda c: (abs(cost_bits(c) - cost_bits(choice)), -cost_bits(c)))


def uniform_ladder(h: Harness, fam: Family) -> tuple[Config, ...]:
    """Every weight at each of the family's choices, cheapest first (activations at the nearest one)."""
    return tuple(
        Config(
            {w: c for w in h.weights},
            {a: _nearest(c, fam.activations) for a in h.activations} if fam.activations else {},
        )
        for c in fam.weights
    )


def budget_configs(
    h: Harness, fam: Family, band: tuple[int, int], n: int, rng: np.random.Generator
) -> tuple[Config, ...]:
    """``n`` configurations around budgets drawn uniformly in the band of the family's weight choices
    (indices ``band``): each tensor takes a choice near the budget (Gaussian weight in bits)."""
    lo, hi = band
    wc = fam.weights[lo : hi + 1]
    lo_bits, hi_bits = cost_bits(wc[0]), cost_bits(wc[-1])
    ac = [c for c in fam.activations if lo_bits - 1 <= cost_bits(c) <= hi_bits + 1] or list(fam.activations)

    def pick(cands: Sequence[Choice], budget: float) -> Choice:
        bits = np.array([cost_bits(c) for c in cands])
        p = np.exp(-0.5 * (bits - budget) ** 2 / _spread(bits) ** 2)
        return cands[int(rng.choice(len(cands), p=p / p.sum()))]

    out = []
    for _ in range(n):
        budget = float(rng.uniform(lo_bits, hi_bits))
        out.append(
            Config(
                {w: pick(wc, budget) for w in h.weights},
                {a: pick(ac, budget) for a in h.activations} if ac else {},
            )
        )
    return tuple(out)


def _spread(bits: np.ndarray) -> float:
    """The sampler's spread in bits: BUDGET_SPREAD, or half the widest gap between neighbouring
    choices (fp8 against fp16 is 8 bits apart: at 1 bit every tensor of a configuration took the
    same side and the family held only its uniform mixes)."""
    gaps = np.diff(np.unique(bits))
    return max(BUDGET_SPREAD, float(gaps.max()) / 2 if gaps.size else 0.0)


@dataclass(frozen=True)
class _Measured:
    config: Config
    uniform: bool
    damage: Damage


def _measure_all(
    h: Harness, configs: Sequence[tuple[Config, bool]], progress: Progress | None, workers: Workers | None
) -> list[_Measured]:
    """Measure every configuration (on ``workers``, if parallel), one progress step each."""
    bar = as_progress(progress)
    bar.start(len(configs), "Configurations")
    damages = measure_all(h, [config for config, _ in configs], workers, bar.advance)
    return [_Measured(c, u, d) for (c, u), d in zip(configs, damages, strict=True)]


def _band(ladder: Sequence[_Measured], threshold: Threshold) -> tuple[int, int]:
    """(cheapest working uniform level, dearest level); at least two levels wide when there are two."""
    top = len(ladder) - 1
    working = [k for k, m in enumerate(ladder) if threshold.works(m.damage)]
    lo = working[0] if working else top
    return (min(lo, max(top - 1, 0)), top)


def _family_configs(
    h: Harness, fam: Family, samp: SamplingOptions, seed: int, progress: Progress | None, workers: Workers | None
) -> tuple[list[_Measured], tuple[Choice, Choice] | None]:
    """The family's measured configurations (uniform ones first when asked) and the band drawn in."""
    if samp.sampler is Sampler.RANDOM:
        sampled = sample_configs(
            h.weights, h.activations, fam.weights, fam.activations, samp.configs, seed, samp.uniform
        )
        return _measure_all(h, sampled, progress, workers), None
    ladder = _measure_all(h, [(c, True) for c in uniform_ladder(h, fam)], progress, workers)
    lo, hi = _band(ladder, samp.threshold)
    drawn = budget_configs(h, fam, (lo, hi), samp.configs, np.random.default_rng(seed))
    measured = _measure_all(h, [(c, False) for c in drawn], progress, workers)
    return (ladder if samp.uniform else []) + measured, (fam.weights[lo], fam.weights[hi])


def _result(h: Harness, m: _Measured, fam: str, threshold: Threshold) -> ConfigResult:
    d = m.damage
    return ConfigResult(
        weight_bits=dict(m.config.weight_bits),
        activation_bits=dict(m.config.activation_bits),
        uniform=m.uniform,
        predicted=h.predict(m.config),
        kl=d.kl,
        dloss=d.dloss,
        accuracy=d.accuracy,
        family=fam,
        working=threshold.works(d),
        agreement=d.agreement,
    )


def _summary(
    h: Harness,
    fam: Family,
    measured: Sequence[_Measured],
    results: Sequence[ConfigResult],
    band: object,
    samp: SamplingOptions,
    seed: int,
) -> FamilySummary:
    float_acc = h.reference.accuracy
    ok = [k for k, r in enumerate(results) if r.working]
    work = [results[k] for k in ok]
    enough = len(work) >= MIN_WORKING
    per_sample = per_sample_measures(h.reference, [measured[k].damage for k in ok]) if enough else {}
    return FamilySummary(
        name=fam.name,
        weight_choices=fam.weights,
        activation_choices=fam.activations,
        band=band,  # type: ignore[arg-type]
        configs=len(results),
        rejected=len(results) - len(work),
        correlations=_correlations(results, float_acc, 0, seed),
        working=_correlations(work, float_acc, samp.resamples, seed) if enough else (),
        working_reliability=reliability(per_sample, seed=seed) if enough else (),
    )


def validate(
    model: ModelSource,
    data: DataSource = None,
    eval_data: EvalSource = None,
    *,
    simulation: SimulationOptions | None = None,
    sampling: SamplingOptions | None = None,
    options: FisherOptions | None = None,
    progress: Progress | None = None,
    session: api.Session | None = None,
) -> ValidationReport:
    """Simulate ``sampling.configs`` mixed-precision configurations per family (plus uniform ones)
    on held-out data and rank FIT and baselines against the damage each one does (``harness``
    explains the shared arguments; ``options.seed`` also draws the configurations and the bootstrap)."""
    samp = sampling or SamplingOptions()
    if samp.configs < 0:
        raise FitonnxError(f"expected a non-negative number of configurations; found {samp.configs}")
    opts = options or FisherOptions()
    seed = opts.seed
    asked = samp.baselines.baselines
    if samp.predictor in ON_REQUEST and Baseline(samp.predictor.value) not in asked:
        raise FitonnxError(
            f"expected the {samp.predictor} baseline asked for to lead with it; found baselines {list(asked)}",
            hint=f"add --baseline {samp.predictor}",
        )
    h = harness(
        model, data, eval_data, simulation=simulation, options=opts, progress=progress, session=session,
        baselines=samp.baselines,
    )  # fmt: skip
    return validate_harness(h, samp, seed, progress, opts.workers)


def validate_harness(
    h: Harness, samp: SamplingOptions, seed: int, progress: Progress | None = None, workers: Workers | None = None
) -> ValidationReport:
    """``validate`` on a harness already built (studies set several Fisher estimates beside one
    measurement: ``Harness.predict`` of another harness re-predicts the report's configurations);
    ``workers`` measure configurations in parallel."""
    measured: list[_Measured] = []
    results: list[ConfigResult] = []
    summaries = []
    for k, fam in enumerate(h.families):
        got, band = _family_configs(h, fam, samp, seed + k, progress, workers)
        rs = [_result(h, m, fam.name, samp.threshold) for m in got]
        summaries.append(_summary(h, fam, got, rs, band, samp, seed))
        measured += got
        results += rs
    return _report(h, samp, seed, measured, results, tuple(summaries))


def _report(
    h: Harness,
    samp: SamplingOptions,
    seed: int,
    measured: Sequence[_Measured],
    results: Sequence[ConfigResult],
    families: tuple[FamilySummary, ...],
) -> ValidationReport:
    s, ref = h.session, h.reference
    damages = [m.damage for m in measured]
    return ValidationReport(
        model=s.loaded.name,
        fisher=h.fisher.value,
        likelihood=h.target.likelihood.value,
        output=h.target.output,
        data_source=s.data.source,
        samples=h.samples,
        eval_source=h.held_out.source,
        eval_samples=h.held_out.num_samples,
        scheme=h.scheme,
        weight_bits=h.weight_bits,
        activation_bits=h.activation_bits,
        seed=seed,
        resamples=samp.resamples,
        float_loss=ref.loss,
        float_accuracy=ref.accuracy,
        configs=tuple(results),
        correlations=_correlations(results, ref.accuracy, samp.resamples, seed),
        reliability=reliability(per_sample_measures(ref, damages), seed=seed) if len(results) >= 3 else (),
        notes=tuple(dict.fromkeys((*h.simulator.notes, *_baseline_notes(h)))),
        sampler=samp.sampler,
        threshold=samp.threshold,
        families=families,
        default_predictor=Predictor(samp.predictor),
        predictors=tuple(h.tables.values),
        costs={p: h.cost(p) for p in h.tables.values},
    )


def _baseline_notes(h: Harness) -> list[str]:
    """What the report must say of the baselines computed (the Hessian's loss and probes)."""
    hs = h.hessian
    if hs is None:
        return []
    rel = np.median(hs.trace_se() / np.maximum(np.abs(hs.trace()), 1e-300)) if hs.estimates.shape[0] > 1 else np.nan
    return [
        f"hessian (HAWQ-v2): Hutchinson trace of the Hessian of the negative log-likelihood against {hs.labels} "
        f"over {hs.samples} calibration samples, {hs.estimates.shape[0]} Rademacher probes over all weights "
        f"at once (median relative standard error of a tensor's trace {rel:.2g}), central differences of "
        f"the gradient with steps of {hs.eps_scale:g} × each weight's RMS; weights only: activations contribute 0"
    ]


def _correlations(
    results: Sequence[ConfigResult], float_accuracy: float | None, resamples: int, seed: int
) -> tuple[Correlation, ...]:
    if len(results) < 2:
        return ()
    predictors = {p: np.array([r.predicted[p] for r in results]) for p in results[0].predicted}
    return rank_correlations(predictors, measures_of(results, float_accuracy), resamples, seed)
