"""Dropout, sums, reductions, split/slice, pooling, padding and space/depth moves as ops with gradients."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fitonnx.prepare.rewrites.base import Builder, NoRewrite, rewrite, square
from fitonnx.prepare.rewrites.base import reduce_axes as _axes


@rewrite("Dropout")
def dropout(b: Builder) -> str:
    # Inference Dropout is the identity, but its gradient scales by 1/(1-ratio) (measured).
    if len(b.node.input) > 2 and b.input(2):
        mode = b.constant_value(b.input(2))
        if mode is None or bool(mode):
            raise NoRewrite("expected Dropout in inference mode (training_mode false)")
    if len(b.node.output) > 1 and b.output(1):
        raise NoRewrite("expected Dropout's mask output to be unused")
    b.finish(b.input(0))
    return "Identity"


# ---------------------------------------------------------------------------------------------
# Variadic and reductions
# ---------------------------------------------------------------------------------------------


@rewrite("Sum", "Mean")
def sum_mean(b: Builder) -> str:
    inputs = [i for i in b.node.input if i]
    acc = inputs[0]
    for other in inputs[1:]:
        acc = b.op("Add", [acc, other])
    if b.node.op_type == "Mean" and len(inputs) > 1:
        acc = b.op("Div", [acc, b.scalar(float(len(inputs)), "n")])
    b.finish(acc)
    return "chain of Add" + (f" / {len(inputs)}" if b.node.op_type == "Mean" else "")


def _max_over(b: Builder, x: str, axes: Sequence[int], keepdims: int, largest: int) -> str:
    """Max (largest=1) or min over ``axes`` by TopK(k=1), one axis at a time (TopK has a gradient)."""
    one = b.ints([1], "k")
    for axis in axes:
        x = b.op("TopK", [x, one], "top", outputs=2, axis=int(axis), largest=largest)
    return x if keepdims else b.squeeze(x, axes)


@rewrite("ReduceMax", "ReduceMin")
def reduce_max(b: Builder) -> str:
    rank = b.rank()
    axes = _axes(b, rank)
    if axes == []:
        b.finish(b.input(0))
        return "Identity (empty axes)"
    axes = list(range(rank)) if axes is None else axes
    largest = 1 if b.node.op_type == "ReduceMax" else 0
    b.finish(_max_over(b, b.input(0), axes, int(b.attr("keepdims", 1)), largest))
    return f"TopK(k=1) over axes {axes}"


@rewrite("GlobalMaxPool")
def global_max_pool(b: Builder) -> str:
    axes = list(range(2, b.rank()))
    b.finish(_max_over(b, b.input(0), axes, 1, 1))
    return f"TopK(k=1) over axes {axes}"


def _reduce_sum_of(b: Builder, x: str) -> str:
    rank = b.rank()
    axes = _axes(b, rank)
    if axes == []:
        return x
    return b.reduce("ReduceSum", x, axes, int(b.attr("keepdims", 1)))


@rewrite("ReduceSumSquare")
def reduce_sum_square(b: Builder) -> str:
    b.finish(_reduce_sum_of(b, square(b, b.input(0))))
    return "ReduceSum(x^2)"


@rewrite("ReduceL1")
def reduce_l1(b: Builder) -> str:
    b.finish(_reduce_sum_of(b, b.op("Abs", [b.input(0)])))
    return "ReduceSum(|x|)"


@rewrite("ReduceLogSum")
def reduce_log_sum(b: Builder) -> str:
    b.finish(b.op("Log", [_reduce_sum_of(b, b.input(0))]))
    return "Log(ReduceSum(x))"


@rewrite("CumSum")
def cumsum(b: Builder) -> str:
    x = b.input(0)
    rank = b.rank()
    axis = int(b.require_constant(b.input(1), "CumSum's axis").reshape(-1)[0]) % rank
    length = b.static_dim(x, axis, "CumSum becomes a MatMul with a triangular matrix")
    exclusive, reverse = int(b.attr("exclusive", 0)), int(b.attr("reverse", 0))
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")  # out i, in j
    include = (j >= i) if reverse else (j <= i)
    if exclusive:
        include &= i != j
    matrix = include.T.astype(b.dtype())  # [in, out]: y[..., i] = Σ_j x[..., j]·M[j, i]
    perm = [k for k in range(rank) if k != axis] + [axis]
    moved = b.transpose(x, perm)
    y = b.internal(b.op("MatMul", [moved, b.const(matrix, "tri")]))
    b.finish(b.transpose(y, list(np.argsort(perm))))
    return "MatMul with a triangular ones matrix"


@rewrite("ReduceL2", "ReduceLogSumExp")
def reduce_keepdims(b: Builder) -> str | None:
    # Their gradients build only with keepdims=1 (measured: keepdims=0 makes an invalid Unsqueeze).
    if int(b.attr("keepdims", 1)) == 1:
        return None
    rank = b.rank()
    axes = _axes(b, rank)
    axes = list(range(rank)) if axes is None else axes
    kept = b.reduce(b.node.op_type, b.input(0), axes, 1, b.node.op_type.lower())
    b.finish(b.squeeze(kept, axes))
    return f"{b.node.op_type}(keepdims=1) + Squeeze"


@rewrite("Split")
def split(b: Builder) -> str | None:
    # With an unused output the Split gradient is wrong (measured); Slices have exact gradients.
    used = [bool(o) and b.ctx.readers.get(o, 0) > 0 for o in b.node.output]
    if all(used):
        return None
    x = b.input(0)
    rank = b.rank()
    axis = int(b.attr("axis", 0)) % rank
    sizes = b.attr("split")
    if sizes is None and b.input(1):
        sizes = b.require_constant(b.input(1), "Split's sizes").tolist()
    if sizes is None:
        length = b.static_dim(x, axis, "an even Split becomes Slices")
        parts = len(b.node.output)
        chunk = -(-length // parts)
        sizes = [min(chunk, length - k * chunk) for k in range(parts)]
    start = 0
    for k, size in enumerate(sizes):
        if used[k]:
            piece = b.op("Slice", [x, b.ints([start]), b.ints([start + int(size)]), b.ints([axis])], "part")
            b.finish(piece, k)
        start += int(size)
    return "Slice per used output (Split's gradient is wrong when an output is unused)"


@rewrite("Slice")
def slice_negative_steps(b: Builder) -> str | None:
    # SliceGrad fails at run time on negative steps (measured); those axes become Gathers of fixed indices.
    if len(b.node.input) < 5 or not b.input(4):
        return None
    steps = b.constant_value(b.input(4))
    if steps is None or not (steps < 0).any():
        return None
    x = b.input(0)
    rank = b.rank()
    starts, ends = (b.require_constant(b.input(k), "Slice's starts and ends").tolist() for k in (1, 2))
    axes = b.require_constant(b.input(3), "Slice's axes").tolist() if b.input(3) else list(range(len(starts)))
    forward = [k for k, s in enumerate(steps.tolist()) if s > 0]
    y = x
    if forward:
        pick = [[v[k] for k in forward] for v in (starts, ends, axes, steps.tolist())]
        y = b.op("Slice", [x, *(b.ints(v) for v in pick)], "forward")
    for k, step in enumerate(steps.tolist()):
        if step > 0:
            continue
        axis = int(axes[k]) % rank
        length = b.static_dim(x, axis, "a negative-step Slice becomes a Gather of fixed indices")
        indices = np.arange(length)[slice(int(starts[k]), int(ends[k]), int(step))]
        y = b.op("Gather", [y, b.ints(indices.tolist(), "indices")], "reversed", axis=axis)
    b.finish(y)
    return "Gather of fixed indices on the negative-step axes (SliceGrad fails on them)"


@rewrite("AveragePool")
def average_pool_3d(b: Builder) -> str | None:
    # 3-D AveragePool gradients are wrong (measured); pooling is separable, so pool (H, W) then D in 2-D.
    if b.rank() != 5:
        return None
    if b.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NoRewrite("expected explicit pads (auto_pad SAME is not covered for 3-D pooling)")
    kernel = [int(k) for k in b.attr("kernel_shape")]
    strides = [int(s) for s in b.attr("strides", [1, 1, 1])]
    pads = [int(p) for p in b.attr("pads", [0] * 6)] if b.attr("auto_pad", "NOTSET") == "NOTSET" else [0] * 6
    dilations = [int(d) for d in b.attr("dilations", [1, 1, 1])]
    common = {"ceil_mode": int(b.attr("ceil_mode", 0)), "count_include_pad": int(b.attr("count_include_pad", 0))}
    if any(d != 1 for d in dilations):
        raise NoRewrite("expected no dilations for 3-D AveragePool")
    x = b.input(0)
    n, c, d, h, w = b.dims(x)
    flat_cd = b.shape_of([n, b.mul_dims(c, d), h, w])
    hw = b.op(
        "AveragePool",
        [b.op("Reshape", [x, flat_cd])],
        kernel_shape=kernel[1:],
        strides=strides[1:],
        pads=[pads[1], pads[2], pads[4], pads[5]],
        **common,
    )
    out = b.output_dims()
    if out is None:
        hw_shape = b.op("Shape", [hw])
        h_out, w_out = (b.op("Slice", [hw_shape, b.ints([k]), b.ints([k + 1])], "dim") for k in (2, 3))
        d_out = None
    else:
        d_out, h_out, w_out = out[2:]
    by_depth = b.shape_of([n, c, d, b.mul_dims(h_out, w_out)])
    depth = b.op(
        "AveragePool",
        [b.op("Reshape", [hw, by_depth])],
        kernel_shape=[kernel[0], 1],
        strides=[strides[0], 1],
        pads=[pads[0], 0, pads[3], 0],
        **common,
    )
    if d_out is None:
        d_out = b.op("Slice", [b.op("Shape", [depth]), b.ints([2]), b.ints([3])], "dim")
    b.finish(b.op("Reshape", [depth, b.shape_of([n, c, d_out, h_out, w_out])]))
    return "2-D AveragePool over (H, W), then over D (3-D AveragePool gradients are wrong)"


@rewrite("Pad")
def pad(b: Builder) -> str | None:
    # Only constant padding has a gradient; reflect/edge/wrap become Gathers with fixed indices + Concat.
    mode = b.attr("mode", "constant")
    if mode == "constant":
        return None
    x = b.input(0)
    rank = b.rank()
    if b.input(1):
        pads = b.require_constant(b.input(1), "Pad's pads").astype(np.int64).tolist()
    else:
        pads = [int(p) for p in b.attr("pads")]
    axes = list(range(rank))
    if len(b.node.input) > 3 and b.input(3):
        axes = [int(a) % rank for a in b.require_constant(b.input(3), "Pad's axes").tolist()]
    begin, end = pads[: len(axes)], pads[len(axes) :]
    y = x
    for axis, lo, hi in zip(axes, begin, end, strict=True):
        if lo < 0 or hi < 0:
            raise NoRewrite("expected non-negative pads for reflect/edge/wrap padding")
        if lo == 0 and hi == 0:
            continue
        if mode == "reflect":
            left, right = list(range(lo, 0, -1)), list(range(-2, -2 - hi, -1))
        elif mode == "edge":
            left, right = [0] * lo, [-1] * hi
        elif mode == "wrap":
            left, right = list(range(-lo, 0)), list(range(hi))
        else:
            raise NoRewrite(f"expected pad mode constant, reflect, edge or wrap; found {mode!r}")
        pieces = []
        if lo:
            pieces.append(b.op("Gather", [y, b.ints(left, "left")], axis=axis))
        pieces.append(y)
        if hi:
            pieces.append(b.op("Gather", [y, b.ints(right, "right")], axis=axis))
        y = b.op("Concat", pieces, axis=axis)
    b.finish(y if y != x else b.op("Identity", [x]))
    return f"{mode} padding as Gather + Concat per axis"


# ---------------------------------------------------------------------------------------------
# Normalizations
# ---------------------------------------------------------------------------------------------


@rewrite("DepthToSpace")
def depth_to_space(b: Builder) -> str:
    x = b.input(0)
    if b.rank() != 4:
        raise NoRewrite(f"expected a rank-4 input; found rank {b.rank()}")
    block = int(b.attr("blocksize"))
    mode = b.attr("mode", "DCR")
    n, c, h, w = b.dims(x)
    bb = b.dim_const(block)
    c_out = b.int_op("Div", c, block * block)
    if mode == "DCR":
        first = b.shape_of([n, bb, bb, c_out, h, w])
        perm = [0, 3, 4, 1, 5, 2]
    else:
        first = b.shape_of([n, c_out, bb, bb, h, w])
        perm = [0, 1, 4, 2, 5, 3]
    moved = b.op("Transpose", [b.op("Reshape", [x, first])], perm=perm)
    final = b.shape_of([n, c_out, b.int_op("Mul", h, block), b.int_op("Mul", w, block)])
    b.finish(b.op("Reshape", [moved, final]))
    return f"Reshape/Transpose/Reshape ({mode})"


@rewrite("SpaceToDepth")
def space_to_depth(b: Builder) -> str:
    x = b.input(0)
    if b.rank() != 4:
        raise NoRewrite(f"expected a rank-4 input; found rank {b.rank()}")
    block = int(b.attr("blocksize"))
    n, c, h, w = b.dims(x)
    bb = b.dim_const(block)
    h_out, w_out = b.int_op("Div", h, block), b.int_op("Div", w, block)
    first = b.shape_of([n, c, h_out, bb, w_out, bb])
    moved = b.op("Transpose", [b.op("Reshape", [x, first])], perm=[0, 3, 5, 1, 2, 4])
    final = b.shape_of([n, b.int_op("Mul", c, block * block), h_out, w_out])
    b.finish(b.op("Reshape", [moved, final]))
    return "Reshape/Transpose/Reshape"
