"""Views of a ``CompareReport``: the terminal tables, the JSON report and the Pareto-front PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from fitonnx.analysis.compare import CompareReport, Leftover, ModelComparison, ModelResult, PairScore, ratio
from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text
from fitonnx.model.graph import Kind
from fitonnx.render.plot import label_fit_against_size, pyplot_or_none, save_png
from fitonnx.render.text import json_safe, short
from fitonnx.score.fit import TensorScore

TABLE_BITS = (4, 8)  # FIT columns of the terminal table (the JSON has every bit width)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_UNMATCHED_LINES = 12  # per model and comparison in the terminal; the JSON lists all


# --- terminal ----------------------------------------------------------------------------------


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _ops(p: PairScore) -> str:
    a, b = "+".join(sorted(set(p.a.op_types))), "+".join(sorted(set(p.b.op_types)))
    return a if a == b else f"{a}/{b}"


def _table_bits(report: CompareReport) -> tuple[int, ...]:
    shown = tuple(b for b in TABLE_BITS if b in report.bits)
    return shown or report.bits[:2]


def _pair_table(report: CompareReport, c: ModelComparison, la: str, lb: str) -> list[str]:
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
            f"{i:>3} {'W' if p.kind is Kind.WEIGHT else 'A':<4} {short(_ops(p), 11):<11} "
            f"{short(p.a.name, name_w):<{name_w}} {short(p.b.name, name_w):<{name_w}} "
            f"{short(_shape(p.a.shape), 14):<14} {short(_shape(p.b.shape), 14):<14} "
            f"{p.a.ef_trace:>9.4g} {p.b.ef_trace:>9.4g} {p.trace_ratio:>8.4f} {p.fit_ratio:>9.4f} "
            + " ".join(f"{x.fit[b]:>9.3g}" for b in bits for x in (p.a, p.b))
            + ("  " + "; ".join(p.notes) if p.notes else "")
        )
    return lines


def _agreement_lines(report: CompareReport, c: ModelComparison) -> list[str]:
    """Rank agreement of the FIT profiles and the largest trace difference of the pairs."""
    rk = c.rank
    lines = [
        f"rank agreement of the FIT profiles over {rk.pairs} pairs: Spearman ρ {rk.spearman:.3f}, "
        f"Kendall τ {rk.kendall:.3f}"
    ]
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
    return lines


def _unmatched_lines(letter: str, model: ModelResult, left: Sequence[Leftover]) -> list[str]:
    lines = []
    for u in left[:MAX_UNMATCHED_LINES]:
        t = u.tensor
        lines.append(
            f"unmatched in {letter} ({model.label}): {t.name} ({t.kind.value}, "
            f"{'+'.join(t.op_types)}, {_shape(t.shape)}, FIT share {100 * t.share:.1f}%): {u.reason}"
        )
    if len(left) > MAX_UNMATCHED_LINES:
        lines.append(f"... {len(left) - MAX_UNMATCHED_LINES} more unmatched in {letter} (see --json)")
    return lines


def _comparison_lines(report: CompareReport, c: ModelComparison, letters: Sequence[str]) -> list[str]:
    """One comparison: counts, the pair table, agreement, and the tensors left without a partner."""
    la, lb = letters[c.a], letters[c.b]
    n_w = sum(p.kind is Kind.WEIGHT for p in c.pairs)
    lines = [
        "",
        f"{lb} against {la}: {len(c.pairs)} pairs ({n_w} weights, {len(c.pairs) - n_w} activations); "
        f"unmatched: {len(c.unmatched_a)} in {la}, {len(c.unmatched_b)} in {lb}"
        + ("" if c.aligned else " (the graphs do not fully align: see the summary below)"),
    ]
    if c.pairs:
        lines += _pair_table(report, c, la, lb)
        lines += _agreement_lines(report, c)
    for letter, side, left in ((la, c.a, c.unmatched_a), (lb, c.b, c.unmatched_b)):
        lines += _unmatched_lines(letter, report.models[side], left)
    return lines


def _uniform_lines(report: CompareReport, letters: Sequence[str]) -> list[str]:
    lines = ["", "uniform configurations (total FIT; weight size at that width):"]
    head = f"{'config':<8} " + " ".join(f"{letter + ' FIT':>11} {letter + ' KB':>8}" for letter in letters)
    if len(report.models) > 1:
        head += " " + " ".join(f"{letter + '/' + letters[0]:>7}" for letter in letters[1:])
    lines.append(head)
    for k, (wb, ab, _) in enumerate(report.models[0].report.uniform):
        fits = [m.report.uniform[k][2] for m in report.models]
        row = f"{'W' + str(wb) + 'A' + str(ab):<8} " + " ".join(
            f"{f:>11.4g} {m.uniform_bytes(wb) / 1024:>8.1f}" for f, m in zip(fits, report.models, strict=True)
        )
        row += " " + " ".join(f"{ratio(f, fits[0]):>7.3f}" for f in fits[1:])
        lines.append(row)
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
        lines += _comparison_lines(report, c, letters)
    lines += _uniform_lines(report, letters)
    lines += ["", "summary (what compares models that do not align): size, and FIT along the Pareto front"]
    for letter, m in zip(letters, report.models, strict=True):
        lo, hi = m.front[0], m.front[-1]
        lines.append(
            f"{letter}: {m.weight_params} weight parameters, {m.activation_numel} activation elements per sample; "
            f"Pareto front (activations at {m.front_activation_bits} bits): {len(m.front)} points from "
            f"{lo[0] / 1024:.1f} KB (FIT {lo[1]:.3g}) to {hi[0] / 1024:.1f} KB (FIT {hi[1]:.3g})"
        )
    return "\n".join(lines)


# --- JSON --------------------------------------------------------------------------------------


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


def _unmatched(report: CompareReport, labels: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Per model, every tensor without a partner, against which model and why."""
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
    return unmatched


