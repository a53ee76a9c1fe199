"""Normalization layers as their arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import helper

from fitonnx.prepare.passes.batchnorm import bn_affine, is_inference_bn
from fitonnx.prepare.rewrites.base import Builder, NoRewrite, node_attrs, rewrite, square


def _channel_shape(rank: int, channels: int) -> tuple[int, ...]:
    return (channels,) + (1,) * (rank - 2)


@rewrite("BatchNormalization")
def batch_norm(b: Builder) -> str:

    if not is_inference_bn(b.node):
        raise NoRewrite("expected BatchNormalization in inference form (one output, training_mode 0)")
    params = {n: b.require_constant(n, "the BN parameters") for n in b.node.input[1:5]}
    scale, shift = bn_affine(b.node, params)  # type: ignore[misc]
    rank = b.rank()
    if rank < 2:
        raise NoRewrite(f"expected an input of rank >= 2; found rank {rank}")
    shape = _channel_shape(rank, scale.shape[0])
    y = b.op("Mul", [b.input(0), b.const(scale.reshape(shape), "scale")])
    b.finish(b.op("Add", [y, b.const(shift.reshape(shape), "shift")]))
    return "x*scale+shift (per channel; no Conv/Gemm before it to fold into)"


def _normalize(b: Builder, x: str, axes: Sequence[int], eps: float) -> str:
    """(x − mean) / sqrt(var + eps) over ``axes`` (biased variance, as every ONNX normalization)."""
    mean = b.reduce("ReduceMean", x, axes, 1, "mean")
    centred = b.op("Sub", [x, mean], "centred")
    var = b.reduce("ReduceMean", square(b, centred), axes, 1, "var")
    return b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [var, b.scalar(eps, "eps")])])], "normed")


def _per_channel(b: Builder, name: str, rank: int) -> str:
    """A [C] scale/bias as [C, 1, ..., 1] for an input of ``rank``."""
    value = b.constant_value(name)
    if value is not None:
        return b.const(value.reshape(_channel_shape(rank, value.shape[0])), "chan", value.dtype)
    return b.unsqueeze(name, list(range(1, rank - 1)))


@rewrite("InstanceNormalization")
def instance_norm(b: Builder) -> str:
    rank = b.rank()
    eps = float(b.attr("epsilon", 1e-5))
    normed = _normalize(b, b.input(0), list(range(2, rank)), eps)
    scaled = b.op("Mul", [normed, _per_channel(b, b.input(1), rank)])
    b.finish(b.op("Add", [scaled, _per_channel(b, b.input(2), rank)]))
    return "ReduceMean/Sub/Mul/Sqrt/Div over the spatial axes"


@rewrite("LayerNormalization")
def layer_norm(b: Builder) -> str | None:
    # The fused gradient builds once the node has a bias and its Mean/InvStdDev outputs, and it is
    # correct (tests); so the node is completed rather than decomposed.
    has_bias = len(b.node.input) > 2 and b.input(2)
    outputs = [o for o in b.node.output]
    if has_bias and len(outputs) == 3 and all(outputs):
        return None
    scale = b.constant_value(b.input(1))
    if not has_bias and scale is None:
        rank = b.rank()
        axis = int(b.attr("axis", -1)) % rank
        normed = _normalize(b, b.input(0), list(range(axis, rank)), float(b.attr("epsilon", 1e-5)))
        b.finish(b.op("Mul", [normed, b.input(1)]))
        return "ReduceMean/Sub/Mul/Sqrt/Div (scale computed at run time, no bias)"
    bias = b.input(2) if has_bias else b.const(np.zeros_like(scale), "bias", scale.dtype)  # type: ignore[arg-type]
    mean = outputs[1] if len(outputs) > 1 and outputs[1] else b.fresh("mean")
    inv_std = outputs[2] if len(outputs) > 2 and outputs[2] else b.fresh("inv_std")
    node = helper.make_node(
        "LayerNormalization",
        [b.input(0), b.input(1), bias],
        [b.output(0), mean, inv_std],
        name=b.node.name or f"{b.base}/LayerNormalization",
        **node_attrs(b.node),
    )
    b.nodes.append(node)
    return "LayerNormalization with its bias and Mean/InvStdDev outputs (the form whose gradient builds)"


@rewrite("GroupNormalization")
def group_norm(b: Builder) -> str:
    x = b.input(0)
    rank = b.rank()
    groups = int(b.attr("num_groups"))
    eps = float(b.attr("epsilon", 1e-5))
    grouped = b.op("Reshape", [x, b.ints([0, groups, -1], "grouped")])
    normed = _normalize(b, grouped, [2], eps)
    restored = b.op("Reshape", [normed, b.op("Shape", [x])])
    scale, bias = b.input(1), b.input(2)
    if b.ctx.opset < 21:  # opset 18: one scale/bias per group
        channels = b.static_dim(x, 1, "per-group scale expands to channels")
        per = channels // groups
        values = [b.require_constant(n, "GroupNormalization's scale and bias") for n in (scale, bias)]
        scale_c, bias_c = (np.repeat(v, per) for v in values)
        scale = b.const(scale_c.reshape(_channel_shape(rank, channels)), "scale", scale_c.dtype)
        bias = b.const(bias_c.reshape(_channel_shape(rank, channels)), "bias", bias_c.dtype)
    else:
        scale, bias = _per_channel(b, scale, rank), _per_channel(b, bias, rank)
    b.finish(b.op("Add", [b.op("Mul", [restored, scale]), bias]))
    return "Reshape to groups, ReduceMean/Sub/Mul/Sqrt/Div, Reshape back"


@rewrite("MeanVarianceNormalization")
def mean_variance_norm(b: Builder) -> str:
    rank = b.rank()
    axes = sorted({int(a) % rank for a in b.attr("axes", [0, 2, 3])})
    x = b.input(0)
    mean = b.reduce("ReduceMean", x, axes, 1, "mean")
    centred = b.op("Sub", [x, mean])
    std = b.op("Sqrt", [b.reduce("ReduceMean", square(b, centred), axes, 1, "var")])
    # The ONNX function body adds 1e-9 to the standard deviation, not to the variance.
    b.finish(b.op("Div", [centred, b.op("Add", [std, b.scalar(1e-9, "eps")])]))
    return "(x-mean)/(std+1e-9) by ReduceMean/Sub/Mul/Sqrt/Div"


@rewrite("LpNormalization")
def lp_norm(b: Builder) -> str:
    p = int(b.attr("p", 2))
    axis = int(b.attr("axis", -1)) % b.rank()
    x = b.input(0)
    if p == 2:
        norm = b.reduce("ReduceL2", x, [axis], 1, "norm")
    elif p == 1:
        norm = b.reduce("ReduceSum", b.op("Abs", [x]), [axis], 1, "norm")
    else:
        raise NoRewrite(f"expected p of 1 or 2; found {p}")
    b.finish(b.op("Div", [x, norm]))
    return f"x / L{p} norm over axis {axis}"


@rewrite("LRN")
def lrn(b: Builder) -> str:
    size = int(b.attr("size"))
    alpha, beta, bias = float(b.attr("alpha", 1e-4)), float(b.attr("beta", 0.75)), float(b.attr("bias", 1.0))
    x = b.input(0)
    rank = b.rank()
    if rank < 3:
        raise NoRewrite(f"expected an input of rank >= 3; found rank {rank}")
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    # [N, C, ...] -> [N, 1, C, prod(...)]: a 2-D pool across channels (3-D AveragePool gradients are wrong).
    window = b.op("Reshape", [b.unsqueeze(square(b, x), [1]), b.ints([0, 0, 0, -1], "flat")])
    pooled = b.op("AveragePool", [window], kernel_shape=[size, 1], pads=[lo, 0, hi, 0], count_include_pad=1)
    mean_sq = b.op("Reshape", [pooled, b.op("Shape", [x])])  # Σ x² over the window / size
    base = b.op("Add", [b.op("Mul", [mean_sq, b.scalar(alpha, "alpha")]), b.scalar(bias, "bias")])
    b.finish(b.op("Div", [x, b.op("Pow", [base, b.scalar(beta, "beta")])]))
    return "x / (bias + alpha*AveragePool(x^2 across channels))^beta"


# ---------------------------------------------------------------------------------------------
# Layout and linear ops
# ---------------------------------------------------------------------------------------------
