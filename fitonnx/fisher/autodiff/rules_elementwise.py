"""VJP rules of elementwise ops (unary, broadcasting binary, variadic)."""

from __future__ import annotations

import math

import onnx

from fitonnx.errors import UnsupportedError
from fitonnx.fisher.autodiff.builder import Builder, attr, describe
from fitonnx.fisher.autodiff.registry import Grads, rule


@rule("Identity")
def identity(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [g[0]]


@rule("Neg")
def neg(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Neg", g[0])]


@rule("Abs")
def abs_(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Mul", g[0], b.op("Sign", node.input[0]))]


@rule("Relu")
def relu(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """g·Sign(y), y = relu(x) ≥ 0: two fast elementwise kernels instead of Greater and Where."""
    return [b.op("Mul", g[0], b.op("Sign", node.output[0]))]


@rule("LeakyRelu")
def leaky_relu(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x = node.input[0]
    slope = b.op("Mul", g[0], b.scalar(float(attr(node, "alpha", 0.01)), x))
    return [b.op("Where", b.op("Greater", x, b.scalar(0, x)), g[0], slope)]


@rule("Sign", "Floor", "Ceil", "Round")
def piecewise_constant(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [None]  # zero almost everywhere: the input gets no contribution


@rule("Dropout")
def dropout(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """Inference-mode Dropout is the identity; a training_mode input is refused."""
    if len(node.input) > 2 and node.input[2]:
        raise UnsupportedError(f"expected Dropout without a training_mode input at {describe(node)}")
    return [g[0]]


@rule("Softplus")
def softplus(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Mul", g[0], b.op("Sigmoid", node.input[0]))]


@rule("Softsign")
def softsign(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x = node.input[0]
    denom = b.op("Add", b.scalar(1, x), b.op("Abs", x))
    return [b.op("Div", g[0], b.op("Mul", denom, denom))]


@rule("Elu")
def elu(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x, y = node.input[0], node.output[0]
    negative = b.op("Mul", g[0], b.op("Add", y, b.scalar(float(attr(node, "alpha", 1.0)), x)))
    return [b.op("Where", b.op("Greater", x, b.scalar(0, x)), g[0], negative)]


@rule("ThresholdedRelu")
def thresholded_relu(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x = node.input[0]
    return [b.op("Where", b.op("Greater", x, b.scalar(float(attr(node, "alpha", 1.0)), x)), g[0], b.scalar(0, x))]


@rule("HardSigmoid")
def hard_sigmoid(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x, y = node.input[0], node.output[0]
    inside = b.op("And", b.op("Greater", y, b.scalar(0, x)), b.op("Less", y, b.scalar(1, x)))
    slope = b.op("Mul", g[0], b.scalar(float(attr(node, "alpha", 0.2)), x))
    return [b.op("Where", inside, slope, b.scalar(0, x))]


@rule("HardSwish")
def hard_swish(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """y = x·clip(x/6 + 1/2, 0, 1): slope x/3 + 1/2 on (−3, 3), 1 above, 0 below."""
    x = node.input[0]
    middle = b.op("Add", b.op("Mul", x, b.scalar(1 / 3, x)), b.scalar(0.5, x))
    low = b.op("Where", b.op("Less", x, b.scalar(-3, x)), b.scalar(0, x), middle)
    return [b.op("Mul", g[0], b.op("Where", b.op("Greater", x, b.scalar(3, x)), b.scalar(1, x), low))]


@rule("PRelu")
def prelu(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x, slope, y = node.input[0], node.input[1], node.output[0]
    positive = b.op("Greater", x, b.scalar(0, x))
    zero = b.scalar(0, x)
    dx = b.op("Where", positive, g[0], b.op("Mul", g[0], slope))
    dslope = b.op("Where", positive, zero, b.op("Mul", g[0], x))
    return [b.unbroadcast(dx, x, y), b.unbroadcast(dslope, slope, y)]


@rule("Exp")
def exp(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Mul", g[0], node.output[0])]


@rule("Log")
def log(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Div", g[0], node.input[0])]


@rule("Sqrt")
def sqrt(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    y = node.output[0]
    return [b.op("Div", b.op("Mul", g[0], b.scalar(0.5, y)), y)]


@rule("Reciprocal")
def reciprocal(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    y = node.output[0]
    return [b.op("Neg", b.op("Mul", g[0], b.op("Mul", y, y)))]


@rule("Sigmoid")
def sigmoid(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    y = node.output[0]
    return [b.op("Mul", g[0], b.op("Mul", y, b.op("Sub", b.scalar(1, y), y)))]


@rule("Tanh")
def tanh(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    y = node.output[0]
    return [b.op("Mul", g[0], b.op("Sub", b.scalar(1, y), b.op("Mul", y, y)))]


@rule("Sin")
def sin(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Mul", g[0], b.op("Cos", node.input[0]))]


@rule("Cos")
def cos(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Neg", b.op("Mul", g[0], b.op("Sin", node.input[0])))]


@rule("Erf")
def erf(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x = node.input[0]
    bump = b.op("Exp", b.op("Neg", b.op("Mul", x, x)))
    return [b.op("Mul", g[0], b.op("Mul", bump, b.scalar(2 / math.sqrt(math.pi), x)))]


@rule("Gelu")
def gelu(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """d/dx of x·Φ(x) = Φ(x) + x·φ(x) (exact form) or of the tanh approximation."""
    x = node.input[0]
    s = lambda v: b.scalar(v, x)  # noqa: E731
    if attr(node, "approximate", "none") == "tanh":
        c = math.sqrt(2 / math.pi)
        x2 = b.op("Mul", x, x)
        t = b.op("Tanh", b.op("Mul", s(c), b.op("Add", x, b.op("Mul", s(0.044715), b.op("Mul", x2, x)))))
        du = b.op("Mul", s(c), b.op("Add", s(1), b.op("Mul", s(3 * 0.044715), x2)))
        left = b.op("Mul", s(0.5), b.op("Add", s(1), t))
        right = b.op("Mul", b.op("Mul", s(0.5), x), b.op("Mul", b.op("Sub", s(1), b.op("Mul", t, t)), du))
        return [b.op("Mul", g[0], b.op("Add", left, right))]
    cdf = b.op("Mul", s(0.5), b.op("Add", s(1), b.op("Erf", b.op("Mul", x, s(1 / math.sqrt(2))))))
    pdf = b.op("Mul", s(1 / math.sqrt(2 * math.pi)), b.op("Exp", b.op("Mul", s(-0.5), b.op("Mul", x, x))))
    return [b.op("Mul", g[0], b.op("Add", cdf, b.op("Mul", x, pdf)))]


@rule("Cast")
def cast(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return [b.op("Cast", g[0], to=b.dtype(node.input[0]))]


@rule("Clip")
def clip(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """The gradient passes where the clip kept x; a bound gets the gradient where it was taken."""
    x, y = node.input[0], node.output[0]
    zero = b.scalar(0, x)
    grads: Grads = [b.op("Where", b.op("Equal", x, y), g[0], zero)]
    for k, compare in ((1, "Less"), (2, "Greater")):
        bound = node.input[k] if len(node.input) > k else ""
        if b.needs(bound):
            taken = b.op("Where", b.op(compare, x, bound), g[0], zero)
            grads.append(b.reduce("ReduceSum", taken, None, keepdims=0))
        else:
            grads.append(None)
    return grads


@rule("Add")
def add(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    y = node.output[0]
    return [b.unbroadcast(g[0], x, y) for x in node.input]


@rule("Sum")
def sum_(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    return add(b, node, g)


@rule("Mean")
def mean(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    y = node.output[0]
    share = b.op("Div", g[0], b.scalar(len(node.input), y))
    return [b.unbroadcast(share, x, y) for x in node.input]


@rule("Sub")
def sub(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    a, c, y = node.input[0], node.input[1], node.output[0]
    return [b.unbroadcast(g[0], a, y), b.unbroadcast(b.op("Neg", g[0]), c, y)]


@rule("Mul")
def mul(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    a, c, y = node.input[0], node.input[1], node.output[0]
    return [b.unbroadcast(b.op("Mul", g[0], c), a, y), b.unbroadcast(b.op("Mul", g[0], a), c, y)]


@rule("Div")
def div(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    a, c, y = node.input[0], node.input[1], node.output[0]
    ga = b.op("Div", g[0], c)
    return [b.unbroadcast(ga, a, y), b.unbroadcast(b.op("Neg", b.op("Mul", ga, y)), c, y)]


@rule("Pow")
def pow_(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """d a^c = c·a^(c−1) da + a^c·log(a) dc (the second only when c needs a gradient)."""
    a, c, y = node.input[0], node.input[1], node.output[0]
    exponent = b.op("Cast", c, to=b.dtype(a)) if b.dtype(c) != b.dtype(a) else c
    da = b.op("Mul", g[0], b.op("Mul", exponent, b.op("Pow", a, b.op("Sub", exponent, b.scalar(1, a)))))
    grads: Grads = [b.unbroadcast(da, a, y), None]
    if b.needs(c):
        grads[1] = b.unbroadcast(b.op("Mul", g[0], b.op("Mul", y, b.op("Log", a))), c, y)
    return grads


@rule("Max", "Min")
def max_min(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """Each input equal to the result gets the gradient, shared equally among ties."""
    y = node.output[0]
    if len(node.input) == 1:
        return [g[0]]
    masks = [b.op("Cast", b.op("Equal", x, y), to=b.dtype(y)) for x in node.input]
    share = b.op("Div", g[0], b.op("Sum", *masks))
    return [b.unbroadcast(b.op("Mul", share, m), x, y) for x, m in zip(node.input, masks, strict=True)]


@rule("Where")
def where(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    cond, a, c = node.input
    y = node.output[0]
    zero = b.scalar(0, y)
    return [
        None,
        b.unbroadcast(b.op("Where", cond, g[0], zero), a, y),
        b.unbroadcast(b.op("Where", cond, zero, g[0]), c, y),
    ]


@rule("Softmax")
def softmax(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    y, axis = node.output[0], int(attr(node, "axis", -1))
    inner = b.reduce("ReduceSum", b.op("Mul", g[0], y), [axis], keepdims=1)
    return [b.op("Mul", y, b.op("Sub", g[0], inner))]


@rule("LogSoftmax")
def log_softmax(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    y, axis = node.output[0], int(attr(node, "axis", -1))
    total = b.reduce("ReduceSum", g[0], [axis], keepdims=1)
    return [b.op("Sub", g[0], b.op("Mul", b.op("Exp", y), total))]
