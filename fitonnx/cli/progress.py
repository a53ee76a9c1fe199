"""Progress on stderr: the CLI's implementation of ``fitonnx.progress.Progress``.

On a terminal, a bar per stage (a one-step stage such as loading is a line that ends in its time;
with ``-v`` each bar is followed by its time); without one (a pipe, CI, a log file), one line per
finished stage with its count and time; with ``-q``, nothing. ``-v`` and ``-q`` are the group's options (``verbosity``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

QUIET, NORMAL, VERBOSE = -1, 0, 1


def verbosity() -> int:
    """-1 with ``-q``, 1 with ``-v``, else 0 (also outside a click command)."""
    ctx = click.get_current_context(silent=True)
    obj = None if ctx is None else ctx.find_root().obj
    return obj.get("verbosity", NORMAL) if isinstance(obj, dict) else NORMAL


def info(message: str, err: bool = False) -> None:
    """A line for the user on stdout (stderr with ``err``, when stdout carries data) unless ``-q``."""
    if verbosity() > QUIET:
        click.echo(message, err=err)


class BarProgress:
    """One stage at a time; a stage's ``start`` closes the previous one."""

    def __init__(self, *, tty: bool | None = None, level: int | None = None) -> None:
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._level = verbosity() if level is None else level
        self._bar: Any = None
        self._stage: tuple[str, int] | None = None
        self._done = 0
        self._t0 = 0.0

    def start(self, total: int, label: str) -> None:
        self.close()
        self._stage, self._done, self._t0 = (label, total), 0, time.perf_counter()
        if self._level <= QUIET or not self._tty:
            return
        if total <= 1:
            click.echo(f"{label} ...", err=True, nl=False)
            return
        self._bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True)
        self._bar.__enter__()

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)

    def abort(self) -> None:
        """Close the stage that failed: its bar ends, and no line says it finished."""
        open_line = self._stage is not None and self._stage[1] <= 1
        self._stage = None
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        elif open_line and self._tty and self._level > QUIET:
            click.echo("", err=True)  # end the "label ..." line before the error

    def close(self) -> None:
        if self._stage is None:
            return
        (label, total), seconds = self._stage, time.perf_counter() - self._t0
        self._stage = None
        count = "" if total <= 1 else f" {self._done}/{total}"
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
            if self._level >= VERBOSE:
                click.echo(f"{label}:{count} {seconds:.1f} s", err=True)
        elif self._level > QUIET and self._tty and total <= 1:
            click.echo(f" {seconds:.1f} s", err=True)
        elif self._level > QUIET and not self._tty:
            click.echo(f"{label}:{count} {seconds:.1f} s", err=True)


@contextmanager
def progress_bars() -> Iterator[BarProgress]:
    """A ``BarProgress`` whose last stage is closed on the way out (aborted, without its line, on errors)."""
    bars = BarProgress()
    try:
        yield bars
    except BaseException:
        bars.abort()
        raise
    bars.close()
