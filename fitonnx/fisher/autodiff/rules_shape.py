"""VJP rules of layout, indexing and reduction ops.

Selection ops (Gather*, Slice, Tile, Pad) share one rule: the op replayed on the flat position
of every element of x (``Builder.iota``) says where each output element came from, and the
output gradient is summed into those positions (duplicates add up).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from fitonnx.errors import UnsupportedError
from fitonnx.fisher.autodiff.builder import Builder, attr, describe
from fitonnx.fisher.autodiff.registry import Grads, rule


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.reshape_like(g[0], node.input[0])]


@rule("Expand")
def expand(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.unbroadcast(g[0], node.input[0], node.output[0])]


@rule("Transpose")
def transpose(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    perm = attr(node, "perm")
    if perm is None:  # a reversal is its own inverse
        return [b.op("Transpose", g[0])]
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return [b.op("Transpose", g[0], perm=inverse)]


@rule("Trilu")
def trilu(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.replay(node, [g[0], *node.input[1:]])[0]]


@rule("Gather")
def gather(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """Axis 0 (embeddings) scatters rows with ScatterND: no position tensor as large as the table."""
    x, indices = node.input[0], node.input[1]
    if int(attr(node, "axis", 0)) != 0 or b.opset < 16:
        return select(b, node, g)
    idx = b.op("Cast", indices, to=TensorProto.INT64)
    rows = b.op("Gather", b.shape(x), b.int_scalar(0))
    idx = b.op("Where", b.op("Less", idx, b.int_scalar(0)), b.op("Add", idx, rows), idx)
    return [b.op("ScatterND", b.zeros_like(x), b.unsqueeze(idx, [-1]), g[0], reduction="add")]


@rule("GatherElements", "GatherND", "Slice", "Tile")
def select(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x = node.input[0]
    positions = b.replay(node, [b.iota(x), *node.input[1:]])[0]
    return [b.scatter_add(x, positions, g[0])]


@rule("Pad")
def pad(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """Padding elements read position numel(x), one slot past x, which is dropped."""
    x = node.input[0]
    inputs = [b.iota(x), node.input[1], b.size(x), *node.input[3:]]
    positions = b.replay(node, inputs)[0]
    return [b.scatter_add(x, positions, g[0], extra=1)]


@rule("Concat")
def concat(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    axis = int(attr(node, "axis"))
    if len(node.input) == 1:
        return [g[0]]
    sizes = b.op("Concat", *[b.op("Gather", b.shape(x), b.ints([axis])) for x in node.input], axis=0)
    return list(b.ops("Split", [g[0], sizes], len(node.input), axis=axis))


@rule("Split")
def split(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    parts = [gi if gi is not None else b.zeros_like(y) for gi, y in zip(g, node.output, strict=True)]
    return [b.op("Concat", *parts, axis=int(attr(node, "axis", 0)))]


@rule("TopK")
def top_k(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x = node.input[0]
    if g[0] is None:
        return [None]
    axis = int(attr(node, "axis", -1))
    return [b.op("ScatterElements", b.zeros_like(x), node.output[1], g[0], axis=axis)]


@rule("ScatterElements", "ScatterND")
def scatter(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """Scattered positions of data get no gradient (reduction none); updates read them back."""
    reduction = attr(node, "reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in ("none", "add"):
        raise UnsupportedError(f"expected reduction none or add for {describe(node)}; found {reduction}")
    _, indices, updates = node.input
    gather = "GatherElements" if node.op_type == "ScatterElements" else "GatherND"
    kw = {"axis": int(attr(node, "axis", 0))} if gather == "GatherElements" else {}
    d_updates = b.op(gather, g[0], indices, **kw)
    if reduction == "add":
        return [g[0], None, d_updates]
    cleared = b.ops(node.op_type, [g[0], indices, b.zeros_like(updates)], 1, **kw)[0]
    return [cleared, None, d_updates]


def _reduce_axes(b: Builder, node: onnx.NodeProto) -> list[int] | str | None:
    """A Reduce*'s axes: a static list (attribute form), a tensor name (input form) or None (all)."""
    if len(node.input) > 1 and node.input[1]:
        return node.input[1]
    axes = attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _kept(b: Builder, node: onnx.NodeProto, t: str) -> str:
    """``t`` (shaped like the reduction's output) with the reduced axes kept as size 1."""
    axes = _reduce_axes(b, node)
    if int(attr(node, "keepdims", 1)) or axes is None:
        return t
    return b.unsqueeze(t, axes)


@rule("ReduceSum")
def reduce_sum(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Expand", _kept(b, node, g[0]), b.shape(node.input[0]))]


@rule("ReduceMean")
def reduce_mean(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x, y = node.input[0], node.output[0]
    spread = b.op("Expand", _kept(b, node, g[0]), b.shape(x))
    return [b.op("Div", spread, b.count_ratio(x, y, x))]


@rule("ReduceMax", "ReduceMin")
def reduce_max_min(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """The gradient goes to the elements equal to the extreme, shared equally among ties."""
    x, y = node.input[0], node.output[0]
    mask = b.op("Cast", b.op("Equal", x, _kept(b, node, y)), to=b.dtype(x))
    count = b.reduce("ReduceSum", mask, _reduce_axes(b, node), keepdims=1)
    return [b.op("Mul", mask, b.op("Div", _kept(b, node, g[0]), count))]


@rule("ReduceL2")
def reduce_l2(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x, y = node.input[0], node.output[0]
    return [b.op("Mul", x, b.op("Div", _kept(b, node, g[0]), _kept(b, node, y)))]


@rule("ReduceLogSumExp")
def reduce_log_sum_exp(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x, y = node.input[0], node.output[0]
    return [b.op("Mul", _kept(b, node, g[0]), b.op("Exp", b.op("Sub", x, _kept(b, node, y))))]
