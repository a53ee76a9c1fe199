"""Probe which ops onnxruntime-training's GradientGraphBuilder can differentiate.

Builds a single-op graph per case (x: float [2, 4, 4, 4], other operands as initializers),
appends ReduceSum as the loss and asks the builder for d loss / d x. Prints OK, NOGRAD (no
gradient builder registered) or ERROR (something else, first line). With ``--check`` every OK
gradient is also run on the CPU (NORUN: no kernel) and compared with central differences of the
op along random directions (median relative error; piecewise-linear ops show kink noise around
1e-2, a wrong gradient shows 1e-1 or more). Run with the venv python:

    /work/venv/bin/python scripts/probe_gradients.py [--opset 17] [--check] [OP ...]

Measured on onnxruntime-training 1.19.2 (opsets 17 and 21): see fitonnx/prepare/support.py for
the lists fitonnx relies on; re-run this after an onnxruntime update. Found this way: no CPU
kernel for ConvTransposeGrad or ResizeGrad, 3-D AveragePool gradients off by O(1), Split
gradients wrong when an output is unused, Dropout's inference gradient scaled by 1/(1-ratio),
tanh-Gelu given the exact Gelu gradient, ReduceL2/ReduceLogSumExp failing with keepdims=0.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

X_SHAPE = (2, 4, 4, 4)


@dataclass(frozen=True)
class Case:
    op: str
    extra: tuple[np.ndarray | None, ...] = ()  # further inputs (None: empty optional slot)
    attrs: dict = field(default_factory=dict)
    domain: str = ""
    min_opset: int = 1
    outputs: int = 1
    x_shape: tuple[int, ...] = X_SHAPE


def f32(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


C = 4
CASES: list[Case] = [
    *(
        Case(op)
        for op in (
            "Relu",
            "Sigmoid",
            "Tanh",
            "Exp",
            "Log",
            "Sqrt",
            "Erf",
            "Abs",
            "Neg",
            "Reciprocal",
            "Sin",
            "Cos",
            "Identity",
            "Softsign",
            "Floor",
            "Ceil",
            "Round",
            "Sign",
            "Atan",
            "Asin",
            "Acos",
            "Sinh",
            "Cosh",
            "Tan",
            "HardSigmoid",
            "Elu",
            "Selu",
            "Celu",
            "Softplus",
            "ThresholdedRelu",
            "Shrink",
            "GlobalAveragePool",
            "GlobalMaxPool",
            "Flatten",
            "Hardmax",
        )
    ),
    Case("HardSwish", min_opset=14),
    Case("Mish", min_opset=18),
    Case("Gelu", min_opset=20),
    Case("LeakyRelu", attrs={"alpha": 0.1}),
    Case("Softmax", attrs={"axis": 1}),
    Case("LogSoftmax", attrs={"axis": 1}),
    Case("Clip", (np.array(-1, np.float32), np.array(1, np.float32))),
    *(Case(op, (f32(*X_SHAPE),)) for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean")),
    Case("PRelu", (f32(C, 1, 1),)),
    Case("MatMul", (f32(4, 3),)),
    Case("Gemm", (f32(4, 3),), x_shape=(2, 4)),
    Case("Conv", (f32(8, C, 3, 3),), {"pads": [1, 1, 1, 1]}),
    Case("Conv", (f32(C, 1, 3, 3),), {"group": C}),
    Case("ConvTranspose", (f32(C, 2, 2, 2),), {"strides": [2, 2]}),
    Case(
        "BatchNormalization",
        (np.ones(C, np.float32), np.zeros(C, np.float32), np.zeros(C, np.float32), np.ones(C, np.float32)),
    ),
    Case("InstanceNormalization", (np.ones(C, np.float32), np.zeros(C, np.float32))),
    Case("LayerNormalization", (np.ones(4, np.float32),), {"axis": -1}),
    Case("LayerNormalization", (np.ones(4, np.float32), np.zeros(4, np.float32)), {"axis": -1}),
    Case("LayerNormalization", (np.ones(4, np.float32), np.zeros(4, np.float32)), {"axis": -1}, outputs=3),
    Case("GroupNormalization", (np.ones(2, np.float32), np.zeros(2, np.float32)), {"num_groups": 2}, min_opset=18),
    Case("LpNormalization", attrs={"axis": 1}),
    Case("MeanVarianceNormalization"),
    Case("LRN", attrs={"size": 3}),
    Case("MaxPool", attrs={"kernel_shape": [2, 2]}),
    Case("AveragePool", attrs={"kernel_shape": [2, 2]}),
    Case("Reshape", (i64(2, -1),)),
    Case("Transpose", attrs={"perm": [0, 2, 3, 1]}),
    Case("Squeeze", (i64(0),), x_shape=(1, 4, 4, 4)),
    Case("Unsqueeze", (i64(0),)),
    Case("Concat", (f32(*X_SHAPE),), {"axis": 1}),
    Case("Split", (i64(2, 2),), {"axis": 1}, outputs=2),  # only the first output reaches the loss
    Case("Slice", (i64(0), i64(2), i64(1))),
    Case("Gather", (i64(0, 1),), {"axis": 1}),
    Case("GatherElements", (np.zeros(X_SHAPE, np.int64),), {"axis": 1}),
    Case("GatherND", (np.zeros((2, 1), np.int64),), {"batch_dims": 0}),
    Case("Expand", (i64(3, 2, 4, 4, 4),)),
    Case("Tile", (i64(1, 2, 1, 1),)),
    Case("Pad", (i64(0, 0, 1, 1, 0, 0, 1, 1),)),
    Case("Resize", (None, np.array([1, 1, 2, 2], np.float32)), {"mode": "nearest"}, min_opset=13),
    Case("Resize", (None, np.array([1, 1, 2, 2], np.float32)), {"mode": "linear"}, min_opset=13),
    Case("DepthToSpace", attrs={"blocksize": 2}),
    Case("SpaceToDepth", attrs={"blocksize": 2}),
    Case("Einsum", attrs={"equation": "bchw->bhwc"}),
    Case("CumSum", (np.array(1, np.int64),)),
    Case(
        "Where",
        (f32(*X_SHAPE),),
    ),
    Case("Cast", attrs={"to": TensorProto.FLOAT}),
    Case("Dropout"),
    Case("Dropout", outputs=2),
    Case("Trilu"),
    *(
        Case(op, (i64(1),), {"keepdims": 1}, min_opset=18)
        for op in (
            "ReduceSum",
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        )
    ),
    Case("TopK", (i64(2),), outputs=2),
    Case("ScatterElements", (np.zeros((2, 1, 4, 4), np.int64), f32(2, 1, 4, 4)), {"axis": 1}),
    Case("ScatterND", (np.zeros((1, 1), np.int64), f32(1, 4, 4, 4))),
    Case("Resize", (None, np.array([1, 1, 2, 2], np.float32)), {"mode": "cubic"}, min_opset=13),
    Case("GridSample", (np.zeros((2, 3, 3, 2), np.float32),), min_opset=16),
    Case("RoiAlign", (np.array([[0, 0, 2, 2]], np.float32), np.zeros(1, np.int64)), min_opset=16),
    Case("LpPool", attrs={"kernel_shape": [2, 2]}),
    Case("GlobalLpPool"),
    Case("ReverseSequence", (np.array([4, 4], np.int64),), {"batch_axis": 0, "time_axis": 1}),
    Case("Max", (f32(*X_SHAPE), f32(*X_SHAPE))),
    Case("Mod", (f32(*X_SHAPE),), {"fmod": 1}),
    Case("Det", x_shape=(2, 4, 4)),
    Case("Compress", (np.array([True, False, True, True]),), {"axis": 1}),
    # Forms of ops whose common form works (fitonnx rewrites these forms too).
    Case("AveragePool", attrs={"kernel_shape": [2, 2, 2]}, x_shape=(2, 3, 4, 4, 4)),
    Case("ReduceL2", (i64(1),), {"keepdims": 0}, min_opset=18),
    Case("Pad", (i64(0, 0, 1, 1, 0, 0, 1, 1),), {"mode": "reflect"}),
    Case("Slice", (i64(3), i64(-100), i64(2), i64(-1))),
    Case("Gelu", attrs={"approximate": "tanh"}, min_opset=20),
    Case("LSTM", (f32(1, 12, 4), f32(1, 12, 3)), {"hidden_size": 3}, x_shape=(5, 2, 4)),
]


def build(case: Case, opset: int, weighted: bool = False) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(case.x_shape))
    inits: list[onnx.TensorProto] = []
    inputs = ["x"]
    for k, value in enumerate(case.extra):
        if value is None:
            inputs.append("")
            continue
        inits.append(numpy_helper.from_array(value, f"c{k}"))
        inputs.append(f"c{k}")
    if case.op == "Where":  # Where(cond, x, other)
        inits.append(numpy_helper.from_array(f32(*X_SHAPE) > 0, "cond"))
        inputs = ["cond", "x", "c0"]
    outs = [f"y{k}" for k in range(case.outputs)]
    nodes = [helper.make_node(case.op, inputs, outs, domain=case.domain, **case.attrs)]
    if weighted:  # loss = Σ w·y with a fixed random w, so every output element matters differently
        shape = _output_shape(case, opset)
        inits.append(numpy_helper.from_array(np.random.default_rng(7).standard_normal(shape).astype(np.float32), "w"))
        nodes.append(helper.make_node("Mul", [outs[0], "w"], ["wy"]))
        nodes.append(helper.make_node("ReduceSum", ["wy"], ["loss"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSum", [outs[0]], ["loss"], keepdims=0))
    graph = helper.make_graph(
        nodes, "probe", [x], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _output_shape(case: Case, opset: int) -> tuple[int, ...]:
    import onnxruntime as ort

    model = build(case, opset)
    del model.graph.node[-1]
    del model.graph.output[:]
    model.graph.output.append(helper.make_empty_tensor_value_info("y0"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y0"], {"x": _x(case)})[0].shape


def _x(case: Case) -> np.ndarray:
    return np.random.default_rng(3).standard_normal(case.x_shape).astype(np.float32)


def check(case: Case, opset: int, directions: int = 4, eps: float = 1e-2) -> float:
    """Largest relative error of the builder's gradient against central differences along random directions."""
    import onnxruntime as ort
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    opset = max(opset, case.min_opset)
    model = build(case, opset, weighted=True)
    builder = GradientGraphBuilder(model.SerializeToString(), {"loss"}, {"x"}, "loss")
    builder.build()
    grad = ort.InferenceSession(builder.get_model(), providers=["CPUExecutionProvider"])
    forward = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _x(case)
    g = grad.run(["x_grad"], {"x": x})[0].astype(np.float64)
    if g.shape != x.shape:
        raise ValueError(f"WRONG: the gradient has shape {g.shape}, the input {x.shape}")
    rng = np.random.default_rng(11)
    errors = []
    for _ in range(directions):
        v = rng.standard_normal(x.shape).astype(np.float32)
        plus = float(forward.run(["loss"], {"x": x + eps * v})[0])
        minus = float(forward.run(["loss"], {"x": x - eps * v})[0])
        numeric = (plus - minus) / (2 * eps)
        analytic = float((g * v).sum())
        errors.append(abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-3))
    return float(np.median(errors))


