"""The rewrite registry: op type -> equivalent nodes whose gradients onnxruntime-training 1.19 has.

Written here because no library pass does this: ONNX function bodies (onnx.inliner) cover only a few
of these ops and expand into ops that lack gradients just as often. Every rewrite computes the same
function as the op it replaces (checked numerically in tests/test_prepare.py against onnxruntime's
kernel of the original op, and by ``verify`` on every prepared model), writes the op's original
output names, and uses only ops whose gradient builds and runs on the CPU (see
``support.GRADIENT_OPS``, measured by scripts/probe_gradients.py).

A rewrite function returns a short description of what it produced, ``None`` when the node needs
no rewrite (e.g. exact Gelu, whose gradient is correct), or raises ``NoRewrite`` with the reason
when the node's form is not covered; the node is then left as it is and ``support`` reports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.model.graph import PREPARE_INTERNAL, PREPARE_PASSTHROUGH
from fitonnx.prepare.pipeline import Change
from fitonnx.prepare.shapes import Dim, TensorType, tensor_types

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
        return t is None or t.elem_type in (
            TensorProto.FLOAT,
            TensorProto.DOUBLE,
            TensorProto.FLOAT16,
            TensorProto.BFLOAT16,
        )

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
        return None if tensor is None else numpy_helper.to_array(tensor)

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


def _axes(b: Builder, rank: int) -> list[int] | None:
    """The Reduce*'s axes (attribute, or constant input from the opset that moved them), normalized; None = all."""
    axes = b.attr("axes")
    if axes is None and b.input(1):
        axes = b.require_constant(b.input(1), "the axes input").tolist()
    if axes is None or len(axes) == 0:
        if b.attr("noop_with_empty_axes", 0) and axes is not None:
            return []
        return None
    return sorted({int(a) % rank for a in axes})


# ---------------------------------------------------------------------------------------------
# Elementwise activations
# ---------------------------------------------------------------------------------------------


def _hard_sigmoid(b: Builder, x: str, alpha: float, beta: float) -> str:
    scaled = b.op("Add", [b.op("Mul", [x, b.scalar(alpha, "alpha")]), b.scalar(beta, "beta")])
    return b.op("Clip", [scaled, b.scalar(0.0, "zero"), b.scalar(1.0, "one")], "hsig")


@rewrite("HardSigmoid")
def hard_sigmoid(b: Builder) -> str:
    alpha, beta = float(b.attr("alpha", 0.2)), float(b.attr("beta", 0.5))
    b.finish(_hard_sigmoid(b, b.input(0), alpha, beta))
    return f"Clip(x*{alpha:g}+{beta:g}, 0, 1)"


@rewrite("HardSwish")
def hard_swish(b: Builder) -> str:
    x = b.input(0)
    b.finish(b.op("Mul", [x, _hard_sigmoid(b, x, 1.0 / 6.0, 0.5)]))
    return "x*Clip(x/6+0.5, 0, 1)"


@rewrite("PRelu")
def prelu(b: Builder) -> str:
    x, slope = b.input(0), b.input(1)
    negative = b.op("Mul", [slope, b.op("Min", [x, b.scalar(0.0, "zero")])])
    b.finish(b.op("Add", [b.op("Relu", [x]), negative]))
    return "Relu(x)+slope*Min(x, 0)"


def _exp_minus_one_negative(b: Builder, x: str, alpha: float, inner_scale: float = 1.0) -> str:
    """alpha·(exp(min(x, 0)·inner_scale) − 1): the negative branch of Elu/Selu/Celu, 0 for x ≥ 0."""
    m = b.op("Min", [x, b.scalar(0.0, "zero")])
    if inner_scale != 1.0:
        m = b.op("Mul", [m, b.scalar(inner_scale, "inv_alpha")])
    e = b.op("Sub", [b.op("Exp", [m]), b.scalar(1.0, "one")])
    return b.op("Mul", [e, b.scalar(alpha, "alpha")])


@rewrite("Elu")
def elu(b: Builder) -> str:
    alpha = float(b.attr("alpha", 1.0))
    x = b.input(0)
    b.finish(b.op("Add", [b.op("Relu", [x]), _exp_minus_one_negative(b, x, alpha)]))
    return f"Relu(x)+{alpha:g}*(Exp(Min(x, 0))-1)"


@rewrite("Selu")
def selu(b: Builder) -> str:
    alpha = float(b.attr("alpha", 1.67326319217681884765625))
    gamma = float(b.attr("gamma", 1.05070102214813232421875))
    x = b.input(0)
    inner = b.op("Add", [b.op("Relu", [x]), _exp_minus_one_negative(b, x, alpha)])
    b.finish(b.op("Mul", [inner, b.scalar(gamma, "gamma")]))
    return "gamma*(Relu(x)+alpha*(Exp(Min(x, 0))-1))"


