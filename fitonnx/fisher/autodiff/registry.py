"""The registry of vector-Jacobian rules: op type → one small function.

A rule gets the builder, the forward node and the gradient of each of its outputs (None where the
loss does not depend on that output) and returns the gradient of each input (None: no gradient,
e.g. an integer input). Rules may emit gradients for inputs nobody asked for; the engine prunes
the nodes whose results are unused.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from fitonnx.fisher.autodiff.builder import Builder

Grads = list[str | None]
Rule = Callable[[Builder, onnx.NodeProto, Grads], Grads]

RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the VJP of each of ``op_types`` (default domain)."""

    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = fn
        return fn

    return register


def supported_ops() -> frozenset[str]:
    """The op types (default ONNX domain) that have a VJP rule (the package's import registers them all)."""
    return frozenset(RULES)
