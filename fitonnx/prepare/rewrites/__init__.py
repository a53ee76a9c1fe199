"""The rewrite registry: op type -> equivalent nodes whose gradients onnxruntime-training 1.19 has.

Written here because no library pass does this: ONNX function bodies (onnx.inliner) cover only a few
of these ops and expand into ops that lack gradients just as often. Every rewrite computes the same
function as the op it replaces (checked numerically in tests/test_prepare.py against onnxruntime's
kernel of the original op, and by ``verify`` on every prepared model), writes the op's original
output names, and uses only ops whose gradient builds and runs on the CPU (see
``support.GRADIENT_OPS``, measured by scripts/probe_gradients.py).

A rewrite function returns a short description of what it produced, ``None`` when the node needs
no rewrite (e.g. exact Gelu, whose gradient is correct), or raises ``NoRewrite`` with the reason
when the node's form is not covered; the node is then left as it is and ``support`` reports it.
"""

from __future__ import annotations

# Importing the rule modules registers their rewrites.
from fitonnx.prepare.rewrites import (
    activations,
    control_flow,
    conv_transpose,
    einsum,
    normalization,
    recurrent,
    resize,
    tensor_ops,
)
from fitonnx.prepare.rewrites.apply import context, explain, rewrite_ops, try_rewrite
from fitonnx.prepare.rewrites.base import REWRITES, Builder, NoRewrite, RewriteContext, rewrite

__all__ = [
    "REWRITES",
    "Builder",
    "NoRewrite",
    "RewriteContext",
    "activations",
    "context",
    "control_flow",
    "conv_transpose",
    "einsum",
    "explain",
    "normalization",
    "recurrent",
    "resize",
    "rewrite",
    "rewrite_ops",
    "tensor_ops",
    "try_rewrite",
]
