"""Prepare stage: turn an inference graph into a differentiable twin computing the same function.

Each pass is a function ``ModelProto -> (ModelProto, list[Change])`` that returns a new model and
never mutates its input. ``prepare`` runs them in order and ``verify`` checks the twin against
the original on real inputs before any gradient is trusted.
"""

from fitonnx.prepare.pipeline import prepare, verify
from fitonnx.prepare.types import Change, ChangeKind, PreparedModel

__all__ = ["Change", "ChangeKind", "PreparedModel", "prepare", "verify"]
