"""Every VJP rule of fitonnx.fisher.autodiff against central finite differences (one case per rule
form; see tests.test_autodiff_harness.py for the loss and the reference).

Precision: float64 cases (where both onnxruntime 1.19.2 and the latest have double kernels for the
forward and backward ops) use EPS = 1e-5 and TOL = 1e-6: truncation ≈ EPS²·|f'''| ≈ 1e-10 and
rounding ≈ 1e-16/EPS ≈ 1e-11 relative. Float32 cases (Conv, pooling, Erf, Gelu, Cos, ReduceL2)
are linear in the perturbed element where possible (MatMul too: onnxruntime 1.19.2 fuses
Transpose+MatMul into a FusedMatMul that has no double kernel), so any step is exact up to rounding, and a
step of 0.5 gives rounding ≈ 6e-8·|loss|/0.5 ≲ 1e-5 relative (TOL32_LINEAR = 1e-4); nonlinear
float32 cases use a step of 1e-2, truncation ≈ 1e-5 and rounding ≈ 1e-5 (TOL32 = 2e-3).
Piecewise-linear ops get inputs on a shuffled grid with spacing 0.1 ≫ EPS, so no step crosses a
kink (and MaxPool/TopK/Max have no ties).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.test_autodiff_harness import check, make_model

EPS, TOL = 1e-5, 1e-6
EPS32, TOL32 = 1e-2, 2e-3
EPS32_LINEAR, TOL32_LINEAR = 0.5, 1e-4
F64, F32 = np.float64, np.float32
n = helper.make_node


def r(*shape: int, dtype: type = F64, seed: int = 0, low: float | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed + 17 * len(shape) + sum(shape))
    x = rng.normal(size=shape) if low is None else rng.uniform(low, low + 2, size=shape)
    return x.astype(dtype)


def grid(*shape: int, dtype: type = F64, seed: int = 0) -> np.ndarray:
    """Distinct values 0.1 apart (centred on 0), shuffled: no ties, no kink within a step."""
    size = int(np.prod(shape))
    values = (np.arange(size) - size // 2 + 0.5) * 0.1
    return np.random.default_rng(seed).permutation(values).reshape(shape).astype(dtype)


@dataclass
class Case:
    nodes: list[onnx.NodeProto]
    inputs: dict[str, np.ndarray]
    wrt: list[str]
    outputs: list[str] = field(default_factory=lambda: ["y"])
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 17
    eps: float = EPS
    tol: float = TOL
    symbolic: bool = False


def f32(case: Case, linear: bool = False) -> Case:
    case.eps, case.tol = (EPS32_LINEAR, TOL32_LINEAR) if linear else (EPS32, TOL32)
    return case


def unary(op: str, x: np.ndarray, opset: int = 17, **attrs: object) -> Case:
    return Case([n(op, ["x"], ["y"], **attrs)], {"x": x}, ["x"], opset=opset)


def binary(op: str, a: np.ndarray, c: np.ndarray, symbolic: bool = False) -> Case:
    return Case([n(op, ["a", "c"], ["y"])], {"a": a, "c": c}, ["a", "c"], symbolic=symbolic)


CASES: dict[str, Callable[[], Case]] = {
    "Identity": lambda: unary("Identity", r(2, 3)),
    "Neg": lambda: unary("Neg", r(2, 3)),
    "Abs": lambda: unary("Abs", grid(3, 4)),
    "Relu": lambda: unary("Relu", grid(3, 4)),
    "LeakyRelu": lambda: unary("LeakyRelu", grid(3, 4), alpha=0.2),
    "Exp": lambda: unary("Exp", r(2, 3)),
    "Log": lambda: unary("Log", r(2, 3, low=0.5)),
    "Sqrt": lambda: unary("Sqrt", r(2, 3, low=0.5)),
    "Reciprocal": lambda: unary("Reciprocal", r(2, 3, low=0.5)),
    "Sigmoid": lambda: unary("Sigmoid", r(2, 3)),
    "Tanh": lambda: unary("Tanh", r(2, 3)),
    "Sin": lambda: f32(unary("Sin", r(2, 3, dtype=F32))),
    "Cos": lambda: f32(unary("Cos", r(2, 3, dtype=F32))),
    "Erf": lambda: f32(unary("Erf", r(2, 3, dtype=F32))),
    "Gelu": lambda: f32(unary("Gelu", r(2, 3, dtype=F32), opset=20)),
    "Gelu-tanh": lambda: f32(unary("Gelu", r(2, 3, dtype=F32), opset=20, approximate="tanh")),
    "Softmax": lambda: unary("Softmax", r(2, 3, 4), axis=1),
    "LogSoftmax": lambda: unary("LogSoftmax", r(2, 3, 4), axis=-1),
    "Cast": lambda: f32(
        Case(
            [n("Cast", ["x"], ["x64"], to=onnx.TensorProto.DOUBLE), n("Mul", ["x64", "x64"], ["y"])],
            {"x": r(2, 3, dtype=F32)},
            ["x"],
        )
    ),
    "Clip": lambda: Case(
        [n("Clip", ["x", "lo", "hi"], ["y"])],
        {"x": grid(3, 4)},
        ["x", "lo", "hi"],
        inits={"lo": np.array(-0.33), "hi": np.array(0.27)},
    ),
    "Clip-min-only": lambda: Case(
        [n("Clip", ["x", "lo"], ["y"])], {"x": grid(3, 4)}, ["x"], inits={"lo": np.array(-0.33)}
    ),
    "Add-broadcast": lambda: binary("Add", r(2, 3, 4), r(3, 1)),
    "Add-symbolic": lambda: binary("Add", r(2, 3, 4), r(1, 4), symbolic=True),
    "Sub-broadcast": lambda: binary("Sub", r(3, 1), r(2, 3, 4)),
    "Mul-broadcast": lambda: binary("Mul", r(2, 3, 4), r(4)),
    "Mul-symbolic": lambda: binary("Mul", r(2, 1, 4), r(3, 1), symbolic=True),
    "Div-broadcast": lambda: binary("Div", r(2, 3, 4), r(3, 1, low=0.5)),
    "Pow": lambda: binary("Pow", r(2, 3, low=0.5), r(3)),
    "Pow-int-exponent": lambda: Case(
        [n("Pow", ["x", "k"], ["y"])], {"x": r(2, 3)}, ["x"], inits={"k": np.array(3, np.int64)}
    ),
    "Max": lambda: Case(
        [n("Max", ["a", "c", "d"], ["y"])],
        {"a": grid(2, 3, seed=1), "c": grid(3, seed=2), "d": grid(2, 1, seed=3)},
        ["a", "c", "d"],
    ),
    "Min": lambda: Case(
        [n("Min", ["a", "c"], ["y"])], {"a": grid(2, 3, seed=1), "c": grid(2, 3, seed=2) + 0.05}, ["a", "c"]
    ),
    "Sum": lambda: Case([n("Sum", ["a", "c", "d"], ["y"])], {"a": r(2, 3), "c": r(3), "d": r(2, 1)}, ["a", "c", "d"]),
    "Where": lambda: Case(
        [n("Where", ["m", "a", "c"], ["y"])],
        {"a": r(2, 3), "c": r(3)},
        ["a", "c"],
        inits={"m": np.array([[True, False, True], [False, False, True]])},
    ),
    "MatMul-2d": lambda: f32(binary("MatMul", r(3, 4, dtype=F32), r(4, 5, dtype=F32)), linear=True),
    "MatMul-batched": lambda: f32(binary("MatMul", r(2, 3, 4, dtype=F32), r(2, 4, 5, dtype=F32)), linear=True),
    "MatMul-broadcast": lambda: f32(binary("MatMul", r(2, 1, 3, 4, dtype=F32), r(3, 4, 2, dtype=F32)), linear=True),
    "MatMul-broadcast-symbolic": lambda: f32(
        binary("MatMul", r(2, 3, 4, dtype=F32), r(4, 2, dtype=F32), symbolic=True), linear=True
    ),
    "MatMul-1d-left": lambda: f32(binary("MatMul", r(4, dtype=F32), r(2, 4, 3, dtype=F32)), linear=True),
    "MatMul-1d-right": lambda: f32(binary("MatMul", r(2, 3, 4, dtype=F32), r(4, dtype=F32)), linear=True),
    "MatMul-1d-both": lambda: f32(binary("MatMul", r(4, dtype=F32), r(4, dtype=F32)), linear=True),
    "Reshape": lambda: Case(
        [n("Reshape", ["x", "s"], ["y"])], {"x": r(2, 3, 4)}, ["x"], inits={"s": np.array([4, -1], np.int64)}
    ),
    "Flatten": lambda: unary("Flatten", r(2, 3, 4), axis=2),
    "Squeeze": lambda: Case(
        [n("Squeeze", ["x", "ax"], ["y"])], {"x": r(2, 1, 3)}, ["x"], inits={"ax": np.array([1], np.int64)}
    ),
    "Squeeze-opset11-attribute": lambda: Case(
        [n("Squeeze", ["x"], ["y"], axes=[1])], {"x": r(2, 1, 3)}, ["x"], opset=11
    ),
    "Unsqueeze-opset11-attribute": lambda: Case(
        [n("Unsqueeze", ["x"], ["y"], axes=[0, 3])], {"x": r(2, 3)}, ["x"], opset=11
    ),
    "Split-opset11-attribute": lambda: Case(
        [n("Split", ["x"], ["y", "z"], axis=1, split=[1, 3])], {"x": r(2, 4)}, ["x"], ["y", "z"], opset=11
    ),
    "Slice-opset9-attribute": lambda: Case(
        [n("Slice", ["x"], ["y"], starts=[1], ends=[3], axes=[1])], {"x": r(2, 4)}, ["x"], opset=9
    ),
    "Unsqueeze": lambda: Case(
        [n("Unsqueeze", ["x", "ax"], ["y"])], {"x": r(2, 3)}, ["x"], inits={"ax": np.array([0, 3], np.int64)}
    ),
    "Transpose": lambda: unary("Transpose", r(2, 3, 4), perm=[2, 0, 1]),
    "Transpose-reverse": lambda: unary("Transpose", r(2, 3, 4)),
    "Expand": lambda: Case(
        [n("Expand", ["x", "s"], ["y"])], {"x": r(3, 1)}, ["x"], inits={"s": np.array([2, 3, 4], np.int64)}
    ),
    "Tile": lambda: Case(
        [n("Tile", ["x", "k"], ["y"])], {"x": r(2, 3)}, ["x"], inits={"k": np.array([2, 3], np.int64)}
    ),
    "Concat": lambda: Case(
        [n("Concat", ["a", "c", "d"], ["y"], axis=-1)], {"a": r(2, 1), "c": r(2, 3), "d": r(2, 2)}, ["a", "c", "d"]
    ),
    "Split": lambda: Case(
        [n("Split", ["x", "s"], ["y", "z"], axis=1)],
        {"x": r(2, 5)},
        ["x"],
        ["y", "z"],
        inits={"s": np.array([2, 3], np.int64)},
    ),
    "Split-one-output-used": lambda: Case(
        [n("Split", ["x"], ["y", "z"], axis=0, num_outputs=2)], {"x": r(4, 3)}, ["x"], opset=18
    ),
    "Slice": lambda: Case(
        [n("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        {"x": r(4, 5, 3)},
        ["x"],
        inits={
            "st": np.array([3, 0], np.int64),
            "en": np.array([0, 5], np.int64),
            "ax": np.array([0, 1], np.int64),
            "sp": np.array([-2, 2], np.int64),
        },
    ),
    "Gather-duplicates": lambda: Case(
        [n("Gather", ["x", "i"], ["y"], axis=1)],
        {"x": r(2, 4)},
        ["x"],
        inits={"i": np.array([[0, 3], [3, 3]], np.int64)},
    ),
    "Gather-opset13-lifted": lambda: Case(
        [n("Gather", ["x", "i"], ["y"], axis=0)],
        {"x": r(4, 2)},
        ["x"],
        opset=13,
        inits={"i": np.array([1, 1, 3], np.int64)},
    ),
    "GatherElements": lambda: Case(
        [n("GatherElements", ["x", "i"], ["y"], axis=1)],
        {"x": r(2, 3)},
        ["x"],
        inits={"i": np.array([[0, 0, 2], [1, 2, 1]], np.int64)},
    ),
    "GatherND": lambda: Case(
        [n("GatherND", ["x", "i"], ["y"], batch_dims=1)],
        {"x": r(2, 3, 4)},
        ["x"],
        inits={"i": np.array([[[1, 2], [1, 2]], [[0, 3], [2, 0]]], np.int64)},
    ),
    "Pad-constant": lambda: Case(
        [n("Pad", ["x", "p"], ["y"])], {"x": r(2, 3)}, ["x"], inits={"p": np.array([1, 0, 2, 1], np.int64)}
    ),
    "Pad-negative": lambda: Case(
        [n("Pad", ["x", "p"], ["y"])], {"x": r(3, 4)}, ["x"], inits={"p": np.array([1, -1, 0, 2], np.int64)}
    ),
    "Pad-reflect": lambda: Case(
        [n("Pad", ["x", "p"], ["y"], mode="reflect")],
        {"x": r(3, 4)},
        ["x"],
        inits={"p": np.array([2, 1, 1, 2], np.int64)},
    ),
    "Pad-edge-axes": lambda: Case(
        [n("Pad", ["x", "p", "", "ax"], ["y"], mode="edge")],
        {"x": r(3, 4)},
        ["x"],
        opset=18,
        inits={"p": np.array([2, 1], np.int64), "ax": np.array([1], np.int64)},
    ),
    "ScatterElements": lambda: Case(
        [n("ScatterElements", ["x", "i", "u"], ["y"], axis=1)],
        {"x": r(2, 4), "u": r(2, 2)},
        ["x", "u"],
        inits={"i": np.array([[0, 3], [2, 1]], np.int64)},
    ),
    "ScatterElements-add": lambda: Case(
        [n("ScatterElements", ["x", "i", "u"], ["y"], axis=1, reduction="add")],
        {"x": r(2, 4), "u": r(2, 2)},
        ["x", "u"],
        inits={"i": np.array([[0, 0], [2, 1]], np.int64)},
    ),
    "ScatterND": lambda: Case(
        [n("ScatterND", ["x", "i", "u"], ["y"])],
        {"x": r(3, 4), "u": r(2, 4)},
        ["x", "u"],
        inits={"i": np.array([[2], [0]], np.int64)},
    ),
    "TopK": lambda: Case(
        [n("TopK", ["x", "k"], ["y", "idx"], axis=1)], {"x": grid(3, 5)}, ["x"], inits={"k": np.array([2], np.int64)}
    ),
    "Trilu": lambda: Case(
        [n("Trilu", ["x", "k"], ["y"], upper=0)], {"x": r(2, 3, 4)}, ["x"], inits={"k": np.array(1, np.int64)}
    ),
    "ReduceSum-keepdims0": lambda: Case(
        [n("ReduceSum", ["x", "ax"], ["y"], keepdims=0)],
        {"x": r(2, 3, 4)},
        ["x"],
        inits={"ax": np.array([0, -1], np.int64)},
    ),
    "ReduceSum-all": lambda: unary("ReduceSum", r(2, 3), keepdims=0),
    "ReduceSum-opset11-attribute": lambda: unary("ReduceSum", r(2, 3, 4), opset=11, axes=[1], keepdims=0),
    "ReduceMean-attribute": lambda: unary("ReduceMean", r(2, 3, 4), axes=[1, 2], keepdims=0),
    "ReduceMean-input": lambda: Case(
        [n("ReduceMean", ["x", "ax"], ["y"], keepdims=1)],
        {"x": r(2, 3, 4)},
        ["x"],
        opset=18,
        inits={"ax": np.array([1], np.int64)},
    ),
    "ReduceL2": lambda: f32(unary("ReduceL2", r(2, 3, 4, dtype=F32), axes=[2], keepdims=0)),
    "ReduceLogSumExp": lambda: unary("ReduceLogSumExp", r(2, 3, 4), axes=[1], keepdims=1),
    "Gemm": lambda: Case(
        [n("Gemm", ["a", "w", "c"], ["y"], alpha=0.7, beta=1.3)],
        {"a": r(3, 4)},
        ["a", "w", "c"],
        inits={"w": r(4, 5), "c": r(5)},
    ),
    "Gemm-transA": lambda: Case(
        [n("Gemm", ["a", "w", "c"], ["y"], transA=1, beta=0.5)],
        {"a": r(4, 3)},
        ["a", "w", "c"],
        inits={"w": r(4, 5), "c": r(1, 5)},
    ),
    "Gemm-transB": lambda: Case(
        [n("Gemm", ["a", "w", "c"], ["y"], transB=1, alpha=2.0)],
        {"a": r(3, 4)},
        ["a", "w", "c"],
        inits={"w": r(5, 4), "c": r(3, 5)},
    ),
    "Gemm-transAB-no-bias": lambda: Case(
        [n("Gemm", ["a", "w"], ["y"], transA=1, transB=1)], {"a": r(4, 3)}, ["a", "w"], inits={"w": r(5, 4)}
    ),
    "LayerNormalization": lambda: Case(
        [n("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-3)],
        {"x": r(2, 3, 4)},
        ["x", "s", "b"],
        inits={"s": r(4), "b": r(4)},
    ),
    "LayerNormalization-axis1": lambda: Case(
        [n("LayerNormalization", ["x", "s"], ["y"], axis=1)], {"x": r(2, 3, 4)}, ["x", "s"], inits={"s": r(3, 4)}
    ),
    "GlobalAveragePool": lambda: f32(unary("GlobalAveragePool", r(2, 3, 4, 5, dtype=F32)), linear=True),
    "AveragePool": lambda: f32(
        unary("AveragePool", r(2, 2, 7, 6, dtype=F32), kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1]),
        linear=True,
    ),
    "AveragePool-count-include-pad": lambda: f32(
        unary(
            "AveragePool",
            r(1, 2, 6, 6, dtype=F32),
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        linear=True,
    ),
    "AveragePool-ceil": lambda: f32(
        unary("AveragePool", r(1, 2, 7, 7, dtype=F32), kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), linear=True
    ),
    "AveragePool-1d": lambda: f32(
        unary("AveragePool", r(2, 3, 9, dtype=F32), kernel_shape=[3], strides=[2]), linear=True
    ),
    "MaxPool": lambda: unary("MaxPool", grid(2, 2, 4, 4), kernel_shape=[2, 2], strides=[2, 2]),
    "MaxPool-tiled-rect": lambda: unary("MaxPool", grid(2, 3, 6, 9), kernel_shape=[2, 3], strides=[2, 3]),
    "MaxPool-overlap-pads": lambda: unary(
        "MaxPool", grid(1, 2, 5, 5), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
    ),
    "MaxPool-ceil-dilated": lambda: unary(
        "MaxPool", grid(1, 2, 7, 7), kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 1], ceil_mode=1
    ),
    "Conv": lambda: f32(
        Case(
            [n("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
            {"x": r(2, 3, 5, 5, dtype=F32)},
            ["x", "w", "b"],
            inits={"w": r(4, 3, 3, 3, dtype=F32), "b": r(4, dtype=F32)},
        ),
        linear=True,
    ),
    "Conv-grouped-strided-remainder": lambda: f32(
        Case(
            [n("Conv", ["x", "w"], ["y"], group=2, strides=[2, 3], pads=[1, 0, 1, 1])],
            {"x": r(2, 4, 8, 9, dtype=F32)},
            ["x", "w"],
            inits={"w": r(6, 2, 3, 2, dtype=F32)},
        ),
        linear=True,
    ),
    "Conv-dilated-asymmetric": lambda: f32(
        Case(
            [n("Conv", ["x", "w"], ["y"], dilations=[2, 2], pads=[0, 2, 1, 0])],
            {"x": r(1, 2, 7, 6, dtype=F32)},
            ["x", "w"],
            inits={"w": r(3, 2, 2, 3, dtype=F32)},
        ),
        linear=True,
    ),
    "Conv-grouped-stride1-dilated": lambda: f32(  # the flipped-weight Conv form of the input gradient
        Case(
            [n("Conv", ["x", "w"], ["y"], group=2, dilations=[1, 2], pads=[1, 2, 0, 1])],
            {"x": r(2, 4, 6, 7, dtype=F32)},
            ["x", "w"],
            inits={"w": r(6, 2, 3, 2, dtype=F32)},
        ),
        linear=True,
    ),
    "Conv-depthwise-strided-dilated": lambda: f32(
        Case(
            [n("Conv", ["x", "w"], ["y"], group=3, strides=[2, 2], dilations=[2, 1], pads=[2, 1, 1, 1])],
            {"x": r(2, 3, 9, 8, dtype=F32)},
            ["x", "w"],
            inits={"w": r(3, 1, 3, 3, dtype=F32)},
        ),
        linear=True,
    ),
    "Conv-1d-symbolic": lambda: f32(
        Case(
            [n("Conv", ["x", "w"], ["y"], strides=[2], pads=[1, 1])],
            {"x": r(2, 2, 9, dtype=F32)},
            ["x", "w"],
            inits={"w": r(3, 2, 4, dtype=F32)},
            symbolic=True,
        ),
        linear=True,
    ),
}

LABELS = np.array([[1, 0, 3], [2, 2, 0]], np.int64)  # [N=2, d=3], classes C=4


def sce(reduction: str, log_prob: bool = False, weights: bool = False, ignore: int | None = None) -> Case:
    """SoftmaxCrossEntropyLoss on scores [2, 4, 3]; labels are a constant (no gradient)."""
    inputs = ["x", "lab", "w"] if weights else ["x", "lab"]
    outputs = ["y", "lp"] if log_prob else ["y"]
    kw = {} if ignore is None else {"ignore_index": ignore}
    node = n("SoftmaxCrossEntropyLoss", inputs, outputs, reduction=reduction, **kw)
    inits = {"lab": LABELS, **({"w": np.array([0.5, 1.0, 2.0, 0.3])} if weights else {})}
    return Case([node], {"x": r(2, 4, 3)}, ["x"], outputs, inits)


CASES |= {
    "Gather-axis0-embedding": lambda: Case(
        [n("Gather", ["x", "i"], ["y"], axis=0)],
        {"x": r(5, 3)},
        ["x"],
        inits={"i": np.array([[1, -1], [4, 1]], np.int64)},
    ),
    "Dropout": lambda: Case(
        [n("Dropout", ["x", "p"], ["y"])], {"x": r(2, 3)}, ["x"], opset=13, inits={"p": np.array(0.3)}
    ),
    "Floor-no-gradient": lambda: Case(
        [n("Floor", ["x"], ["f"]), n("Add", ["f", "x"], ["y"])], {"x": grid(2, 3) + 0.01}, ["x"]
    ),
    "Softplus": lambda: f32(unary("Softplus", r(2, 3, dtype=F32))),
    "Softsign": lambda: f32(unary("Softsign", r(2, 3, dtype=F32))),
    "Elu": lambda: f32(unary("Elu", grid(3, 4, dtype=F32), alpha=0.7)),
    "ThresholdedRelu": lambda: f32(unary("ThresholdedRelu", grid(3, 4, dtype=F32) * 10, alpha=0.33)),
    "HardSigmoid": lambda: f32(unary("HardSigmoid", grid(3, 4, dtype=F32) * 10 + 0.03, alpha=0.3)),
    "HardSwish": lambda: f32(unary("HardSwish", grid(3, 5, dtype=F32) * 10 + 0.03, opset=14)),
    "PRelu": lambda: f32(
        Case(
            [n("PRelu", ["x", "s"], ["y"])],
            {"x": grid(2, 3, 2, dtype=F32)},
            ["x", "s"],
            inits={"s": r(3, 1, dtype=F32)},
        )
    ),
    "Mean": lambda: f32(
        Case([n("Mean", ["a", "c"], ["y"])], {"a": r(2, 3, dtype=F32), "c": r(3, dtype=F32)}, ["a", "c"]), linear=True
    ),
    "ReduceMax": lambda: unary("ReduceMax", grid(2, 3, 4), axes=[1], keepdims=0),
    "ReduceMin-input-axes": lambda: Case(
        [n("ReduceMin", ["x", "ax"], ["y"], keepdims=1)],
        {"x": grid(2, 3, 4)},
        ["x"],
        opset=18,
        inits={"ax": np.array([0, 2], np.int64)},
    ),
    "BatchNormalization": lambda: f32(
        Case(
            [n("BatchNormalization", ["x", "s", "b", "mu", "var"], ["y"], epsilon=1e-2)],
            {"x": r(2, 3, 4, 2, dtype=F32)},
            ["x", "s", "b", "mu", "var"],
            inits={"s": r(3, dtype=F32), "b": r(3, dtype=F32), "mu": r(3, dtype=F32), "var": r(3, dtype=F32, low=0.5)},
        )
    ),
    "SoftmaxCrossEntropyLoss-sum": lambda: sce("sum"),
    "SoftmaxCrossEntropyLoss-mean": lambda: sce("mean"),
    "SoftmaxCrossEntropyLoss-none": lambda: sce("none"),
    "SoftmaxCrossEntropyLoss-log-prob-used": lambda: sce("sum", log_prob=True),
    "SoftmaxCrossEntropyLoss-weights-mean": lambda: sce("mean", weights=True),
    "SoftmaxCrossEntropyLoss-weights-none": lambda: sce("none", weights=True),
    "SoftmaxCrossEntropyLoss-ignore-index-mean": lambda: sce("mean", ignore=2),
    "SoftmaxCrossEntropyLoss-ignore-index-weights-sum": lambda: sce("sum", weights=True, ignore=0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_finite_differences(name: str) -> None:
    case = CASES[name]()
    model = make_model(case.nodes, case.inputs, case.outputs, case.inits, case.opset, case.symbolic)
    check(model, case.inputs, case.wrt, case.eps, case.tol)