def probe(case: Case, opset: int) -> str:
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    model = build(case, max(opset, case.min_opset))
    try:
        builder = GradientGraphBuilder(model.SerializeToString(), {"loss"}, {"x"}, "loss")
        builder.build()
    except Exception as exc:
        text = str(exc)
        if "gradient builder has not been registered" in text:
            return "NOGRAD"
        tail = text.split("] : ")[-1].strip().splitlines()[0] if "] : " in text else text.strip().splitlines()[-1]
        return "ERROR " + tail[:160]
    return "OK"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--check", action="store_true", help="also compare OK gradients with central differences")
    parser.add_argument("ops", nargs="*")
    args = parser.parse_args()
    # The builder logs each transformer on fd 2; silence it so the table stays readable.
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    for case in CASES:
        if args.ops and case.op not in args.ops:
            continue
        os.dup2(devnull, 2)
        try:
            result = probe(case, args.opset)
            if result == "OK" and args.check:
                try:
                    result += f"  median rel. error vs central differences {check(case, args.opset):.1e}"
                except ValueError as exc:
                    result = str(exc)
                except Exception as exc:  # the gradient graph builds but does not run
                    result = "NORUN " + str(exc).strip().splitlines()[0].split("] : ")[-1][:120]
        finally:
            os.dup2(saved, 2)
        print(f"{case.op:24s} {result}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
