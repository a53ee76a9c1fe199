"""``fitonnx compare``: several models side by side, tensor by tensor where their graphs align.

Typical use: one network exported by PyTorch, TensorFlow, JAX or PaddlePaddle. The exports differ
in names, layouts and op choices but compute the same function with the same weights, so each
aligned pair of tensors must have the same Fisher trace and range (the empirical Fisher over the
same samples and labels is the same number up to float rounding); a pair that disagrees is named.
Models that do not align (two architectures for one task) are compared by their totals: FIT of
uniform configurations against weight size, and their Pareto fronts.

The first model is the reference: every other model is compared with it. The views of the
report are in ``fitonnx.render.compare``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.allocate.knapsack import Item, pareto_front, weight_bytes
from fitonnx.analysis import align as align_mod
from fitonnx.errors import FitonnxError
from fitonnx.fisher import session as api
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.graph import Kind
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.progress import Progress
from fitonnx.score.fit import DEFAULT_ACTIVATION_BITS, DEFAULT_WEIGHT_BITS, ScoreReport, TensorScore
from fitonnx.score.ranks import kendall, spearman
from fitonnx.score.run import score_model

DEFAULT_AGREE_TOL = 0.01  # same function, same weights, same samples: traces agree to float rounding
FRONT_TOLERANCE = 0.01  # ε of the approximate Pareto front (allocate.pareto_front)
FRONT_POINTS = 200  # at most this many front points are kept per model


@dataclass(frozen=True)
class ModelResult:
    """One model's score and the totals the summary compares across architectures."""

    label: str
    report: ScoreReport
    weight_params: int
    activation_numel: int  # elements per sample over all quantizable activations
    front_activation_bits: int  # activations sit at this width along the front
    front: tuple[tuple[int, float], ...]  # (weight bytes, total FIT), size ascending

    def uniform_bytes(self, bits: int) -> int:
        return weight_bytes(self.weight_params * bits)


@dataclass(frozen=True)
class PairScore:
    """Two tensors, one per model, that play the same role, with both scores."""

    kind: Kind
    a: TensorScore
    b: TensorScore
    op_a: str
    op_b: str
    notes: tuple[str, ...]  # what differs beyond the agreement tolerance; empty when they agree

    @property
    def trace_ratio(self) -> float:
        return ratio(self.b.ef_trace, self.a.ef_trace)

    @property
    def fit_ratio(self) -> float:
        """FIT of B over FIT of A: the same at every bit width, since Δ(b)² scales both alike."""
        return ratio(self.b.ef_trace * (self.b.max - self.b.min) ** 2, self.a.ef_trace * (self.a.max - self.a.min) ** 2)


@dataclass(frozen=True)
class Leftover:
    """A tensor without a partner in the other model, and why."""

    tensor: TensorScore
    reason: str


@dataclass(frozen=True)
class RankAgreement:
    """How alike the sensitivity profiles are: rank correlations of FIT over the pairs."""

    pairs: int
    spearman: float
    kendall: float


@dataclass(frozen=True)
class ModelComparison:
    """Model ``b`` against model ``a`` (indices into ``CompareReport.models``)."""

    a: int
    b: int
    pairs: tuple[PairScore, ...]  # in data-flow order
    unmatched_a: tuple[Leftover, ...]
    unmatched_b: tuple[Leftover, ...]
    rank: RankAgreement

    @property
    def aligned(self) -> bool:
        """Every quantizable tensor of both models has a partner."""
        return bool(self.pairs) and not self.unmatched_a and not self.unmatched_b

    @property
    def flagged(self) -> tuple[PairScore, ...]:
        return tuple(p for p in self.pairs if p.notes)

    def largest_trace_difference(self) -> PairScore | None:
        finite = [p for p in self.pairs if math.isfinite(p.trace_ratio)]
        return max(finite, key=lambda p: abs(p.trace_ratio - 1.0), default=None)


@dataclass(frozen=True)
class CompareReport:
    """The result of ``fitonnx compare``."""

    models: tuple[ModelResult, ...]
    comparisons: tuple[ModelComparison, ...]
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    agree_tol: float

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.weight_bits) | set(self.activation_bits)))


def ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 1.0 if num == 0.0 else math.inf
    return num / den


def open_models(
    models: Sequence[ModelSource], data: Sequence[DataSource] | None = None, max_samples: int | None = None
) -> tuple[api.Session, ...]:
    """Open every model with its data: one source for all, one per model, or none (bundled sidecars);
    ``max_samples`` bounds what is read of each (``fisher.session.open_model``)."""
    if len(models) < 2:
        raise FitonnxError(f"expected at least 2 models to compare; found {len(models)}")
    sources = list(data) if data else [None]
    if len(sources) not in (1, len(models)):
        raise FitonnxError(
            f"expected 1 or {len(models)} --data values; found {len(sources)}",
            hint="give one --data for all models, or one per model in the order of the models",
        )
    if len(sources) == 1:
        sources = sources * len(models)
    return tuple(api.open_model(m, d, max_samples=max_samples) for m, d in zip(models, sources, strict=True))


def _labels(sessions: Sequence[api.Session]) -> list[str]:
    names = [s.loaded.name for s in sessions]
    return [name if names.count(name) == 1 else f"{name}#{i + 1}" for i, name in enumerate(names)]


