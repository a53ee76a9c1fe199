"""Models that are already quantized: integer-op models refused, QDQ models brought back to float.

- Integer ops (ConvInteger, MatMulInteger, QLinearConv, DynamicQuantizeLSTM, ...) compute on
  integers that have no gradient and no float weight to score: ``check_integer_ops`` refuses the
  model with a line naming them.
- In a QDQ model each weight is ``DequantizeLinear(int8 constant)``: ``fold_weight_dequantize``
  replaces it by the float tensor it computes (exactly: (q − zero point)·scale in float32, as
  onnxruntime's kernel does), so the weights FIT scores are the float values the model uses.
- An activation's ``QuantizeLinear → DequantizeLinear`` pair rounds, so no gradient passes it
  (it is zero almost everywhere). ``strip_activation_qdq`` removes the pairs: the activations are
  scored as float, at the model's own (quantized) weights. This changes what the model computes by
  the activations' rounding, so the stripped model, not the original, is what the twin is checked
  against, and the report says so.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from fitonnx.errors import UnsupportedError
from fitonnx.model import external
from fitonnx.prepare.types import Change, ChangeKind

INTEGER_OPS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSoftmax",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
    }
)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                nodes.extend(_all_nodes(sub))
    return nodes


def integer_ops(model: onnx.ModelProto) -> Counter[str]:
    """How many nodes of each integer op the model has (subgraphs included)."""
    return Counter(n.op_type for n in _all_nodes(model.graph) if n.op_type in INTEGER_OPS)


def check_integer_ops(model: onnx.ModelProto) -> None:
    """Refuse a model quantized with integer ops, naming them."""
    found = integer_ops(model)
    if found:
        names = ", ".join(f"{op} ×{k}" for op, k in sorted(found.items()))
        raise UnsupportedError(
            f"expected a float or QDQ model; found integer ops {names} (the model is already quantized, with no "
            "float weights to score)",
            hint="score the float model it was quantized from",
        )


def _dequantized(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    if scale.ndim == 1 and q.ndim > 1:  # per axis
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero is not None else None
    shifted = q.astype(np.int32) - (zero.astype(np.int32) if zero is not None else 0)
    return (shifted.astype(np.float32) * scale.astype(np.float32)).astype(np.float32)


def fold_weight_dequantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    """Replace every ``DequantizeLinear`` of constants (a QDQ weight) by the float tensor it computes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    kept, changes, used = [], [], set()
    for node in out.graph.node:
        blocks = any(a.name == "block_size" and a.i for a in node.attribute)
        if node.op_type != "DequantizeLinear" or blocks or not all(x in inits for x in node.input if x):
            kept.append(node)
            continue
        arrays = [external.tensor_array(inits[x]) if x else None for x in node.input]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        value = _dequantized(arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, axis)
        out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        used.update(x for x in node.input if x)
        changes.append(
            Change(
                ChangeKind.CONSTANT,
                node.name or node.output[0],
                f"DequantizeLinear of {node.input[0]!r} -> float initializer {node.output[0]!r}",
                origins=((node.output[0], (node.input[0],)),),
            )
        )
    if changes:
        del out.graph.node[:]
        out.graph.node.extend(kept)
        _drop_unread(out.graph, used)
    return out, changes


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    read = {x for n in _all_nodes(graph) for x in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name not in names or t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def strip_activation_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    """Remove each ``QuantizeLinear → DequantizeLinear`` pair on an activation (its readers read the
    float tensor); one QUANTIZED change naming the activations, or none."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = list(g.node)
    consumers = Counter(x for n in nodes for x in n.input)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    renames: dict[str, str] = {}
    drop: set[int] = set()
    for i, node in enumerate(nodes):
        k = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if k is None or nodes[k].op_type != "QuantizeLinear" or consumers[nodes[k].output[0]] != 1:
            continue
        renames[node.output[0]] = nodes[k].input[0]
        drop.update((i, k))
    if not renames:
        return model, []
    kept = [n for i, n in enumerate(nodes) if i not in drop]
    for n in kept:
        n.input[:] = [renames.get(x, x) for x in n.input]
    outputs = {o.name for o in g.output}
    for dq, source in renames.items():
        if dq in outputs:  # keep the output's name: an Identity of the float tensor
            kept.append(onnx.helper.make_node("Identity", [source], [dq]))
    params = {x for i in drop for x in nodes[i].input[1:]}
    del g.node[:]
    g.node.extend(kept)
    _drop_unread(g, params)
    shown = ", ".join(repr(s) for s in list(renames.values())[:5]) + (" ..." if len(renames) > 5 else "")
    detail = (
        f"{len(renames)} activation QuantizeLinear/DequantizeLinear pair(s) removed ({shown}): no gradient passes a "
        "rounding, so these activations are scored as float (the model's own weights are kept)"
    )
    return out, [Change(ChangeKind.QUANTIZED, "model", detail)]
