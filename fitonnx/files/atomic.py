"""Atomic writes: a file appears whole or not at all (the implementation is ``fitonnx.files.outputs``)."""

from __future__ import annotations

from fitonnx.files.outputs import write_atomic

__all__ = ["write_atomic"]
