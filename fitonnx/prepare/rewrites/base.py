"""The rewrite builder and registry: a rewrite turns one node into equivalent nodes with gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fitonnx.model import external
from fitonnx.model.graph import FLOAT_TYPES, PREPARE_INTERNAL, PREPARE_PASSTHROUGH
from fitonnx.prepare.shapes import Dim, TensorType

DEFAULT_DOMAINS = ("", "ai.onnx")


class NoRewrite(Exception):
    """The node's form is not covered by its rewrite (the message says why)."""


@dataclass(frozen=True)
class RewriteContext:
    """What rewrites may read about the whole model."""

    opset: int
    types: dict[str, TensorType]
    initializers: dict[str, onnx.TensorProto]
    readers: dict[str, int]  # tensor name -> number of node inputs and graph outputs reading it


class Builder:
    """Collects the nodes and initializers replacing one node, with names that cannot collide."""

    def __init__(self, ctx: RewriteContext, node: onnx.NodeProto, taken: set[str], index: int) -> None:
        self.ctx = ctx
        self.node = node
        self.taken = taken
        self.base = node.name or f"{node.op_type}_{index}"
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.origins: list[tuple[str, tuple[str, ...]]] = []
        self._k = 0
        self._static: dict[str, int] = {}  # 1-element int64 constants made by ``dims``/``dim_const``

    # -- names and constants ------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        stem = f"{self.node.output[0] or self.base}__{hint}"
        name, k = stem, 1
        while name in self.taken:
            k += 1
            name = f"{stem}{k}"
        self.taken.add(name)
        return name

    def input(self, k: int) -> str:
        return self.node.input[k] if len(self.node.input) > k else ""

    def output(self, k: int = 0) -> str:
        return self.node.output[k]

    def attr(self, name: str, default: object = None) -> object:
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def dtype(self, name: str | None = None) -> np.dtype:
        t = self.ctx.types.get(name or self.input(0))
        if t is None or t.elem_type == 0:
            return np.dtype(np.float32)
        return np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))

    def is_float(self, name: str) -> bool:
        t = self.ctx.types.get(name)
        return t is None or t.elem_type in FLOAT_TYPES

    def const(self, value: np.ndarray | float | Sequence[int], hint: str = "c", dtype: np.dtype | None = None) -> str:
        array = np.asarray(value, dtype=dtype if dtype is not None else self.dtype())
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values: Sequence[int], hint: str = "i") -> str:
        return self.const(np.asarray(list(values), np.int64), hint, np.dtype(np.int64))

    def scalar(self, value: float, hint: str = "c") -> str:
        return self.const(np.asarray(value), hint)

    def replace_constant(self, name: str, value: np.ndarray) -> str:
        """A new value for the existing initializer ``name`` (a weight rewritten in place, same name)."""
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def constant_value(self, name: str) -> np.ndarray | None:
        tensor = self.ctx.initializers.get(name)
        return None if tensor is None else external.tensor_array(tensor)

    def require_constant(self, name: str, what: str) -> np.ndarray:
        value = self.constant_value(name)
        if value is None:
            raise NoRewrite(f"expected {what} to be a constant; it is computed at run time")
        return value

    # -- shapes -------------------------------------------------------------------------------
    def shape(self, name: str | None = None) -> tuple[Dim, ...]:
        t = self.ctx.types.get(name or self.input(0))
        if t is None or t.shape is None:
            raise NoRewrite(f"expected a known rank for {name or self.input(0)!r}; shape inference found none")
        return t.shape

    def rank(self, name: str | None = None) -> int:
        return len(self.shape(name))

    def static_dim(self, name: str, axis: int, why: str) -> int:
        dim = self.shape(name)[axis]
        if not isinstance(dim, int):
            raise NoRewrite(f"expected a static size of axis {axis} of {name!r} ({why}); found {dim or 'unknown'}")
        return dim

    # -- nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, outputs: int = 1, **attrs) -> str:
        """Append a node; return its first output (a fresh name)."""
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self._k += 1
        node = helper.make_node(op_type, list(inputs), names, name=f"{self.base}/{op_type}_{self._k}", **attrs)
        self.nodes.append(node)
        return names[0]

    def _mark(self, tensor: str, mark: str) -> str:
        for node in self.nodes:
            if tensor in node.output:
                node.doc_string = mark
        return tensor

    def passthrough(self, tensor: str) -> str:
        """Mark the node producing ``tensor`` as only rearranging its first input (graph.py looks through it)."""
        return self._mark(tensor, PREPARE_PASSTHROUGH)

    def internal(self, tensor: str) -> str:
        """Mark the MatMul/Conv producing ``tensor`` as not an op of the model (graph.py ignores it)."""
        return self._mark(tensor, PREPARE_INTERNAL)

    def ops(self, op_type: str, inputs: Sequence[str], outputs: int, hint: str | None = None, **attrs) -> list[str]:
        """Append a node with several outputs; return them all."""
        first = self.op(op_type, inputs, hint, outputs=outputs, **attrs)
        return list(self.nodes[-1].output) if self.nodes[-1].output[0] == first else [first]

    def finish(self, tensor: str, k: int = 0) -> None:
        """Make ``tensor`` the node's ``k``-th output (renaming the producing node's output)."""
        target = self.node.output[k]
        for node in reversed(self.nodes):
            for slot, name in enumerate(node.output):
                if name == tensor:
                    node.output[slot] = target
                    for other in self.nodes:
                        for j, inp in enumerate(other.input):
                            if inp == tensor:
                                other.input[j] = target
                    return
        self.nodes.append(helper.make_node("Identity", [tensor], [target], name=f"{self.base}/Identity"))

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: int, hint: str | None = None) -> str:
        """A Reduce* node in the form this opset wants (axes as input from 13 for ReduceSum, 18 for the rest)."""
        as_input = self.ctx.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.op(op_type, [x], hint, keepdims=keepdims)
        if as_input:
            return self.op(op_type, [x, self.ints(axes, "axes")], hint, keepdims=keepdims)
        return self.op(op_type, [x], hint, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if not axes:
            return x
        if self.ctx.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes, "axes")])
        return self.op("Unsqueeze", [x], axes=list(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if not axes:
            return x
        if self.ctx.opset >= 13:
            return self.op("Squeeze", [x, self.ints(axes, "axes")])
        return self.op("Squeeze", [x], axes=list(axes))

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        if list(perm) == sorted(perm):
            return x
        return self.op("Transpose", [x], perm=list(perm))

    def dims(self, x: str) -> list[str]:
        """One 1-element int64 tensor per axis of ``x``: a constant when static, else sliced from Shape."""
        shape = self.shape(x)
        dynamic = None
        out: list[str] = []
        for k, d in enumerate(shape):
            if isinstance(d, int):
                out.append(self.dim_const(d))
                continue
            if dynamic is None:
                dynamic = self.op("Shape", [x], "shape")
            out.append(self.op("Slice", [dynamic, self.ints([k]), self.ints([k + 1])], f"dim{k}"))
        return out

    def dim_const(self, value: int) -> str:
        name = self.ints([value], "dim")
        self._static[name] = int(value)
        return name

    def int_op(self, op_type: str, a: str, value: int) -> str:
        """``a`` (a 1-element int64 dim) times or divided by ``value``; folded when ``a`` is static."""
        if a in self._static:
            known = self._static[a]
            return self.dim_const(known * value if op_type == "Mul" else known // value)
        return self.op(op_type, [a, self.ints([value])])

    def mul_dims(self, a: str, c: str) -> str:
        if a in self._static and c in self._static:
            return self.dim_const(self._static[a] * self._static[c])
        return self.op("Mul", [a, c])

    def shape_of(self, parts: Sequence[str]) -> str:
        """A shape tensor from 1-element dims: a constant when every part is static.

        Static shapes matter: onnxruntime-training takes the output shape of pooling gradients from
        shapes known when the gradient graph is built, and a computed Reshape target hides them.
        """
        if all(p in self._static for p in parts):
            return self.ints([self._static[p] for p in parts], "shape")
        return self.op("Concat", list(parts), "shape", axis=0)

    def output_dims(self, k: int = 0) -> list[str] | None:
        """Dims of the node's own ``k``-th output as inferred, if all static."""
        t = self.ctx.types.get(self.node.output[k])
        if t is None or t.static_shape is None:
            return None
        return [self.dim_const(d) for d in t.static_shape]


RewriteFn = Callable[[Builder], str | None]
REWRITES: dict[str, RewriteFn] = {}


def rewrite(*op_types: str) -> Callable[[RewriteFn], RewriteFn]:
    """Register a rewrite for ``op_types`` (default ONNX domain)."""

    def register(fn: RewriteFn) -> RewriteFn:
        for op_type in op_types:
            if op_type in REWRITES:
                raise ValueError(f"a rewrite for {op_type} is already registered")
            REWRITES[op_type] = fn
        return fn

    return register


def reduce_axes(b: Builder, rank: int) -> list[int] | None:
    """The Reduce*'s axes (attribute, or constant input from the opset that moved them), normalized; None = all."""
    axes = b.attr("axes")
    if axes is None and b.input(1):
        axes = b.require_constant(b.input(1), "the axes input").tolist()
    if axes is None or len(axes) == 0:
        if b.attr("noop_with_empty_axes", 0) and axes is not None:
            return []
        return None
    return sorted({int(a) % rank for a in axes})


def node_attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def square(b: Builder, x: str) -> str:
    """x² as Pow(x, 2): a Mul(x, x) of a differentiated tensor makes the builder define x_grad twice."""
    return b.op("Pow", [x, b.scalar(2.0, "two")], "sq")
