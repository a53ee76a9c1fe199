"""The check fitonnx makes of its environment on import: one distribution providing onnxruntime.

Importing this module runs the check (``fitonnx/__init__.py`` imports it before anything else).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fitonnx.errors import FitonnxError
from fitonnx.model.distributions import check_single_runtime


def _run_as_command() -> bool:
    """Whether this process is the ``fitonnx`` command (the console script or ``python -m fitonnx``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (
        Path(getattr(main, "__file__", "") or "").name == "fitonnx" or getattr(spec, "name", "") == "fitonnx.__main__"
    )


def refuse_two_runtimes() -> None:
    """Refuse to import where two distributions both install the ``onnxruntime`` module.

    The command says so in one ``error:`` line and exits 2; a Python caller gets an ImportError."""
    try:
        check_single_runtime()
    except FitonnxError as exc:
        if _run_as_command():
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise ImportError(str(exc)) from None


refuse_two_runtimes()
