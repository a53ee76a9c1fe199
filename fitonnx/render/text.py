"""Small pieces every terminal table and JSON view shares."""

from __future__ import annotations

import math
from typing import Any, Protocol


def short(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters from the left, marked with an ellipsis (the end of a
    tensor name tells it apart more often than its start)."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


MIN_NAME_WIDTH = 12


def name_width(names: list[str], rest: int, width: int | None) -> int:
    """The name column of a table whose other columns take ``rest`` characters: every name whole
    when ``width`` is None (``--wide``) or the names fit, else what the terminal leaves (at least 12)."""
    longest = max([len("tensor"), *map(len, names)])
    return longest if width is None else max(MIN_NAME_WIDTH, min(longest, width - rest))


def finite(x: float | None) -> float | None:
    """``x``, or None for NaN and infinity, which strict JSON cannot hold."""
    return None if x is None or not math.isfinite(x) else x


def json_safe(value: Any) -> Any:
    """NaN and infinity as null, through dicts and lists: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class Provenanced(Protocol):
    """A report that says where it came from (``ScoreReport``, ``ValidationReport``)."""

    @property
    def model(self) -> str: ...
    @property
    def fisher(self) -> str: ...
    @property
    def likelihood(self) -> str: ...
    @property
    def output(self) -> str: ...
    @property
    def data_source(self) -> str: ...
    @property
    def samples(self) -> int: ...


def provenance_dict(report: Provenanced) -> dict[str, Any]:
    """How a JSON report opens: the model, how its Fisher was estimated, on which data and how much."""
    return {
        "model": report.model,
        "fisher": report.fisher,
        "likelihood": report.likelihood,
        "output": report.output,
        "data": report.data_source,
        "samples": report.samples,
    }
