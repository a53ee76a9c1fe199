"""``fitonnx compare``: several models side by side, tensor by tensor where their graphs align.

Typical use: one network exported by PyTorch, TensorFlow, JAX or PaddlePaddle. The exports differ
in names, layouts and op choices but compute the same function with the same weights, so each
aligned pair of tensors must have the same Fisher trace and range (the empirical Fisher over the
same samples and labels is the same number up to float rounding); a pair that disagrees is named.
Models that do not align (two architectures for one task) are compared by their totals: FIT of
uniform configurations against weight size, and their Pareto fronts.

The first model is the reference: every other model is compared with it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fitonnx.allocate.knapsack import Item, pareto_front, weight_bytes
from fitonnx.analysis import align as align_mod
from fitonnx.errors import FitonnxError
from fitonnx.files.atomic import write_atomic
from fitonnx.fisher import session as api
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.graph import Kind
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.progress import Progress
from fitonnx.score.fit import DEFAULT_ACTIVATION_BITS, DEFAULT_WEIGHT_BITS, ScoreReport, TensorScore
from fitonnx.score.ranks import kendall, spearman
from fitonnx.score.run import score_model

DEFAULT_AGREE_TOL = 0.01  # same function, same weights, same samples: traces agree to float rounding
TABLE_BITS = (4, 8)  # FIT columns of the terminal table (the JSON has every bit width)
FRONT_TOLERANCE = 0.01  # ε of the approximate Pareto front (allocate.pareto_front)
FRONT_POINTS = 200  # at most this many front points are kept per model
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_UNMATCHED_LINES = 12  # per model and comparison in the terminal; the JSON lists all


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
        return _ratio(self.b.ef_trace, self.a.ef_trace)

    @property
    def fit_ratio(self) -> float:
        """FIT of B over FIT of A: the same at every bit width, since Δ(b)² scales both alike."""
        return _ratio(
            self.b.ef_trace * (self.b.max - self.b.min) ** 2, self.a.ef_trace * (self.a.max - self.a.min) ** 2
        )


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
class Comparison:
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
    comparisons: tuple[Comparison, ...]
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    agree_tol: float

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.weight_bits) | set(self.activation_bits)))


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 1.0 if num == 0.0 else math.inf
    return num / den


def open_models(models: Sequence[ModelSource], data: Sequence[DataSource] | None = None) -> tuple[api.Session, ...]:
    """Open every model with its data: one source for all, one per model, or none (bundled sidecars)."""
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
    return tuple(api.open_model(m, d) for m, d in zip(models, sources, strict=True))


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
    trace = _ratio(b.ef_trace, a.ef_trace) - 1.0
    if abs(trace) > tol:
        notes.append(f"trace {trace:+.1%}")
    span = _ratio(b.max - b.min, a.max - a.min) - 1.0
    if abs(span) > tol:
        notes.append(f"range {span:+.1%} ([{a.min:.3g}, {a.max:.3g}] vs [{b.min:.3g}, {b.max:.3g}])")
    if a.numel != b.numel:
        notes.append(f"{a.numel} vs {b.numel} elements")
    return tuple(notes)


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
    base, base_report = sessions[0], reports[0]
    comparisons: list[Comparison] = []
    for k in range(1, len(sessions)):
        s, r = sessions[k], reports[k]
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
        comparisons.append(
            Comparison(
                a=0,
                b=k,
                pairs=pairs,
                unmatched_a=tuple(Leftover(base_report.tensor(u.name), u.reason) for u in al.unpaired_a),
                unmatched_b=tuple(Leftover(r.tensor(u.name), u.reason) for u in al.unpaired_b),
                rank=RankAgreement(
                    pairs=len(pairs),
                    spearman=spearman(fa, fb),
                    kendall=kendall(fa, fb),
                ),
            )
        )
    return CompareReport(
        models=models,
        comparisons=tuple(comparisons),
        weight_bits=base_report.weight_bits,
        activation_bits=base_report.activation_bits,
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
    opened = tuple(sessions) if sessions is not None else open_models(models, data)
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


# --- rendering -------------------------------------------------------------------------------


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _ops(p: PairScore) -> str:
    a, b = "+".join(sorted(set(p.a.op_types))), "+".join(sorted(set(p.b.op_types)))
    return a if a == b else f"{a}/{b}"


def _table_bits(report: CompareReport) -> tuple[int, ...]:
    shown = tuple(b for b in TABLE_BITS if b in report.bits)
    return shown or report.bits[:2]


def _pair_table(report: CompareReport, c: Comparison, la: str, lb: str) -> list[str]:
    bits = _table_bits(report)
    name_w = min(32, max([4] + [len(p.a.name) for p in c.pairs] + [len(p.b.name) for p in c.pairs]))
    head = (
        f"{'#':>3} {'kind':<4} {'op':<11} {'in ' + la:<{name_w}} {'in ' + lb:<{name_w}} {'shape ' + la:<14} "
        f"{'shape ' + lb:<14} {'trace ' + la:>9} {'trace ' + lb:>9} {lb + '/' + la + ' tr':>8} {lb + '/' + la + ' FIT':>9} "
        + " ".join(f"{x + ' FIT@' + str(b):>9}" for b in bits for x in (la, lb))
        + "  notes"
    )
    lines = [head, "-" * len(head)]
    for i, p in enumerate(c.pairs, 1):
        lines.append(
            f"{i:>3} {'W' if p.kind is Kind.WEIGHT else 'A':<4} {_short(_ops(p), 11):<11} "
            f"{_short(p.a.name, name_w):<{name_w}} {_short(p.b.name, name_w):<{name_w}} "
            f"{_short(_shape(p.a.shape), 14):<14} {_short(_shape(p.b.shape), 14):<14} "
            f"{p.a.ef_trace:>9.4g} {p.b.ef_trace:>9.4g} {p.trace_ratio:>8.4f} {p.fit_ratio:>9.4f} "
            + " ".join(f"{x.fit[b]:>9.3g}" for b in bits for x in (p.a, p.b))
            + ("  " + "; ".join(p.notes) if p.notes else "")
        )
    return lines


def format_table(report: CompareReport) -> str:
    """The terminal report: models, then per comparison the pair table, agreement and leftovers."""
    letters = [LETTERS[i % len(LETTERS)] for i in range(len(report.models))]
    lines: list[str] = []
    for letter, m in zip(letters, report.models, strict=True):
        r = m.report
        lines.append(
            f"{letter}: {m.label}: {r.fisher} Fisher ({r.likelihood} on {r.output!r}), {r.samples} samples "
            f"from {r.data_source} [{r.stop_reason}]"
        )
    for c in report.comparisons:
        la, lb = letters[c.a], letters[c.b]
        n_w = sum(p.kind is Kind.WEIGHT for p in c.pairs)
        lines += [
            "",
            f"{lb} against {la}: {len(c.pairs)} pairs ({n_w} weights, {len(c.pairs) - n_w} activations); "
            f"unmatched: {len(c.unmatched_a)} in {la}, {len(c.unmatched_b)} in {lb}"
            + ("" if c.aligned else " (the graphs do not fully align: see the summary below)"),
        ]
        if c.pairs:
            lines += _pair_table(report, c, la, lb)
            rk = c.rank
            lines.append(
                f"rank agreement of the FIT profiles over {rk.pairs} pairs: Spearman ρ {rk.spearman:.3f}, "
                f"Kendall τ {rk.kendall:.3f}"
            )
            worst = c.largest_trace_difference()
            if worst is not None:
                verdict = (
                    f"all pairs agree within {report.agree_tol:.0%} (trace and range)"
                    if not c.flagged
                    else f"{len(c.flagged)} pairs differ by more than {report.agree_tol:.0%}: see their notes"
                )
                lines.append(
                    f"largest relative trace difference: {worst.trace_ratio - 1:+.2e} ({worst.a.name} / "
                    f"{worst.b.name}); " + verdict
                )
        for letter, side, left in ((la, c.a, c.unmatched_a), (lb, c.b, c.unmatched_b)):
            for u in left[:MAX_UNMATCHED_LINES]:
                t = u.tensor
                lines.append(
                    f"unmatched in {letter} ({report.models[side].label}): {t.name} ({t.kind.value}, "
                    f"{'+'.join(t.op_types)}, {_shape(t.shape)}, FIT share {100 * t.share:.1f}%): {u.reason}"
                )
            if len(left) > MAX_UNMATCHED_LINES:
                lines.append(f"... {len(left) - MAX_UNMATCHED_LINES} more unmatched in {letter} (see --json)")
    lines += ["", "uniform configurations (total FIT; weight size at that width):"]
    head = f"{'config':<8} " + " ".join(f"{letter + ' FIT':>11} {letter + ' KB':>8}" for letter in letters)
    if len(report.models) > 1:
        head += " " + " ".join(f"{letter + '/' + letters[0]:>7}" for letter in letters[1:])
    lines.append(head)
    for k, (wb, ab, _) in enumerate(report.models[0].report.uniform):
        fits = [m.report.uniform[k][2] for m in report.models]
        row = f"{'W' + str(wb) + 'A' + str(ab):<8} " + " ".join(
            f"{f:>11.4g} {m.uniform_bytes(wb) / 1024:>8.1f}" for f, m in zip(fits, report.models, strict=True)
        )
        row += " " + " ".join(f"{_ratio(f, fits[0]):>7.3f}" for f in fits[1:])
        lines.append(row)
    lines += ["", "summary (what compares models that do not align): size, and FIT along the Pareto front"]
    for letter, m in zip(letters, report.models, strict=True):
        lo, hi = m.front[0], m.front[-1]
        lines.append(
            f"{letter}: {m.weight_params} weight parameters, {m.activation_numel} activation elements per sample; "
            f"Pareto front (activations at {m.front_activation_bits} bits): {len(m.front)} points from "
            f"{lo[0] / 1024:.1f} KB (FIT {lo[1]:.3g}) to {hi[0] / 1024:.1f} KB (FIT {hi[1]:.3g})"
        )
    return "\n".join(lines)


def _tensor_side(t: TensorScore) -> dict[str, Any]:
    return {
        "name": t.name,
        "op_types": list(t.op_types),
        "shape": list(t.shape),
        "trace": t.ef_trace,
        "trace_se": t.ef_trace_se,
        "min": t.min,
        "max": t.max,
        "fit": {str(b): v for b, v in t.fit.items()},
    }


def to_dict(report: CompareReport) -> dict[str, Any]:
    """The JSON report (schema in README.md)."""
    labels = [m.label for m in report.models]
    unmatched: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for c in report.comparisons:
        for side, other, left in ((c.a, c.b, c.unmatched_a), (c.b, c.a, c.unmatched_b)):
            unmatched[labels[side]] += [
                {
                    "name": u.tensor.name,
                    "kind": u.tensor.kind.value,
                    "op_types": list(u.tensor.op_types),
                    "shape": list(u.tensor.shape),
                    "against": labels[other],
                    "reason": u.reason,
                }
                for u in left
            ]
    return {
        "weight_bits": list(report.weight_bits),
        "activation_bits": list(report.activation_bits),
        "agree_tol": report.agree_tol,
        "models": [
            {
                "label": m.label,
                "model": m.report.model,
                "data": m.report.data_source,
                "samples": m.report.samples,
                "fisher": m.report.fisher,
                "likelihood": m.report.likelihood,
                "output": m.report.output,
                "weight_params": m.weight_params,
                "activation_numel": m.activation_numel,
                "total_fit": {str(b): v for b, v in m.report.total_fit.items()},
                "pareto_activation_bits": m.front_activation_bits,
                "pareto": [{"weight_bytes": s, "fit": f} for s, f in m.front],
            }
            for m in report.models
        ],
        "comparisons": [
            {
                "a": labels[c.a],
                "b": labels[c.b],
                "aligned": c.aligned,
                "pairs": len(c.pairs),
                "unmatched": {labels[c.a]: len(c.unmatched_a), labels[c.b]: len(c.unmatched_b)},
                "flagged": len(c.flagged),
                "max_trace_rel_diff": None if (w := c.largest_trace_difference()) is None else abs(w.trace_ratio - 1.0),
            }
            for c in report.comparisons
        ],
        "pairs": [
            {
                "models": [labels[c.a], labels[c.b]],
                "a": p.a.name,
                "b": p.b.name,
                "kind": p.kind.value,
                "op_a": p.op_a,
                "op_b": p.op_b,
                "trace_ratio": p.trace_ratio,
                "fit_ratio": p.fit_ratio,
                "notes": list(p.notes),
                "a_score": _tensor_side(p.a),
                "b_score": _tensor_side(p.b),
            }
            for c in report.comparisons
            for p in c.pairs
        ],
        "unmatched": unmatched,
        "rank_agreement": [
            {
                "models": [labels[c.a], labels[c.b]],
                "pairs": c.rank.pairs,
                "spearman": c.rank.spearman,
                "kendall": c.rank.kendall,
            }
            for c in report.comparisons
        ],
        "uniform": [
            {
                "weight_bits": wb,
                "activation_bits": ab,
                "fit": {m.label: m.report.uniform[k][2] for m in report.models},
                "weight_bytes": {m.label: m.uniform_bytes(wb) for m in report.models},
            }
            for k, (wb, ab, _) in enumerate(report.models[0].report.uniform)
        ],
    }


def _json_safe(value: Any) -> Any:
    """NaN and infinity as null: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: CompareReport, path: str | os.PathLike[str]) -> None:
    text = json.dumps(_json_safe(to_dict(report)), indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text))


