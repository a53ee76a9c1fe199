"""Progress bars on stderr: the CLI's implementation of ``fitonnx.progress.Progress``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click


class BarProgress:
    """One click progress bar per stage; a stage's ``start`` closes the previous stage's bar."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, total: int, label: str) -> None:
        self.close()
        self._bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True)
        self._bar.__enter__()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@contextmanager
def progress_bars() -> Iterator[BarProgress]:
    """A ``BarProgress`` whose last bar is closed on the way out, also on errors."""
    bars = BarProgress()
    try:
        yield bars
    finally:
        bars.close()
