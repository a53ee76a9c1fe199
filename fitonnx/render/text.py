"""Small pieces every terminal table and JSON view shares."""

from __future__ import annotations

import math
from typing import Any


def short(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters from the left, marked with an ellipsis (the end of a
    tensor name tells it apart more often than its start)."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


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
