"""Optional matplotlib figures (the ``plot`` extra), written atomically as PNG.

matplotlib is imported lazily, inside ``require_matplotlib``, so fitonnx itself never needs it:
every figure of ``render`` asks for pyplot through it.
"""

from __future__ import annotations

import io
import os
from types import ModuleType
from typing import Any

from fitonnx.errors import FitonnxError
from fitonnx.files.atomic import write_atomic

MISSING_MATPLOTLIB = "matplotlib is not installed (pip install 'fitonnx[plot]')"


def require_matplotlib() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or a one-line user error."""
    try:
        import matplotlib  # deferred: the optional ``plot`` extra, heavy to import
    except ImportError:
        raise FitonnxError(f"expected matplotlib for --plot; {MISSING_MATPLOTLIB}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after the backend is chosen, and optional

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


def label_fit_against_size(ax: Any, title: str) -> None:
    """Axis labels, title, grid and legend of a FIT-against-weight-size plot (the Pareto views)."""
    ax.set_xlabel("weight size (KB)")
    ax.set_ylabel("FIT (weights + activations)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
