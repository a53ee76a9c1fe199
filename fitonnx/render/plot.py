"""Optional matplotlib figures (the ``plot`` extra), written atomically as PNG.

matplotlib is imported lazily, inside each function, so fitonnx itself never needs it.
"""

from __future__ import annotations

import io
import os
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from fitonnx.errors import FitonnxError
from fitonnx.files.atomic import write_atomic

if TYPE_CHECKING:
    from fitonnx.analysis.validate import ValidationReport


def require_matplotlib() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or a one-line user error."""
    try:
        import matplotlib
    except ImportError:
        raise FitonnxError("expected matplotlib for --plot; not installed (pip install fitonnx[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pyplot_or_none() -> ModuleType | None:
    """``matplotlib.pyplot`` on the Agg backend, or None when the ``plot`` extra is not installed."""
    try:
        return require_matplotlib()
    except FitonnxError:
        return None


def save_png(fig: object, path: str | os.PathLike[str]) -> None:
    """Write ``fig`` as a PNG atomically (never a half-written file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]
    write_atomic(path, buffer.getvalue())


def scatter(report: ValidationReport, path: str | os.PathLike[str]) -> None:
    """FIT against each measured damage (KL, Δloss, accuracy drop), one panel each, ρ in the title.

    Log axes where every value is positive (FIT and KL always are); uniform configurations are
    drawn as squares labelled with their bit width.
    """
    plt = require_matplotlib()
    fit = np.array([r.fit for r in report.configs])
    panels: list[tuple[str, np.ndarray, str]] = [
        ("kl", np.array([r.kl for r in report.configs]), "KL(float ‖ quantized)")
    ]
    if all(r.dloss is not None for r in report.configs):
        panels.append(("dloss", np.array([r.dloss for r in report.configs], np.float64), "Δ loss"))
    if report.float_accuracy is not None and all(r.accuracy is not None for r in report.configs):
        drop = report.float_accuracy - np.array([r.accuracy for r in report.configs], np.float64)
        panels.append(("accuracy_drop", drop, "accuracy drop"))
    uniform = np.array([r.uniform for r in report.configs], bool)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (measure, y, label) in zip(axes[0], panels, strict=True):
        ax.scatter(fit[~uniform], y[~uniform], s=14, alpha=0.7, label="random")
        ax.scatter(fit[uniform], y[uniform], s=30, marker="s", color="C3", label="uniform")
        for r, x, v in zip(report.configs, fit, y, strict=True):
            if r.uniform:
                b = next(iter(r.weight_bits.values()), next(iter(r.activation_bits.values()), None))
                ax.annotate(f"{b}b", (x, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        if np.all(y > 0):
            ax.set_yscale("log")
        ax.set_xlabel("FIT")
        ax.set_ylabel(label)
        title = label
        if report.correlations:
            c = report.correlation("fit", measure)
            title = f"{label}\nSpearman ρ = {c.spearman:.3f}, Kendall τ = {c.kendall:.3f}"
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report.model}: {len(report.configs)} configurations, {report.fisher} Fisher", fontsize=10, y=1.04)
    try:
        save_png(fig, path)
    finally:
        plt.close(fig)
