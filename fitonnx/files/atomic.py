"""Atomic writes: a file appears whole or not at all."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from fitonnx.errors import FitonnxError


def write_atomic(path: str | os.PathLike[str], write: Callable[[io.TextIOBase], None] | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place: never a half-written file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FitonnxError(f"expected an existing folder for {str(path)!r}; {str(path.parent)!r} does not exist")
    binary = isinstance(write, bytes)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", newline=None if binary else "") as f:
            if binary:
                f.write(write)
            else:
                write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