@rewrite("Celu")
def celu(b: Builder) -> str:
    alpha = float(b.attr("alpha", 1.0))
    x = b.input(0)
    b.finish(b.op("Add", [b.op("Relu", [x]), _exp_minus_one_negative(b, x, alpha, 1.0 / alpha)]))
    return "Relu(x)+alpha*(Exp(Min(x, 0)/alpha)-1)"


def _softplus(b: Builder, x: str) -> str:
    """log(1 + e^x) = relu(x) + log(1 + e^−|x|): never overflows."""
    tail = b.op("Log", [b.op("Add", [b.op("Exp", [b.op("Neg", [b.op("Abs", [x])])]), b.scalar(1.0, "one")])])
    return b.op("Add", [b.op("Relu", [x]), tail], "softplus")


@rewrite("Softplus")
def softplus(b: Builder) -> str:
    b.finish(_softplus(b, b.input(0)))
    return "Relu(x)+Log(1+Exp(-|x|))"


@rewrite("Mish")
def mish(b: Builder) -> str:
    x = b.input(0)
    b.finish(b.op("Mul", [x, b.op("Tanh", [_softplus(b, x)])]))
    return "x*Tanh(Softplus(x))"


@rewrite("Softsign")
def softsign(b: Builder) -> str:
    x = b.input(0)
    b.finish(b.op("Div", [x, b.op("Add", [b.op("Abs", [x]), b.scalar(1.0, "one")])]))
    return "x/(1+|x|)"


@rewrite("ThresholdedRelu")
def thresholded_relu(b: Builder) -> str:
    alpha = float(b.attr("alpha", 1.0))
    x = b.input(0)
    above = b.op("Greater", [x, b.scalar(alpha, "alpha")])
    b.finish(b.op("Where", [above, x, b.scalar(0.0, "zero")]))
    return f"Where(x>{alpha:g}, x, 0)"


@rewrite("Shrink")
def shrink(b: Builder) -> str:
    bias, lambd = float(b.attr("bias", 0.0)), float(b.attr("lambd", 0.5))
    x = b.input(0)
    upper = b.op("Where", [b.op("Greater", [x, b.scalar(lambd)]), b.op("Sub", [x, b.scalar(bias)]), b.scalar(0.0)])
    lower = b.op("Less", [x, b.scalar(-lambd)])
    b.finish(b.op("Where", [lower, b.op("Add", [x, b.scalar(bias)]), upper]))
    return "Where(x<-lambd, x+bias, Where(x>lambd, x-bias, 0))"


@rewrite("Gelu")
def gelu(b: Builder) -> str | None:
    # onnxruntime's Gelu gradient is the exact one even for approximate="tanh" (measured: 9e-4 off),
    # so only the tanh form is rewritten; exact Gelu keeps its correct fused gradient.
    if b.attr("approximate", "none") != "tanh":
        return None
    x = b.input(0)
    cube = b.op("Mul", [b.op("Mul", [x, x]), x])
    inner = b.op("Add", [x, b.op("Mul", [cube, b.scalar(0.044715)])])
    t = b.op("Tanh", [b.op("Mul", [inner, b.scalar(math.sqrt(2.0 / math.pi))])])
    half_x = b.op("Mul", [x, b.scalar(0.5, "half")])
    b.finish(b.op("Mul", [half_x, b.op("Add", [t, b.scalar(1.0, "one")])]))
    return "0.5*x*(1+Tanh(sqrt(2/pi)*(x+0.044715*x^3)))"


@rewrite("Sinh", "Cosh")
def sinh_cosh(b: Builder) -> str:
    x = b.input(0)
    ep, en = b.op("Exp", [x]), b.op("Exp", [b.op("Neg", [x])])
    combined = b.op("Sub" if b.node.op_type == "Sinh" else "Add", [ep, en])
    b.finish(b.op("Mul", [combined, b.scalar(0.5, "half")]))
    return "(Exp(x)" + ("-" if b.node.op_type == "Sinh" else "+") + "Exp(-x))/2"


@rewrite("Tan")
def tan(b: Builder) -> str:
    x = b.input(0)
    b.finish(b.op("Div", [b.op("Sin", [x]), b.op("Cos", [x])]))
    return "Sin(x)/Cos(x)"


@rewrite("Floor", "Ceil", "Round", "Sign", "Hardmax")
def piecewise_constant(b: Builder) -> str:
    # Zero derivative almost everywhere: route the result through int64, where gradients stop.
    # Exact for integral results of magnitude below 2^63.
    if not b.is_float(b.input(0)):
        return None  # type: ignore[return-value]
    kept = b.op(b.node.op_type, [b.input(0)], b.node.op_type.lower(), **_attrs(b.node))
    as_int = b.op("Cast", [kept], "int", to=TensorProto.INT64)
    b.finish(b.op("Cast", [as_int], "back", to=helper.np_dtype_to_tensor_dtype(b.dtype())))
    return f"Cast(Cast({b.node.op_type}(x), int64)) (zero gradient, as the op's own derivative)"


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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


