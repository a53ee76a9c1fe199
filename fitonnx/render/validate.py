"""Views of a ``ValidationReport``: the terminal summary, the JSON report and the FIT-vs-damage PNG."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from fitonnx.analysis.damage import MEASURES, SECOND_ORDER_KL, Measure, Reliability
from fitonnx.analysis.predictors import PREDICTORS, Predictor
from fitonnx.analysis.validate import ConfigResult, FamilySummary, ValidationReport, measures_of
from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text
from fitonnx.render.plot import require_matplotlib, save_png
from fitonnx.render.text import finite, provenance_dict
from fitonnx.score.ranks import Correlation

# Above this median KL (nats per held-out sample) the report says the configurations are outside
# the second-order regime: KL ≈ ½δᵀFδ holds for KL well below 1.
LARGE_KL = SECOND_ORDER_KL
# Axis labels of the scatter's panels.
MEASURE_LABELS: dict[Measure, str] = {
    Measure.KL: "KL(float ‖ quantized)",
    Measure.DLOSS: "Δ loss",
    Measure.ACCURACY_DROP: "accuracy drop",
}
CELL_WIDTH = 30


# --- JSON --------------------------------------------------------------------------------------


def _config_dict(r: ConfigResult) -> dict[str, Any]:
    return {
        "weight_bits": dict(r.weight_bits),
        "activation_bits": dict(r.activation_bits),
        "uniform": r.uniform,
        **{p.value: v for p, v in r.predicted.items()},
        "kl": r.kl,
        "dloss": r.dloss,
        "accuracy": r.accuracy,
        "family": r.family,
        "working": r.working,
        "agreement": r.agreement,
    }


def _correlations_dict(correlations: tuple[Correlation, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    corr: dict[str, dict[str, dict[str, Any]]] = {}
    for c in correlations:
        corr.setdefault(c.measure, {})[c.predictor] = {
            "spearman": finite(c.spearman),
            "spearman_ci": [finite(v) for v in c.spearman_ci],
            "kendall": finite(c.kendall),
            "kendall_ci": [finite(v) for v in c.kendall_ci],
        }
    return corr


def _reliability_dict(rel: tuple[Reliability, ...]) -> dict[str, dict[str, Any]]:
    return {
        r.measure: {
            "split_half": finite(r.split_half),
            "full": finite(r.full),
            "ceiling": finite(r.ceiling),
            "splits": r.splits,
        }
        for r in rel
    }


def _family_dict(f: FamilySummary) -> dict[str, Any]:
    return {
        "name": f.name,
        "weight_choices": [str(c) for c in f.weight_choices],
        "activation_choices": [str(c) for c in f.activation_choices],
        "band": None if f.band is None else [str(c) for c in f.band],
        "configs": f.configs,
        "rejected": f.rejected,
        "correlation": _correlations_dict(f.correlations),
        "working_correlation": _correlations_dict(f.working),
        "working_reliability": _reliability_dict(f.working_reliability),
    }


def to_dict(report: ValidationReport) -> dict[str, Any]:
    """The JSON report (schema in docs/schemas/validate.schema.json); NaN (undefined correlation) is written as null."""
    return {
        **provenance_dict(report),
        "eval_data": report.eval_source,
        "eval_samples": report.eval_samples,
        "scheme": {"per_channel": report.scheme.per_channel, "symmetric": report.scheme.symmetric},
        "weight_bits": [str(c) if isinstance(c, str) else c for c in report.weight_bits],
        "activation_bits": [str(c) if isinstance(c, str) else c for c in report.activation_bits],
        "seed": report.seed,
        "resamples": report.resamples,
        "sampler": report.sampler.value,
        "threshold": {"min_agreement": report.threshold.min_agreement, "max_kl": report.threshold.max_kl},
        "default_predictor": report.default_predictor.value,
        "rejected": report.rejected,
        "float": {"loss": report.float_loss, "accuracy": report.float_accuracy},
        "predictors": {p.value: PREDICTORS[p] for p in report.predictors},
        "costs": {p.value: {"passes": c.passes, "seconds": c.seconds} for p, c in report.costs.items()},
        "measures": {m: MEASURES[Measure(m)] for m in report.measures},
        "configs": [_config_dict(r) for r in report.configs],
        "correlation": _correlations_dict(report.correlations),
        "families": [_family_dict(f) for f in report.families],
        "notes": list(report.notes),
        "reliability": _reliability_dict(report.reliability),
    }


def write_json(report: ValidationReport, path: str | os.PathLike[str]) -> None:
    text = json_text(to_dict(report))
    write_atomic(path, lambda f: f.write(text))


# --- terminal ----------------------------------------------------------------------------------


def _cell(c: Correlation, which: Callable[[Correlation], tuple[float, tuple[float, float]]]) -> str:
    value, (lo, hi) = which(c)
    if not math.isfinite(value):
        return "n/a"
    ci = "" if not (math.isfinite(lo) and math.isfinite(hi)) else f" [{lo:+.2f},{hi:+.2f}]"
    return f"{value:+.3f}{ci}"


def _setup_lines(report: ValidationReport) -> list[str]:
    """What was simulated, from which Fisher, the float model and the range of damage."""
    n_uniform = sum(r.uniform for r in report.configs)
    acts = ",".join(map(str, report.activation_bits)) or "none (float)"
    grid = report.scheme.describe() if all(isinstance(c, int) for c in report.weight_bits) else "named formats"
    lines = [
        f"{report.model}: {len(report.configs)} configurations ({len(report.configs) - n_uniform} "
        f"{report.sampler.value}-sampled, {n_uniform} uniform); weights {','.join(map(str, report.weight_bits))}, "
        f"activations {acts}; {grid}",
        f"working: {report.threshold.describe()}; {report.rejected} of {len(report.configs)} configurations past it "
        "(flagged, left out of the working-regime ρ)",
        f"{report.fisher} Fisher ({report.likelihood} on {report.output!r}) from {report.samples} samples of "
        f"{report.data_source}; damage measured on {report.eval_samples} samples of {report.eval_source}",
    ]
    floats = []
    if report.float_loss is not None:
        floats.append(f"float loss {report.float_loss:.4g}")
    if report.float_accuracy is not None:
        floats.append(f"float accuracy {100 * report.float_accuracy:.2f}%")
    if report.configs:
        kl = np.array([r.kl for r in report.configs])
        floats.insert(0, f"KL from {kl.min():.3g} to {kl.max():.3g}")
    if floats:
        lines.append("; ".join(floats))
    lines += [f"note: {note}" for note in report.notes]
    median_kl = float(np.median([r.kl for r in report.configs])) if report.configs else 0.0
    if median_kl > LARGE_KL:
        lines.append(
            f"note: the median configuration moves the outputs by KL {median_kl:.3g} nats per sample, far beyond the small "
            "perturbations FIT's second-order model describes, so these correlations say little about FIT "
            "(try --per-channel or higher --bits)"
        )
    return lines


def _correlation_table(
    report: ValidationReport, title: str, which: Callable[[Correlation], tuple[float, tuple[float, float]]]
) -> list[str]:
    head = f"{'predictor':<14}" + "".join(f"{m:>{CELL_WIDTH}}" for m in report.measures)
    lines = ["", title, head, "-" * len(head)]
    for p in report.predictors:
        cells = [_cell(report.correlation(p, m), which) for m in report.measures]
        lines.append(f"{p:<14}" + "".join(f"{cell:>{CELL_WIDTH}}" for cell in cells))
    return lines


def _reliability_lines(report: ValidationReport) -> list[str]:
    if not report.reliability:
        return []
    return [
        "",
        f"Measurement reliability (rank agreement of two random halves of the held-out data, mean of "
        f"{report.reliability[0].splits} splits; whole set by Spearman–Brown; ceiling = √whole, about the "
        "most any predictor can show against this measurement)",
        *(
            f"  {r.measure:<14} halves {r.split_half:+.3f}   whole {r.full:+.3f}   ceiling {r.ceiling:.3f}"
            for r in report.reliability
        ),
    ]


def _family_lines(report: ValidationReport) -> list[str]:
    """Per family: its band, configurations, how many past the threshold, ρ(·, KL) of the lead
    predictor over all configurations, and over the working ones beside the paper's FIT, the best
    other predictor and the working configurations' ceiling."""
    if not report.families:
        return []
    lead = report.default_predictor
    head = (
        f"{'family':<16}{'band':>18}{'configs':>9}{'past':>6}{'all ' + lead.value:>18}"
        f"{'working ' + lead.value:>22}{'working fit':>13}{'best other (working)':>30}{'ceiling':>9}"
    )
    lines = ["", f"Spearman ρ with KL per family (lead predictor {lead.value}; the paper's FIT beside it)", head]
    lines.append("-" * len(head))

    def rho(corrs: tuple[Correlation, ...], p: Predictor) -> float:
        return next((c.spearman for c in corrs if c.predictor == p and c.measure == Measure.KL), float("nan"))

    def cell(v: float) -> str:
        return f"{v:+.3f}" if math.isfinite(v) else "n/a"

    for f in report.families:
        band = "random" if f.band is None else f"{f.band[0]}..{f.band[1]}"
        ceiling = next((r.ceiling for r in f.working_reliability if r.measure == Measure.KL), float("nan"))
        others = [(rho(f.working, p), p) for p in report.predictors if p not in (lead, Predictor.FIT)]
        best = max((o for o in others if math.isfinite(o[0])), default=None, key=lambda o: o[0])
        best_cell = "n/a" if best is None else f"{best[1].value} {best[0]:+.3f}"
        lines.append(
            f"{f.name:<16}{band:>18}{f.configs:>9}{f.rejected:>6}{cell(rho(f.correlations, lead)):>18}"
            f"{cell(rho(f.working, lead)):>22}{cell(rho(f.working, Predictor.FIT)):>13}{best_cell:>30}{cell(ceiling):>9}"
        )
    return lines


