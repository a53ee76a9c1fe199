"""A networkx view of an ONNX graph and the quantizable tensors FIT scores.

Quantizable weights are float constants read by the weight operand of Conv, ConvTranspose,
Gemm, MatMul, Gather (embedding tables) and LSTM/GRU/RNN (W and R). Quantizable activations are
the non-constant float data inputs of those same ops. A weight may reach its op through
layout-only ops (Transpose, Reshape, Cast, ...) that constant folding would remove; it is still
the source constant that a toolchain quantizes, so that is the tensor reported.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import Enum

import networkx as nx
import numpy as np
import onnx
from onnx import helper

from fitonnx.errors import ModelError


class Kind(str, Enum):
    WEIGHT = "weight"
    ACTIVATION = "activation"


@dataclass(frozen=True)
class InputSpec:
    """A model input: element dtype and shape (``None`` for a symbolic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == self.rank and all(d is None or d == s for d, s in zip(self.shape, shape, strict=True))

    def display(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class QuantTensor:
    """One quantizable tensor and the quantizable nodes that read it."""

    name: str
    kind: Kind
    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    shape: tuple[int, ...] | None

    @property
    def numel(self) -> int | None:
        return None if self.shape is None else int(np.prod(self.shape, dtype=np.int64))


# op type -> indices of inputs that carry weights when constant; all other float inputs listed
# in ACTIVATION_INPUTS are activations when they are not constant.
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "Gather": (0,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}
ACTIVATION_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (0,),
    "ConvTranspose": (0,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "Gather": (),
    "LSTM": (0,),
    "GRU": (0,),
    "RNN": (0,),
}
# Single-data-input ops that only move or relabel values; a weight seen through them is still the
# source constant.
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten"})
# doc_string marks set by prepare's rewrites: a MatMul/Conv computing what was not a quantizable op
# of the model (a Resize or Einsum lowered to MatMul) is skipped; a node that only rearranges its
# first input (ConvTranspose's zero insertion) is looked through to the activation it rearranges.
PREPARE_INTERNAL = "fitonnx:internal"
PREPARE_PASSTHROUGH = "fitonnx:passthrough"
PREPARE_WEIGHTS_ONLY = "fitonnx:weights-only"  # an unrolled recurrent MatMul: R counts, the hidden state does not

# Float inputs that carry no gradient in either engine: onnxruntime-training's STOP_GRADIENT_EDGES
# for BatchNormalization (the running mean and variance), which fitonnx's own engine and the
# blocker search follow too. prepare's fixed quantizers use it as the stop-gradient ONNX lacks
# (``prepare/passes/quantized.py``). Integer and boolean tensors carry none anyway.
STOP_GRADIENT_INPUTS: dict[str, frozenset[int]] = {"BatchNormalization": frozenset({3, 4})}


def gradient_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs of ``node`` a gradient may flow into (``STOP_GRADIENT_INPUTS`` left out)."""
    stop = STOP_GRADIENT_INPUTS.get(node.op_type, frozenset()) if node.domain in ("", "ai.onnx") else frozenset()
    return [name for slot, name in enumerate(node.input) if name and slot not in stop]


FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


# (node, input slot, weight rank) -> the weight's output-channel axis as that node reads it.
ChannelRule = Callable[[onnx.NodeProto, int, int], int]

# The one rule for output-channel axes, per op reading the weight (used by the exporters and by
# ``analysis.simulate``): Conv 0, ConvTranspose 1, Gemm B 0 with transB else 1 (A as weight: its
# M rows), MatMul B the last axis (A: its rows), Gather 0, the recurrent ops' W/R 1.
CHANNEL_AXIS: dict[str, ChannelRule] = {
    "Conv": lambda node, slot, rank: 0,
    "ConvTranspose": lambda node, slot, rank: 1,
    "Gemm": lambda node, slot, rank: (
        (0 if _int_attr(node, "transB", 0) else 1) if slot == 1 else (1 if _int_attr(node, "transA", 0) else 0)
    ),
    "MatMul": lambda node, slot, rank: rank - 1 if slot == 1 else max(rank - 2, 0),
    "Gather": lambda node, slot, rank: 0,
    "LSTM": lambda node, slot, rank: 1,
    "GRU": lambda node, slot, rank: 1,
    "RNN": lambda node, slot, rank: 1,
}
# The (op, input slot) pairs onnxruntime's QDQ quantizer quantizes per channel.
QDQ_PER_CHANNEL = frozenset({("Conv", 1), ("ConvTranspose", 1), ("Gemm", 1), ("MatMul", 1)})


def channel_axis(
    model: onnx.ModelProto, weight: str, readers: Collection[tuple[str, int]] = QDQ_PER_CHANNEL
) -> int | None:
    """The output-channel axis of initializer ``weight`` (``CHANNEL_AXIS``), or None when it is not a
    per-channel candidate: not an initializer of rank 2 or more, read by an (op, slot) outside
    ``readers``, or read by ops whose axes disagree. The default ``readers`` mirror onnxruntime's QDQ
    operators."""
    init = next((t for t in model.graph.initializer if t.name == weight), None)
    if init is None or len(init.dims) < 2:
        return None
    axes: set[int] = set()
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name != weight:
                continue
            if (node.op_type, slot) not in readers or node.op_type not in CHANNEL_AXIS:
                return None
            axes.add(CHANNEL_AXIS[node.op_type](node, slot, len(init.dims)))
    return axes.pop() if len(axes) == 1 else None


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs a node holds (If branches, Loop/Scan bodies); empty for other ops."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def body_reads(node: onnx.NodeProto) -> set[str]:
    """Tensor names read inside ``node``'s subgraphs, nested ones included: a body reads an
    outer-scope tensor by name without listing it among the node's inputs."""
    return {name for body in bodies(node) for inner in body.node for name in (*inner.input, *body_reads(inner))}


def reads(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every tensor name ``nodes`` read, as inputs or from inside their subgraphs."""
    return {name for n in nodes for name in (*n.input, *body_reads(n))}


def producers(nodes: Iterable[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    """The node that writes each tensor name (the last one, should two claim it)."""
    return {name: node for node in nodes for name in node.output}


def walk_upstream(name: str, expand: Callable[[str], Iterable[str] | None]) -> bool:
    """Walk depth-first from tensor ``name`` towards the tensors it is computed from.

    ``expand`` is called once for each non-empty name reached and returns the names to walk on to,
    visited in that order (none for a leaf), or None to abandon the walk. True when it completed.
    """
    stack, seen = [name], set()
    while stack:
        current = stack.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        following = expand(current)
        if following is None:
            return False
        stack.extend(reversed(list(following)))
    return True


def producer_positions(nodes: Iterable[onnx.NodeProto]) -> dict[str, int]:
    """The index of the node that writes each tensor name (the last one, should two claim it)."""
    return {name: i for i, node in enumerate(nodes) for name in node.output}


def tensor_names(g: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph defines: initializers, node outputs and graph inputs."""
    return {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}


def node_name(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or a stable stand-in for unnamed nodes."""
    return node.name or f"{node.op_type}_{index}"


def input_specs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """The inputs a caller must feed (graph inputs that are not also initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs: dict[str, InputSpec] = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise ModelError(f"expected tensor inputs; input {value.name!r} is a sequence, map or optional")
        # paddle2onnx writes dim_value -1 for a dynamic size: read it as symbolic
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in ttype.shape.dim)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                f"expected a known element type for input {value.name!r}; found elem_type {ttype.elem_type}"
            ) from None
        specs[value.name] = InputSpec(name=value.name, dtype=dtype, shape=dims)
    return specs


def to_networkx(model: onnx.ModelProto) -> nx.MultiDiGraph:
    """Bipartite graph: tensor nodes ("t", name) and op nodes ("n", name), edges in data-flow order."""
    g = nx.MultiDiGraph()
    for i, node in enumerate(model.graph.node):
        key = ("n", node_name(node, i))
        g.add_node(key, op=node, index=i)
        for slot, name in enumerate(node.input):
            if name:
                g.add_edge(("t", name), key, slot=slot)
        for slot, name in enumerate(node.output):
            if name:
                g.add_edge(key, ("t", name), slot=slot)
    return g


def _constants(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """Name -> (shape, elem_type) for initializers and Constant-node outputs."""
    out = {t.name: (tuple(t.dims), t.data_type) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = node.attribute[0].t
            out[node.output[0]] = (tuple(t.dims), t.data_type)
    return out


ValueTypes = dict[str, tuple[int, tuple[int | None, ...] | None]]


def value_types(model: onnx.ModelProto) -> ValueTypes:
    """Element type and shape (None where unknown) of every tensor shape inference can tell."""
    return _value_types(model)


def _value_types(model: onnx.ModelProto) -> ValueTypes:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    out: dict[str, tuple[int, tuple[int | None, ...] | None]] = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            continue
        shape = (
            tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            if tt.HasField("shape")
            else None
        )
        out[v.name] = (tt.elem_type, shape)
    return out


WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})


def _window_misfit(node: onnx.NodeProto, types: ValueTypes) -> tuple[int, int] | None:
    """(window, padded input) of the first spatial axis where the window does not fit, if any."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER"):
        return None
    source = types.get(node.input[0], (0, None))[1] if node.input else None
    if source is None or len(source) < 3:
        return None
    kernel = attrs.get("kernel_shape")
    if kernel is None and node.op_type == "Conv" and len(node.input) > 1:
        weight = types.get(node.input[1], (0, None))[1]
        kernel = None if weight is None else list(weight[2:])
    spatial = source[2:]
    pads = list(attrs.get("pads", [0] * (2 * len(spatial))))
    dilations = list(attrs.get("dilations", [1] * len(spatial)))
    for axis, size in enumerate(spatial):
        if size is None or kernel is None or axis >= len(kernel) or kernel[axis] is None:
            continue
        window = dilations[axis] * (kernel[axis] - 1) + 1 if axis < len(dilations) else kernel[axis]
        padded = size + (pads[axis] + pads[axis + len(spatial)] if len(pads) == 2 * len(spatial) else 0)
        if window > padded:
            return window, padded
    return None


def check_window_outputs(model: onnx.ModelProto, types: ValueTypes) -> None:
    """Refuse a convolution or pooling whose window is larger than its (padded) input: onnxruntime
    crashes on such a graph (SIGFPE) instead of raising an error."""
    for i, node in enumerate(model.graph.node):
        if node.op_type not in WINDOW_OPS or node.domain not in ("", "ai.onnx"):
            continue
        misfit = _window_misfit(node, types)
        if misfit is not None:
            source = types.get(node.input[0], (0, None))[1]
            raise ModelError(
                f"node {node_name(node, i)!r} ({node.op_type}): expected a window that fits its input; "
                f"a window of {misfit[0]} meets {misfit[1]} padded positions (input shape {_dims(source)})",
                hint="check the node's kernel_shape, dilations and pads, the strides before it, and the input size",
            )


def _dims(shape: tuple[int | None, ...] | None) -> str:
    return "unknown" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def find_quantizable(model: onnx.ModelProto, types: ValueTypes | None = None) -> list[QuantTensor]:
    """The quantizable weights and activations of ``model``, in graph order, weights first per op."""
    g = to_networkx(model)
    consts = _constants(model)
    types = _value_types(model) if types is None else types
    producer = producers(model.graph.node)

    def source_constant(name: str) -> str | None:
        seen = 0
        while name not in consts:
            node = producer.get(name)
            if node is None or node.op_type not in LAYOUT_OPS or seen > 16:
                return None
            name = node.input[0]
            seen += 1
        return name

    def source_activation(name: str) -> str:
        for _ in range(16):
            node = producer.get(name)
            if node is None or node.doc_string != PREPARE_PASSTHROUGH:
                break
            name = node.input[0]
        return name

    order: list[str] = []
    info: dict[str, dict] = {}

    def add(name: str, kind: Kind, consumer: str, op_type: str, shape: tuple | None) -> None:
        if name not in info:
            order.append(name)
            info[name] = {"kind": kind, "nodes": [], "ops": [], "shape": shape}
        entry = info[name]
        if consumer not in entry["nodes"]:
            entry["nodes"].append(consumer)
            entry["ops"].append(op_type)

    for key in nx.topological_sort(g):
        if key[0] != "n":
            continue
        node: onnx.NodeProto = g.nodes[key]["op"]
        op = node.op_type
        if op not in WEIGHT_INPUTS or node.domain not in ("", "ai.onnx") or node.doc_string == PREPARE_INTERNAL:
            continue
        for slot, name in enumerate(node.input):
            if not name:
                continue
            src = source_constant(name)
            if src is not None and slot in WEIGHT_INPUTS[op]:
                shape, elem = consts[src]
                if elem in FLOAT_TYPES:
                    add(src, Kind.WEIGHT, key[1], op, shape)
            elif src is None and slot in ACTIVATION_INPUTS[op] and node.doc_string != PREPARE_WEIGHTS_ONLY:
                name = source_activation(name)
                elem, shape = types.get(name, (onnx.TensorProto.FLOAT, None))
                if elem in FLOAT_TYPES:
                    add(name, Kind.ACTIVATION, key[1], op, shape)
    return [
        QuantTensor(
            name=name,
            kind=info[name]["kind"],
            nodes=tuple(info[name]["nodes"]),
            op_types=tuple(info[name]["ops"]),
            shape=info[name]["shape"],
        )
        for name in order
    ]


def output_ranks(model: onnx.ModelProto, types: ValueTypes | None = None) -> dict[str, int]:
    """Rank of every tensor whose rank shape inference can tell."""
    types = _value_types(model) if types is None else types
    return {name: len(shape) for name, (_, shape) in types.items() if shape is not None}
