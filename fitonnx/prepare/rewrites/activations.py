"""Elementwise activations as ops with gradients."""

from __future__ import annotations

import math

from onnx import TensorProto, helper

from fitonnx.prepare.rewrites.base import Builder, node_attrs, rewrite

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
    kept = b.op(b.node.op_type, [b.input(0)], b.node.op_type.lower(), **node_attrs(b.node))
    as_int = b.op("Cast", [kept], "int", to=TensorProto.INT64)
    b.finish(b.op("Cast", [as_int], "back", to=helper.np_dtype_to_tensor_dtype(b.dtype())))
    return f"Cast(Cast({b.node.op_type}(x), int64)) (zero gradient, as the op's own derivative)"
