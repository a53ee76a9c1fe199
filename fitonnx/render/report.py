"""Render reports: terminal table, JSON and CSV, written atomically."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text
from fitonnx.render.text import provenance_dict, short
from fitonnx.score.fit import ScoreReport


def to_dict(report: ScoreReport) -> dict[str, Any]:
    """The JSON report (schema in README.md)."""
    return {
        **provenance_dict(report),
        "stop_reason": report.stop_reason,
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
            }
            for t in report.tensors
        ],
        "total_fit": {str(b): v for b, v in report.total_fit.items()},
        "notes": list(report.notes),
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
        w.writerow(CSV_FIELDS + [f"fit_{b}" for b in report.bits] + ["share"])
        for t in report.tensors:
            w.writerow(
                [t.name, t.kind.value, ";".join(t.op_types), ";".join(t.nodes), "x".join(map(str, t.shape)), t.numel]
                + [repr(t.ef_trace), repr(t.ef_trace_se), repr(t.min), repr(t.max)]
                + [repr(t.fit[b]) for b in report.bits]
                + [repr(t.share)]
            )

    write_atomic(path, write)


def format_table(report: ScoreReport, limit: int | None = None) -> str:
    """The terminal table: most sensitive first, FIT per bit width and its share of the total."""
    bits = report.bits
    name_w = min(40, max([len("tensor")] + [len(t.name) for t in report.tensors]))
    head = (
        f"{'tensor':<{name_w}} {'kind':<4} {'op':<10} {'shape':<16} {'trace':>9} {'±se':>8} "
        f"{'min':>8} {'max':>8} {'share':>6} " + " ".join(f"{'FIT@' + str(b):>9}" for b in bits)
    )
    lines = [
        f"{report.model}: {report.fisher} Fisher ({report.likelihood} on {report.output!r}), "
        f"{report.samples} samples from {report.data_source} [{report.stop_reason}]"
        + ("" if report.noise_model == "uniform" else f"; {report.noise_model} noise model"),
        head,
        "-" * len(head),
    ]
    rows = report.tensors if limit is None else report.tensors[:limit]
    for t in rows:
        shape = "x".join(map(str, t.shape))
        lines.append(
            f"{short(t.name, name_w):<{name_w}} {'W' if t.kind.value == 'weight' else 'A':<4} "
            f"{short(','.join(sorted(set(t.op_types))), 10):<10} {short(shape, 16):<16} "
            f"{t.ef_trace:>9.3g} {t.ef_trace_se:>8.2g} {t.min:>8.3g} {t.max:>8.3g} {100 * t.share:>5.1f}% "
            + " ".join(f"{t.fit[b]:>9.3g}" for b in bits)
        )
    if limit is not None and len(report.tensors) > limit:
        lines.append(f"... {len(report.tensors) - limit} more (see --json/--csv)")
    lines.append("")
    lines.append(
        "total FIT, every tensor at b bits: " + ", ".join(f"{b}b {v:.4g}" for b, v in report.total_fit.items())
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
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)