def write_plot(report: CompareReport, path: str | os.PathLike[str]) -> bool:
    """Every model's Pareto front and uniform configurations on one plot (log FIT against KB).

    Returns False, writing nothing, when matplotlib (the optional ``plot`` extra) is not installed.
    """
    from fitonnx.render.plot import pyplot_or_none, save_png

    plt = pyplot_or_none()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for k, m in enumerate(report.models):
            color = f"C{k % 10}"
            kb = [s / 1024 for s, _ in m.front]
            style = ("-", "--", ":", "-.")[k % 4]  # identical fronts (one network, two exporters) stay visible
            ax.step(kb, [f for _, f in m.front], where="post", color=color, ls=style, lw=1.2, label=f"{m.label} front")
            ab = m.front_activation_bits
            uni = [(m.uniform_bytes(w) / 1024, f, w) for w, a, f in m.report.uniform if a == ab]
            ax.scatter([u[0] for u in uni], [u[1] for u in uni], color=color, marker="s", zorder=3)
            for x, y, w in uni:
                ax.annotate(f"W{w}", (x, y), textcoords="offset points", xytext=(4, 4), color=color)
        if all(f > 0 for m in report.models for _, f in m.front):
            ax.set_yscale("log")
        ax.set_xlabel("weight size (KB)")
        ax.set_ylabel("FIT (weights + activations)")
        ax.set_title("FIT against size; squares: uniform bit widths")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save_png(fig, path)
    finally:
        plt.close(fig)
    return True
