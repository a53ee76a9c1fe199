"""Small value types shared by every stage."""

from __future__ import annotations

from enum import Enum


class TextEnum(str, Enum):
    """An enum whose members are their text: equal to it, printed and formatted as it, stored in JSON
    as it (``enum.StrEnum`` from Python 3.11 on, written out for 3.10)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