def _model_dict(m: ModelResult) -> dict[str, Any]:
    return {
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


def _comparison_dict(c: ModelComparison, labels: Sequence[str]) -> dict[str, Any]:
    worst = c.largest_trace_difference()
    return {
        "a": labels[c.a],
        "b": labels[c.b],
        "aligned": c.aligned,
        "pairs": len(c.pairs),
        "unmatched": {labels[c.a]: len(c.unmatched_a), labels[c.b]: len(c.unmatched_b)},
        "flagged": len(c.flagged),
        "max_trace_rel_diff": None if worst is None else abs(worst.trace_ratio - 1.0),
    }


def _pair_dict(c: ModelComparison, p: PairScore, labels: Sequence[str]) -> dict[str, Any]:
    return {
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


def to_dict(report: CompareReport) -> dict[str, Any]:
    """The JSON report (schema in README.md)."""
    labels = [m.label for m in report.models]
    return {
        "weight_bits": list(report.weight_bits),
        "activation_bits": list(report.activation_bits),
        "agree_tol": report.agree_tol,
        "models": [_model_dict(m) for m in report.models],
        "comparisons": [_comparison_dict(c, labels) for c in report.comparisons],
        "pairs": [_pair_dict(c, p, labels) for c in report.comparisons for p in c.pairs],
        "unmatched": _unmatched(report, labels),
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


def write_json(report: CompareReport, path: str | os.PathLike[str]) -> None:
    text = json_text(json_safe(to_dict(report)))
    write_atomic(path, lambda f: f.write(text))


# --- PNG ---------------------------------------------------------------------------------------


def write_plot(report: CompareReport, path: str | os.PathLike[str]) -> bool:
    """Every model's Pareto front and uniform configurations on one plot (log FIT against KB).

    Returns False, writing nothing, when matplotlib (the optional ``plot`` extra) is not installed.
    """
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
        label_fit_against_size(ax, "FIT against size; squares: uniform bit widths")
        save_png(fig, path)
    finally:
        plt.close(fig)
    return True
