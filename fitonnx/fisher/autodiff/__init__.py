"""fitonnx's own reverse-mode differentiation of ONNX graphs into standard ONNX ops.

``build_gradient_graph`` is a drop-in for onnxruntime-training's GradientGraphBuilder result: the
forward model plus ``<name>_grad`` outputs, runnable by any plain ``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

# Importing the rule modules registers their rules.
from fitonnx.fisher.autodiff import rules_elementwise, rules_nn, rules_shape  # noqa: F401
from fitonnx.fisher.autodiff.engine import build_gradient_graph, find_unsupported, gradients
from fitonnx.fisher.autodiff.per_sample import per_sample_sqnorms
from fitonnx.fisher.autodiff.registry import supported_ops

__all__ = ["build_gradient_graph", "find_unsupported", "gradients", "per_sample_sqnorms", "supported_ops"]
