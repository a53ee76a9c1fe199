"""Q/DQ pairs that let onnxruntime fuse a quantized op, each an exact copy of one the recommendation has.

onnxruntime's optimizer turns ``DequantizeLinear → Conv → QuantizeLinear`` into ``QLinearConv`` (and
likewise Gemm/MatMul) only when a QuantizeLinear reads the op's output. It propagates a Q backward
over MaxPool, Relu, Reshape and Transpose, but not over Flatten: in ``Conv → Relu → MaxPool → Flatten
→ Q`` (the bundled CNN's second Conv) the Conv stays in float, while ``quantize_static``, which
quantizes every op output with one scale shared along such a chain, makes it QLinearConv.

``add_upstream_copies`` puts, on the tensor where such a chain starts (the output of the Relu or
compute op that feeds it), a Q/DQ with the same scale and zero point as the recommended activation's
Q/DQ at its end. That changes no value: a grid that holds 0 maps Relu/MaxPool/layout ops of on-grid
values to on-grid values, and a second rounding on the same grid is the identity (clipping at the
top touches only values that the chain drops or that are not the maximum of their window). So the
exported model computes what FIT scored, and onnxruntime can fuse it as it does quantize_static's.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
from onnx import helper

from fitonnx.model import graph

# Ops whose output values are a selection/reordering of input values (or Relu of them, which keeps a
# grid holding 0): a Q/DQ after them equals one before them on the same grid.
GRID_PRESERVING = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Relu"})
FUSED_BITS = 8  # onnxruntime's fused integer kernels (QLinearConv, QGemm, QLinearMatMul) are 8-bit
COMPUTE_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})


def _readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _chain_start(
    tensor: str, producers: Mapping[str, onnx.NodeProto], readers: Mapping[str, list[onnx.NodeProto]], outputs: set[str]
) -> str | None:
    """The tensor a single-reader chain of grid-preserving ops ending in ``tensor`` starts from, when
    that chain starts at a compute op (directly or through Relu)."""
    current = tensor
    while True:
        node = producers.get(current)
        if node is None or node.op_type not in GRID_PRESERVING or not node.input:
            break
        source = node.input[0]
        if len(readers.get(source, [])) != 1 or source in outputs:
            break
        current = source
    start = producers.get(current)
    if current == tensor or start is None or start.op_type not in COMPUTE_OPS | {"Relu"}:
        return None
    if start.op_type == "Relu" and producers.get(start.input[0]) is None:
        return None
    return current


def add_upstream_copies(model: onnx.ModelProto, activations: Mapping[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    """A new model with, for each recommended 8-bit activation quantized by a Q/DQ pair, a copy of that pair
    at the start of the grid-preserving chain that produces it (see the module docstring), and the
    tensors that got one. (Copies are added wherever such a chain exists, not only over Flatten:
    which ops onnxruntime propagates over differs between its versions.)"""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producers = graph.producers(g.node)
    readers = _readers(out)
    outputs = {o.name for o in g.output}
    quantizers = {n.input[0]: n for n in g.node if n.op_type == "QuantizeLinear" and n.input}
    added: list[str] = []
    before: dict[str, list[onnx.NodeProto]] = {}  # reader node name → the pair to put before it
    for act, bits in activations.items():
        q = quantizers.get(act) if bits == FUSED_BITS else None
        if q is None:
            continue
        dq = next((n for n in readers.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None)
        start = _chain_start(act, producers, readers, outputs)
        if dq is None or start is None or start in quantizers:
            continue
        q_out, dq_out = f"{start}_fuse_quantized", f"{start}_fuse_dequantized"
        (reader,) = readers[start]
        reader.input[:] = [dq_out if name == start else name for name in reader.input]
        attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
        new_q = helper.make_node(
            "QuantizeLinear", [start, *q.input[1:]], [q_out], name=f"{start}_fuse_quantize", domain=q.domain, **attrs
        )
        dq_attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        new_dq = helper.make_node(
            "DequantizeLinear",
            [q_out, *dq.input[1:]],
            [dq_out],
            name=f"{start}_fuse_dequantize",
            domain=dq.domain,
            **dq_attrs,
        )
        before.setdefault(reader.name, []).extend([new_q, new_dq])
        added.append(start)
    nodes = [m for n in g.node for m in (*before.get(n.name, []), n)]
    del g.node[:]
    g.node.extend(nodes)
    return out, added