def _cost_lines(report: ValidationReport) -> list[str]:
    """Each predictor's cost: forward+backward passes of a gradient graph and seconds (0: data-free)."""
    if not report.costs:
        return []
    lines = ["", "Cost of each predictor (forward+backward passes over calibration samples, seconds)"]
    for p, c in report.costs.items():
        lines.append(
            f"  {p.value:<14}{c.passes:>9} passes {c.seconds:>9.1f} s" if c.passes else f"  {p.value:<14}data-free"
        )
    return lines


def format_report(report: ValidationReport) -> str:
    """The terminal summary: set-up, range of damage, the per-family summary and the correlation table."""
    lines = _setup_lines(report)
    if not report.correlations:
        lines.append("too few configurations for rank correlations")
        return "\n".join(lines)
    lines += _family_lines(report)
    lines += _correlation_table(
        report,
        f"Spearman ρ, all configurations pooled [95% bootstrap CI over configurations, {report.resamples} resamples]",
        lambda c: (c.spearman, c.spearman_ci),
    )
    lines += _correlation_table(report, "Kendall τ-b", lambda c: (c.kendall, c.kendall_ci))
    lines += _reliability_lines(report)
    lines += _cost_lines(report)
    lines.append("")
    lines += [f"  {p}: {PREDICTORS[p]}" for p in report.predictors]
    lines += [f"  {m}: {MEASURES[Measure(m)]}" for m in report.measures]
    return "\n".join(lines)


