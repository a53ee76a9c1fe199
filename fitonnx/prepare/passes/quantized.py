"""Models that are already quantized: integer-op models refused, QDQ models scored on their float weights.

- Integer ops (ConvInteger, MatMulInteger, QLinearConv, DynamicQuantizeLSTM, ...) compute on
  integers that have no gradient and no float weight to score: ``check_integer_ops`` refuses the
  model with a line naming them.
- In a QDQ model each weight is ``DequantizeLinear(int8 constant)``: ``fold_weight_dequantize``
  replaces it by the float tensor it computes (exactly: (q − zero point)·scale in float32, as
  onnxruntime's kernel does), so the weights FIT scores are the float values the model uses.
- An activation's ``QuantizeLinear → DequantizeLinear`` pair rounds: its true derivative is zero
  almost everywhere, so no gradient would reach the weights before it. ``fix_activation_qdq`` keeps
  each pair (the twin computes exactly what the model computes, rounding included) and gives it the
  gradient of the clipped straight-through estimator: 1 where the activation lies inside the grid's
  range [(qmin − z)·s, (qmax − z)·s], 0 where it saturates. This is the backward of PyTorch's
  fake-quantize and of onnxruntime-training's FakeQuant: rounding moves a value by at most half a step
  and is zero-mean noise to first order, so the local sensitivity of the loss is that of the unrounded
  value; saturation is a real flat region, whose derivative is 0. (Treating the rounding as constant
  noise added to the activation, gradient 1 everywhere, would also count saturated elements.)
  ONNX has no stop-gradient op, so the pair becomes ``y = c + (r − stop(c))`` with ``c = Clip(x, lo,
  hi)``, ``r`` the pair's own output, and ``stop`` a BatchNormalization whose mean input is ``c``
  (onnxruntime-training never differentiates a BatchNormalization's mean; fitonnx's engine follows
  it: ``model.graph.STOP_GRADIENT_INPUTS``). The forward is bit-exact: |r − c| ≤ s/2 makes ``r − c``
  exact in float32 (Sterbenz: r and c are within a factor 2 of each other, or r = 0), so ``c + (r − c)``
  is ``r``; where x saturates, c and r are the same end of the grid.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from fitonnx.errors import UnsupportedError
from fitonnx.model import external
from fitonnx.model.graph import PREPARE_PASSTHROUGH
from fitonnx.prepare.shapes import tensor_types
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


# Integer grids QuantizeLinear can round to: element type -> (qmin, qmax).
QUANT_RANGES: dict[int, tuple[int, int]] = {
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT4: (-8, 7),
    onnx.TensorProto.UINT4: (0, 15),
}


def _quant_type(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    """The element type ``q`` rounds to: its zero point's, else ``output_dtype``, else uint8 (the default)."""
    if len(q.input) > 2 and q.input[2]:
        return inits[q.input[2]].data_type
    return next((a.i for a in q.attribute if a.name == "output_dtype" and a.i), onnx.TensorProto.UINT8)


def _quantizer_range(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.float32, np.float32]:
    """The dequantized values ``q``'s grid saturates at, (qmin − z)·s and (qmax − z)·s in float32 as
    DequantizeLinear computes them; refuse a quantizer this pass does not cover, naming it."""
    name = q.name or q.output[0]
    params = [x for x in q.input[1:] if x]
    if any(x not in inits for x in params) or any(a.name == "block_size" and a.i for a in q.attribute):
        raise UnsupportedError(
            f"expected activation QuantizeLinear nodes with constant scale and zero point; {name!r} computes them "
            "at run time or quantizes in blocks",
            hint="score the float model it was quantized from",
        )
    scale = external.tensor_array(inits[q.input[1]])
    elem = _quant_type(q, inits)
    if scale.size != 1 or elem not in QUANT_RANGES:
        what = "per-axis" if scale.size != 1 else onnx.helper.tensor_dtype_to_np_dtype(elem).name
        raise UnsupportedError(
            f"expected per-tensor integer activation quantizers; QuantizeLinear {name!r} is {what}",
            hint="score the float model it was quantized from",
        )
    zero = int(external.tensor_array(inits[q.input[2]]).reshape(-1)[0]) if len(q.input) > 2 and q.input[2] else 0
    qmin, qmax = QUANT_RANGES[elem]
    s = np.float32(scale.reshape(-1)[0])
    return np.float32(np.float32(qmin - zero) * s), np.float32(np.float32(qmax - zero) * s)


