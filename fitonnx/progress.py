"""Progress of long work, as an object the caller passes in: the library never draws a bar itself."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """Told how much work a stage has (``start``) and how much of it is done (``advance``)."""

    def start(self, total: int, label: str) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NoProgress:
    """The default: report nothing."""

    def start(self, total: int, label: str) -> None:
        del total, label

    def advance(self, n: int = 1) -> None:
        del n


class Ticks:
    """Progress that calls ``fn(n)`` on every advance (a benchmark's clock, a test's counter)."""

    def __init__(self, fn) -> None:  # fn: Callable[[int], None]
        self._fn = fn

    def start(self, total: int, label: str) -> None:
        del total, label

    def advance(self, n: int = 1) -> None:
        self._fn(n)


def as_progress(progress: Progress | None) -> Progress:
    """``progress``, or one that reports nothing."""
    return NoProgress() if progress is None else progress