# --- PNG ---------------------------------------------------------------------------------------


def scatter(report: ValidationReport, path: str | os.PathLike[str]) -> None:
    """The default predictor against each measured damage (KL, Δloss, accuracy drop), one panel
    each, ρ in the title (the paper's FIT's ρ beside it).

    Log axes where every value is positive (FIT and KL always are); uniform configurations are
    drawn as squares labelled with their bit width.
    """
    plt = require_matplotlib()
    lead = report.default_predictor
    fit = np.array([r.predicted[lead] for r in report.configs])
    panels = measures_of(report.configs, report.float_accuracy)
    uniform = np.array([r.uniform for r in report.configs], bool)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (measure, y) in zip(axes[0], panels.items(), strict=True):
        label = MEASURE_LABELS[measure]
        ax.scatter(fit[~uniform], y[~uniform], s=14, alpha=0.7, label="random")
        ax.scatter(fit[uniform], y[uniform], s=30, marker="s", color="C3", label="uniform")
        for r, x, v in zip(report.configs, fit, y, strict=True):
            if r.uniform:
                b = next(iter(r.weight_bits.values()), next(iter(r.activation_bits.values()), None))
                ax.annotate(f"{b}b", (x, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        if np.all(y > 0):
            ax.set_yscale("log")
        ax.set_xlabel(lead.value)
        ax.set_ylabel(label)
        title = label
        if report.correlations:
            c = report.correlation(lead, measure)
            paper = report.correlation(Predictor.FIT, measure)
            title = f"{label}\nSpearman ρ = {c.spearman:.3f}, Kendall τ = {c.kendall:.3f} (fit: ρ {paper.spearman:.3f})"
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report.model}: {len(report.configs)} configurations, {report.fisher} Fisher", fontsize=10, y=1.04)
    try:
        save_png(fig, path)
    finally:
        plt.close(fig)