class _Names:
    """Fresh tensor names next to existing ones."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
        self.taken |= {x for n in _all_nodes(graph) for x in (*n.input, *n.output)}

    def __call__(self, stem: str) -> str:
        name, k = stem, 1
        while name in self.taken:
            k += 1
            name = f"{stem}{k}"
        self.taken.add(name)
        return name


def _fixed_quantizer(
    x: str, r: str, y: str, bounds: tuple[np.float32, np.float32], fresh: _Names, shape: tuple | None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``y = c + (r − stop(c))`` with ``c = Clip(x, lo, hi)``: exactly ``r`` (see the
    module docstring) with the gradient of ``c``. ``stop(c)`` is ``−BatchNormalization(0, 1, 0, mean=c,
    var=1, ε=0)`` over c flattened, whose mean carries no gradient in either engine
    (``STOP_GRADIENT_INPUTS``). With ``shape`` (x's, when static) every shape is a constant, so shape
    inference follows the pair (onnxruntime-training's pooling gradients need the static shapes)."""
    make, t = onnx.helper.make_node, lambda hint: fresh(f"{y}__fixed_{hint}")
    one, zero = (numpy_helper.from_array(np.array([v], np.float32)) for v in (1.0, 0.0))
    lo, hi, flat_shape = t("lo"), t("hi"), t("flat")
    inits = [
        numpy_helper.from_array(bounds[0], lo),
        numpy_helper.from_array(bounds[1], hi),
        numpy_helper.from_array(np.array([-1], np.int64), flat_shape),
    ]
    c, flat, m, m2, ones, zeros, zx, neg_flat, back, neg, noise = (
        t(h) for h in ("clip", "c", "m", "m2", "ones", "zeros", "zx", "negflat", "shape", "neg", "noise")
    )
    nodes = [
        make("Clip", [x, lo, hi], [c], name=c, doc_string=PREPARE_PASSTHROUGH),
        make("Reshape", [c, flat_shape], [flat], name=flat),
    ]
    if shape is not None:
        size = int(np.prod(shape, dtype=np.int64))
        for name, value in ((m, [size]), (m2, [1, size]), (back, list(shape))):
            inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
    else:
        one_dim = t("one")
        inits.append(numpy_helper.from_array(np.array([1], np.int64), one_dim))
        nodes += [
            make("Shape", [flat], [m], name=m),
            make("Concat", [one_dim, m], [m2], name=m2, axis=0),
            make("Shape", [c], [back], name=back),
        ]
    nodes += [
        make("ConstantOfShape", [m], [ones], name=ones, value=one),
        make("ConstantOfShape", [m], [zeros], name=zeros, value=zero),
        make("ConstantOfShape", [m2], [zx], name=zx, value=zero),
        make("BatchNormalization", [zx, ones, zeros, flat, ones], [neg_flat], name=neg_flat, epsilon=0.0),
        make("Reshape", [neg_flat, back], [neg], name=neg),
        make("Add", [r, neg], [noise], name=noise),
        make("Add", [c, noise], [y], name=t("add"), doc_string=PREPARE_PASSTHROUGH),
    ]
    return nodes, inits


def fix_activation_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    """Keep each activation ``QuantizeLinear → DequantizeLinear`` pair as a fixed quantizer whose
    gradient is the clipped straight-through estimator; one QUANTIZED change naming them, or none."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    types = tensor_types(model)
    fresh = _Names(g)
    nodes: list[onnx.NodeProto] = []
    fixed: dict[tuple[str, ...], str] = {}  # the DequantizeLinear's inputs -> the fixed quantizer's output
    for node in g.node:
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
            nodes.append(node)
            continue
        y, key = node.output[0], tuple(node.input)
        if key in fixed:  # another reader's copy of the same DequantizeLinear (onnxruntime's quantizer makes them)
            nodes.append(onnx.helper.make_node("Identity", [fixed[key]], [y], doc_string=PREPARE_PASSTHROUGH))
            continue
        r = fresh(f"{y}__fixed_rounded")
        node.output[0] = r
        known = types.get(q.input[0])
        shape = known.static_shape if known is not None else None
        added, constants = _fixed_quantizer(q.input[0], r, y, _quantizer_range(q, inits), fresh, shape)
        nodes += [node, *added]
        g.initializer.extend(constants)
        fixed[key] = y
    if not fixed:
        return model, []
    del g.node[:]
    g.node.extend(nodes)
    names = list(dict.fromkeys(producer[key[0]].input[0] for key in fixed))
    shown = ", ".join(repr(s) for s in names[:5]) + (" ..." if len(names) > 5 else "")
    detail = (
        f"{len(names)} activation QuantizeLinear/DequantizeLinear pair(s) kept as fixed quantizers ({shown}): the "
        "model's own rounding stays in the forward; the gradient passes each pair inside its range and stops where "
        "it saturates (a clipped straight-through estimator)"
    )
    return out, [Change(ChangeKind.QUANTIZED, "model", detail)]
