"""Reverse-mode differentiation of an ONNX graph: path finding, gradient accumulation, pruning.

The model's opset is kept, except that onnx's version converter lifts it where a rule needs a
newer form: to 13, because the rules reduce over axes computed at run time (broadcast shapes,
Concat/Split sizes), which ReduceSum, Split, Squeeze and Unsqueeze take as inputs only from
opset 13 on; to 16 when the path holds a selection op (Gather*, Slice, Tile, Pad, MaxPool),
whose gradient sums into positions that may repeat: ScatterElements/ScatterND add only from 16.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from fitonnx.errors import UnsupportedError
from fitonnx.fisher.autodiff.builder import Builder, TensorInfo, describe
from fitonnx.fisher.autodiff.registry import RULES, supported_ops
from fitonnx.model.graph import FLOAT_TYPES, default_opset, gradient_inputs

MIN_OPSET = 13
SCATTER_OPSET = 16
SCATTER_OPS = frozenset({"Gather", "GatherElements", "GatherND", "Slice", "Tile", "Pad", "MaxPool"})
DEFAULT_DOMAINS = ("", "ai.onnx")


def _lifted_copy(model: onnx.ModelProto, loss: str, wrt: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` at the opset its path needs (see the module docstring); ``model`` is not touched."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    target = MIN_OPSET
    if default_opset(work) < SCATTER_OPSET:
        nodes, _ = _path(work.graph.node, wrt, loss, infer_types(work))
        if any(n.op_type in SCATTER_OPS for n in nodes):
            target = SCATTER_OPSET
    if default_opset(work) < target:
        work = onnx.version_converter.convert_version(work, target)
    return work


# Initializers up to this many elements stay constants during shape inference (Reshape targets,
# axes, pads); larger ones are declared as inputs of their shape, so no weight is copied.
SMALL_CONSTANT = 64


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each large initializer replaced by a graph input of the same type and shape."""
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = model.ir_version, model.producer_name
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    declared = {v.name for v in g.input}
    for init in model.graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= SMALL_CONSTANT:
            g.initializer.append(init)
        elif init.name not in declared:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def infer_types(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Element type and static shape of every tensor shape inference can name."""
    inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False, data_prop=True)
    types: dict[str, TensorInfo] = {}
    g = inferred.graph
    for value in [*g.input, *g.output, *g.value_info]:
        tt = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            continue
        shape = None
        if tt.HasField("shape"):
            shape = tuple(_dim(d) for d in tt.shape.dim)
        types[value.name] = TensorInfo(tt.elem_type, shape)
    for init in model.graph.initializer:
        types[init.name] = TensorInfo(init.data_type, tuple(init.dims))
    for node in g.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = TensorInfo(value.data_type, tuple(value.dims))
    return types


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if d.HasField("dim_value"):
        return d.dim_value
    return d.dim_param if d.HasField("dim_param") and d.dim_param else None


def _is_float(types: dict[str, TensorInfo], name: str) -> bool:
    info = types.get(name)
    return bool(name) and (info is None or info.elem_type == 0 or info.elem_type in FLOAT_TYPES)


def _reads(node: onnx.NodeProto) -> set[str]:
    """The inputs of ``node`` a gradient may flow into (``STOP_GRADIENT_INPUTS`` left out, as
    onnxruntime-training does), and the outer tensors its subgraphs (If/Loop/Scan bodies) read."""
    names = set(gradient_inputs(node))
    for a in node.attribute:
        for body in [a.g] if a.HasField("g") else list(a.graphs):
            for inner in body.node:
                names |= _reads(inner)
    return names


def _path(
    nodes: Sequence[onnx.NodeProto], sources: Sequence[str], loss: str, types: dict[str, TensorInfo]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """Nodes on a float path from ``sources`` to ``loss`` (graph order) and the tensors on it."""
    reached = {s for s in sources if _is_float(types, s)}
    forward = []
    for node in nodes:
        if reached & _reads(node):
            forward.append(node)
            reached |= {o for o in node.output if _is_float(types, o)}
    needed = {loss}
    on_path = []
    for node in reversed(forward):
        if needed & set(node.output):
            on_path.append(node)
            needed |= {i for i in _reads(node) if _is_float(types, i)}
    return on_path[::-1], reached & needed


def _missing(nodes: Sequence[onnx.NodeProto]) -> list[str]:
    ops = supported_ops()
    return [describe(n) for n in nodes if n.domain not in DEFAULT_DOMAINS or n.op_type not in ops]


def find_unsupported(model: onnx.ModelProto, loss: str, wrt: Sequence[str]) -> list[str]:
    """``describe`` of each node between ``wrt`` and ``loss`` that has no VJP rule (no session needed)."""
    work = _lifted_copy(model, loss, wrt)
    return _missing(_path(work.graph.node, wrt, loss, infer_types(work))[0])


def _accumulate(b: Builder, parts: list[str] | None) -> str | None:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b.op("Sum", *parts)


def _check(nodes: Sequence[onnx.NodeProto]) -> None:
    missing = _missing(nodes)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UnsupportedError(
            f"expected only ops with a gradient rule between the differentiated tensors and the loss; "
            f"found {'; '.join(missing[:3])}{more}"
        )


def gradients(
    model: onnx.ModelProto, loss: str, wrt: Sequence[str]
) -> tuple[onnx.ModelProto, dict[str, str | None], Builder]:
    """A copy of ``model`` with backward nodes appended, and the gradient tensor of each ``wrt``
    name (any float tensor; None where the loss does not depend on it). Graph outputs unchanged."""
    work = _lifted_copy(model, loss, wrt)
    types = infer_types(work)
    nodes, needed = _path(work.graph.node, wrt, loss, types)
    _check(nodes)
    taken = {t for n in work.graph.node for t in (*n.input, *n.output)}
    taken |= {v.name for v in (*work.graph.input, *work.graph.output, *work.graph.initializer)}
    b = Builder(types, default_opset(work), taken, needed)
    contributions: dict[str, list[str]] = {loss: [b.filled(b.shape(loss), 1.0, loss)]}
    for node in reversed(nodes):
        out_grads = [_accumulate(b, contributions.get(o)) for o in node.output]
        for o, grad in zip(node.output, out_grads, strict=True):
            if grad is not None and o in types:
                types.setdefault(grad, types[o])
        if all(g is None for g in out_grads):
            continue
        in_grads = RULES[node.op_type](b, node, out_grads)
        for name, grad in zip(node.input, in_grads, strict=False):
            if grad is not None and b.needs(name):
                contributions.setdefault(name, []).append(grad)
    found = {w: _accumulate(b, contributions.get(w)) for w in dict.fromkeys(wrt)}
    return work, found, b


def build_gradient_graph(model: onnx.ModelProto, loss: str, wrt: Sequence[str]) -> onnx.ModelProto:
    """A new model: ``model``'s graph plus outputs ``<name>_grad`` = d loss / d name for each name in
    ``wrt`` (initializers or graph inputs; zeros where the loss does not depend on one), seeded with
    d loss / d loss = 1. Only default-domain ops; ``model`` itself is not modified."""
    work, found, b = gradients(model, loss, wrt)
    g = work.graph
    for name in dict.fromkeys(wrt):
        if not _is_float(b.types, name):
            raise UnsupportedError(f"expected float tensors to differentiate; {name!r} is not float")
        grad = found[name] if found[name] is not None else b.zeros_like(name)
        b.nodes.append(helper.make_node("Identity", [grad], [f"{name}_grad"], name=f"{name}_grad"))
        info = b.types.get(name)
        shape = None if info is None or info.shape is None else list(info.shape)
        g.output.append(helper.make_tensor_value_info(f"{name}_grad", b.dtype(name), shape))
    nodes, inits = prune(b.nodes, b.inits, {o.name for o in g.output})
    g.node.extend(nodes)
    g.initializer.extend(inits)
    return work


def prune(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], outputs: set[str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The backward nodes (and constants) that some graph output depends on."""
    live = set(outputs)
    kept = []
    for node in reversed(nodes):
        if live & set(node.output):
            kept.append(node)
            live |= set(node.input)
    return kept[::-1], [t for t in inits if t.name in live]