def _front(report: ScoreReport, activation_bits: int) -> tuple[tuple[int, float], ...]:
    """The FIT-against-weight-size front (ε-approximate), activations held at ``activation_bits``."""
    weights = [t for t in report.tensors if t.kind is Kind.WEIGHT]
    act_fit = sum(t.fit[activation_bits] for t in report.tensors if t.kind is Kind.ACTIVATION)
    items = [
        Item(name=t.name, numel=t.numel, bits=report.weight_bits, fit=tuple(t.fit[b] for b in report.weight_bits))
        for t in weights
    ]
    front = pareto_front(items, tolerance=FRONT_TOLERANCE)
    keep = np.arange(len(front))
    if len(front) > FRONT_POINTS:
        keep = np.unique(np.linspace(0, len(front) - 1, FRONT_POINTS).round().astype(np.int64))
    return tuple((weight_bytes(int(front.sizes[i])), float(front.fits[i]) + act_fit) for i in keep)


def _model_result(label: str, report: ScoreReport) -> ModelResult:
    act_bits = min(report.activation_bits)
    return ModelResult(
        label=label,
        report=report,
        weight_params=sum(t.numel for t in report.tensors if t.kind is Kind.WEIGHT),
        activation_numel=sum(t.numel for t in report.tensors if t.kind is Kind.ACTIVATION),
        front_activation_bits=act_bits,
        front=_front(report, act_bits),
    )


def _notes(a: TensorScore, b: TensorScore, tol: float) -> tuple[str, ...]:
    notes: list[str] = []
    trace = ratio(b.ef_trace, a.ef_trace) - 1.0
    if abs(trace) > tol:
        notes.append(f"trace {trace:+.1%}")
    span = ratio(b.max - b.min, a.max - a.min) - 1.0
    if abs(span) > tol:
        notes.append(f"range {span:+.1%} ([{a.min:.3g}, {a.max:.3g}] vs [{b.min:.3g}, {b.max:.3g}])")
    if a.numel != b.numel:
        notes.append(f"{a.numel} vs {b.numel} elements")
    return tuple(notes)


def _compare_pair(
    base: api.Session, base_report: ScoreReport, s: api.Session, r: ScoreReport, k: int, agree_tol: float
) -> ModelComparison:
    """Model ``k`` against the first: its aligned pairs, leftovers and the rank agreement of FIT."""
    al = align_mod.align(base.prepared.model, base.tensors, s.prepared.model, s.tensors)
    pairs = tuple(
        PairScore(
            kind=m.kind,
            a=base_report.tensor(m.a),
            b=r.tensor(m.b),
            op_a=m.op_a,
            op_b=m.op_b,
            notes=_notes(base_report.tensor(m.a), r.tensor(m.b), agree_tol),
        )
        for m in al.pairs
    )
    bit = base_report.bits[0]
    fa = np.array([p.a.fit[bit] for p in pairs])
    fb = np.array([p.b.fit[bit] for p in pairs])
    return ModelComparison(
        a=0,
        b=k,
        pairs=pairs,
        unmatched_a=tuple(Leftover(base_report.tensor(u.name), u.reason) for u in al.unpaired_a),
        unmatched_b=tuple(Leftover(r.tensor(u.name), u.reason) for u in al.unpaired_b),
        rank=RankAgreement(pairs=len(pairs), spearman=spearman(fa, fb), kendall=kendall(fa, fb)),
    )


def compare_scored(
    sessions: Sequence[api.Session], reports: Sequence[ScoreReport], *, agree_tol: float = DEFAULT_AGREE_TOL
) -> CompareReport:
    """Align every model with the first and put their scores side by side."""
    if agree_tol < 0 or not math.isfinite(agree_tol):
        raise FitonnxError(f"expected an agreement tolerance >= 0; found {agree_tol}")
    bits = {(r.weight_bits, r.activation_bits) for r in reports}
    if len(bits) != 1:
        raise FitonnxError(f"expected every model scored with the same bit widths; found {sorted(bits)}")
    labels = _labels(sessions)
    models = tuple(_model_result(label, r) for label, r in zip(labels, reports, strict=True))
    comparisons = tuple(
        _compare_pair(sessions[0], reports[0], sessions[k], reports[k], k, agree_tol) for k in range(1, len(sessions))
    )
    return CompareReport(
        models=models,
        comparisons=comparisons,
        weight_bits=reports[0].weight_bits,
        activation_bits=reports[0].activation_bits,
        agree_tol=agree_tol,
    )


def compare(
    models: Sequence[ModelSource],
    data: Sequence[DataSource] | None = None,
    *,
    options: FisherOptions | None = None,
    weight_bits: Sequence[int] = DEFAULT_WEIGHT_BITS,
    activation_bits: Sequence[int] = DEFAULT_ACTIVATION_BITS,
    agree_tol: float = DEFAULT_AGREE_TOL,
    progress: Progress | None = None,
    sessions: Sequence[api.Session] | None = None,
) -> CompareReport:
    """Score every model (same ``options`` for all) and compare each with the first.

    ``data``: one source used for all models, one per model in order, or None for each model's
    bundled ``<model>.calib.npz``. For a fair comparison give every model the same samples in
    the same order (and the same labels), each in that model's own input layout.
    """
    max_samples = None if options is None else options.max_samples
    opened = tuple(sessions) if sessions is not None else open_models(models, data, max_samples)
    reports = [
        score_model(
            s.loaded,
            session=s,
            options=options,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            progress=progress,
        )
        for s in opened
    ]
    return compare_scored(opened, reports, agree_tol=agree_tol)
