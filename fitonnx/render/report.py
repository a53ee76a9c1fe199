"""Render reports: terminal table, JSON and CSV, written atomically."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text
from fitonnx.render.text import name_width, provenance_dict, short
from fitonnx.score.fit import ScoreReport, TensorScore


def to_dict(report: ScoreReport) -> dict[str, Any]:
    """The JSON report (schema in README.md)."""
    return {
        **provenance_dict(report),
        "stop_reason": report.stop_reason,
        "engine": report.engine,
        "device": report.device,
        "batch_size": report.batch_size,
        "batch_note": report.batch_note or None,
        "weight_bits": list(report.weight_bits),
        "activation_bits": list(report.activation_bits),
        "noise_model": report.noise_model,
        "total_trace_rel_se": report.total_trace_rel_se,
        "tensors": [
            {
                "name": t.name,
                "kind": t.kind.value,
                "nodes": list(t.nodes),
                "op_types": list(t.op_types),
                "shape": list(t.shape),
                "numel": t.numel,
                "ef_trace": t.ef_trace,
                "ef_trace_se": t.ef_trace_se,
                "min": t.min,
                "max": t.max,
                "fit": {str(b): v for b, v in t.fit.items()},
                "share": t.share,
                "formats": {
                    name: {"axis": f.axis, "fit": f.expected, "measured": f.measured, "bits_per_element": f.bits}
                    for name, f in t.formats.items()
                },
            }
            for t in report.tensors
        ],
        "total_fit": {str(b): v for b, v in report.total_fit.items()},
        "formats": list(report.formats),
        "format_totals": dict(report.format_totals),
        "notes": list(report.notes),
        "sample_advice": sample_advice(report),
        "uniform": [{"weight_bits": w, "activation_bits": a, "fit": f} for w, a, f in report.uniform],
        "ranking_stability": None
        if report.stability is None
        else {
            "resamples": report.stability.resamples,
            "kendall_tau_mean": report.stability.kendall_tau_mean,
            "kendall_tau_p05": report.stability.kendall_tau_p05,
            "top_k": report.stability.top_k,
            "top_k_same": report.stability.top_k_same,
        },
    }


def write_json(report: ScoreReport, path: str | os.PathLike[str]) -> None:
    text = json_text(to_dict(report))
    write_atomic(path, lambda f: f.write(text))


CSV_FIELDS = ["name", "kind", "op_types", "nodes", "shape", "numel", "ef_trace", "ef_trace_se", "min", "max"]


def write_csv(report: ScoreReport, path: str | os.PathLike[str]) -> None:
    def write(f: io.TextIOBase) -> None:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS + [f"fit_{b}" for b in report.bits] + ["share"] + [f"fit_{n}" for n in report.formats])
        for t in report.tensors:
            w.writerow(
                [t.name, t.kind.value, ";".join(t.op_types), ";".join(t.nodes), "x".join(map(str, t.shape)), t.numel]
                + [repr(t.ef_trace), repr(t.ef_trace_se), repr(t.min), repr(t.max)]
                + [repr(t.fit[b]) for b in report.bits]
                + [repr(t.share)]
                + [repr(t.formats[n].expected) if n in t.formats else "" for n in report.formats]
            )

    write_atomic(path, write)


STABLE_TOP_K = 0.95  # the top-k set is called stable when this share of bootstrap resamples keeps it


def sample_advice(report: ScoreReport) -> str | None:
    """More calibration samples, when the ranking's top-k set changes under resampling."""
    s = report.stability
    if s is None or s.top_k_same >= STABLE_TOP_K:
        return None
    return (
        f"the top-{s.top_k} set is unstable (unchanged in {100 * s.top_k_same:.0f}% of resamples, under "
        f"{100 * STABLE_TOP_K:.0f}%): score more calibration samples (at least {2 * report.samples}) before acting "
        "on the ranking"
    )


# (header, width, alignment, cell of a tensor, drop order: 0 never, else the lowest is dropped first)
Column = tuple[str, int, str, object, int]