def _channel_shape(rank: int, channels: int) -> tuple[int, ...]:
    return (channels,) + (1,) * (rank - 2)


@rewrite("BatchNormalization")
def batch_norm(b: Builder) -> str:
    from fitonnx.prepare.passes.batchnorm import bn_affine, is_inference_bn

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


def square(b: Builder, x: str) -> str:
    """x² as Pow(x, 2): a Mul(x, x) of a differentiated tensor makes the builder define x_grad twice."""
    return b.op("Pow", [x, b.scalar(2.0, "two")], "sq")


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
        **_attrs(b.node),
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


@rewrite("Einsum")
def einsum(b: Builder) -> str:
    from fitonnx.prepare.rewrites.einsum import rewrite_einsum

    return rewrite_einsum(b)


@rewrite("ConvTranspose")
def conv_transpose(b: Builder) -> str:
    from fitonnx.prepare.rewrites.conv_transpose import rewrite_conv_transpose

    return rewrite_conv_transpose(b)


@rewrite("LSTM", "GRU", "RNN")
def recurrent(b: Builder) -> str:
    from fitonnx.prepare.rewrites.recurrent import rewrite_recurrent

    return rewrite_recurrent(b)


@rewrite("Resize", "Upsample")
def resize(b: Builder) -> str:
    from fitonnx.prepare.rewrites.resize import rewrite_resize

    return rewrite_resize(b)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def context(model: onnx.ModelProto) -> RewriteContext:
    from fitonnx.prepare.opset import opset_of

    readers: dict[str, int] = {}
    for name in [i for n in model.graph.node for i in n.input] + [o.name for o in model.graph.output]:
        readers[name] = readers.get(name, 0) + 1
    return RewriteContext(
        opset=opset_of(model),
        types=tensor_types(model),
        initializers={t.name: t for t in model.graph.initializer},
        readers=readers,
    )


def _needs_rewrite(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    if node.domain not in DEFAULT_DOMAINS or node.op_type not in REWRITES:
        return False
    # A node of constants only is no gradient's business (the optimizer usually folds it).
    return any(name and name not in initializers for name in node.input)


def try_rewrite(
    ctx: RewriteContext, node: onnx.NodeProto, taken: set[str], index: int
) -> tuple[Builder, str | None] | NoRewrite:
    """Run the node's rewrite: (builder, description or None if no rewrite is needed), or the reason it failed."""
    builder = Builder(ctx, node, taken, index)
    try:
        return builder, REWRITES[node.op_type](builder)
    except NoRewrite as reason:
        return reason


def explain(ctx: RewriteContext, node: onnx.NodeProto, index: int) -> str | None:
    """Why the registered rewrite of ``node`` does not apply; None if it applies, is not needed, or none exists."""
    if not _needs_rewrite(node, ctx.initializers):
        return None
    taken = set(ctx.types) | set(ctx.initializers) | {o for o in node.output}
    result = try_rewrite(ctx, node, taken, index)
    return str(result) if isinstance(result, NoRewrite) else None


def rewrite_ops(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if not any(_needs_rewrite(n, {t.name: t for t in g.initializer}) for n in g.node):
        return out, []
    ctx = context(out)
    taken = {o for n in g.node for o in n.output} | {i for n in g.node for i in n.input} | set(ctx.initializers)
    taken |= {v.name for v in g.input}
    nodes: list[onnx.NodeProto] = []
    changes: list[Change] = []
    replaced: set[str] = set()
    for index, node in enumerate(g.node):
        if not _needs_rewrite(node, ctx.initializers):
            nodes.append(node)
            continue
        result = try_rewrite(ctx, node, taken, index)
        if isinstance(result, NoRewrite) or result[1] is None:
            nodes.append(node)
            continue
        builder, description = result
        nodes.extend(builder.nodes)
        for tensor in builder.initializers:
            if tensor.name in replaced or tensor.name in ctx.initializers:
                replaced.add(tensor.name)  # a rewrite replacing a weight in place (same name)
            g.initializer.append(tensor)
        changes.append(
            Change(
                "rewrite",
                builder.base,
                f"{node.op_type} -> {description}",
                origins=tuple(builder.origins),
            )
        )
    if replaced:
        kept = {}
        for tensor in g.initializer:
            kept[tensor.name] = tensor  # the last one with a name wins: the rewrite's
        del g.initializer[:]
        g.initializer.extend(kept.values())
    del g.node[:]
    g.node.extend(nodes)
    from fitonnx.prepare.passes.batchnorm import drop_unused_initializers

    drop_unused_initializers(g)
    return out, changes