def _columns(report: ScoreReport) -> list[Column]:
    """The columns after the name, in the table's order."""
    return [
        ("kind", 4, "<", lambda t: "W" if t.kind.value == "weight" else "A", 0),
        ("op", 10, "<", lambda t: short(",".join(sorted(set(t.op_types))), 10), 4),
        ("shape", 16, "<", lambda t: short("x".join(map(str, t.shape)), 16), 3),
        ("trace", 9, ">", lambda t: f"{t.ef_trace:.3g}", 6),
        ("±se", 8, ">", lambda t: f"{t.ef_trace_se:.2g}", 5),
        ("min", 8, ">", lambda t: f"{t.min:.3g}", 1),
        ("max", 8, ">", lambda t: f"{t.max:.3g}", 2),
        ("share", 6, ">", lambda t: f"{100 * t.share:.1f}%", 0),
        *[(f"FIT@{b}", 9, ">", lambda t, b=b: f"{t.fit[b]:.3g}", 0) for b in report.bits],
        *[(n, max(9, len(n)), ">", lambda t, n=n: _format_cell(t, n), 0) for n in report.formats],
    ]


def _format_cell(t: TensorScore, name: str) -> str:
    """A tensor's FIT under format ``name`` (its noise model), or '-' where the format does not apply."""
    return f"{t.formats[name].expected:.3g}" if name in t.formats else "-"


def _fit_columns(cols: list[Column], names: list[str], width: int | None) -> tuple[list[Column], int]:
    """Drop optional columns (min and max first; never kind, share or FIT) until the table fits ``width``."""
    while True:
        rest = sum(1 + c[1] for c in cols)
        name_w = name_width(names, rest, width)
        optional = [c for c in cols if c[4]]
        if width is None or name_w + rest <= width or not optional:
            return cols, name_w
        drop = min(optional, key=lambda c: c[4])
        cols = [c for c in cols if c is not drop]


def format_table(report: ScoreReport, limit: int | None = None, width: int | None = None) -> str:
    """The terminal table: most sensitive first, FIT per bit width and its share of the total. With
    ``width`` (the terminal's), columns after FIT are dropped and names cut from the left (with …) to
    fit; with None every column and whole names (``--wide``; JSON/CSV always have whole names)."""
    cols, name_w = _fit_columns(_columns(report), [t.name for t in report.tensors], width)
    head = f"{'tensor':<{name_w}}" + "".join(f" {h:{a}{w}}" for h, w, a, _, _ in cols)
    lines = [
        f"{report.model}: {report.fisher} Fisher ({report.likelihood} on {report.output!r}), "
        f"{report.samples} samples from {report.data_source} [{report.stop_reason}]"
        + ("" if report.noise_model == "uniform" else f"; {report.noise_model} noise model")
        + (f"; {report.engine} engine on {report.device}, batch {report.batch_size}" if report.engine else "")
        + (f" ({report.batch_note})" if report.engine and report.batch_note else ""),
        head,
        "-" * len(head),
    ]
    for t in report.tensors if limit is None else report.tensors[:limit]:
        lines.append(f"{short(t.name, name_w):<{name_w}}" + "".join(f" {cell(t):{a}{w}}" for _, w, a, cell, _ in cols))
    if limit is not None and len(report.tensors) > limit:
        lines.append(f"... {len(report.tensors) - limit} more (see --json/--csv)")
    lines.append("")
    lines.append(
        "total FIT, every tensor at b bits: " + ", ".join(f"{b}b {v:.4g}" for b, v in report.total_fit.items())
    )
    if report.formats:
        lines.append(
            "total FIT per format (tensors it applies to; '-' where it does not): "
            + ", ".join(f"{n} {v:.4g}" for n, v in report.format_totals.items())
        )
    lines.append(
        "uniform configs (weights/activations): " + ", ".join(f"W{w}A{a} {f:.4g}" for w, a, f in report.uniform)
    )
    s = report.stability
    stab = (
        ""
        if s is None
        else f"; ranking stability over {s.resamples} bootstrap resamples: Kendall τ mean {s.kendall_tau_mean:.3f} "
        f"(5th pct {s.kendall_tau_p05:.3f}), top-{s.top_k} set unchanged in {100 * s.top_k_same:.0f}%"
    )
    lines.append(f"relative standard error of the total trace: {100 * report.total_trace_rel_se:.1f}%{stab}")
    advice = sample_advice(report)
    if advice:
        lines.append(f"advice: {advice}")
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)
