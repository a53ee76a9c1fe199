"""Issue 15: after onnxruntime's optimizer, the all-8-bit QDQ export fuses as many Convs as quantize_static's own.

Both models are optimized by onnxruntime itself (ORT_ENABLE_ALL, ``optimized_model_filepath``) and
the fused integer kernels counted; the extra Q/DQ pairs fitonnx adds must not change any output.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, quantize_static

from fitonnx.allocate.recommendation import Recommendation
from fitonnx.export import export_recommendation
from fitonnx.export.ort import DatasetReader
from fitonnx.model import graph
from fitonnx.model.data import load_npz

from .conftest import MODELS

CNN = MODELS / "mnist_cnn.onnx"
WEIGHTS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")
ACTIVATIONS = ("input", "/pool/MaxPool_output_0", "/flatten/Flatten_output_0", "/relu_2/Relu_output_0")
FUSED = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger")


def optimized_ops(path: Path, tmp_path: Path) -> Counter[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def run(path: Path, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_int8_qdq_export_fuses_both_convs_like_quantize_static(tmp_path: Path) -> None:
    calib = load_npz(MODELS / "mnist_cnn.calib.npz")
    rec = Recommendation(
        model="mnist_cnn.onnx",
        target="ort",
        weight_bits=dict.fromkeys(WEIGHTS, 8),
        activation_bits=dict.fromkeys(ACTIVATIONS, 8),
        fit=0.0,
        weight_bytes=0,
        ranges={},
    )
    ours = export_recommendation(CNN, rec, "qdq", tmp_path / "ours.qdq.onnx", data=calib).path
    theirs = tmp_path / "theirs.qdq.onnx"
    reader = DatasetReader(calib, graph.input_specs(onnx.load(CNN)))
    quantize_static(str(CNN), str(theirs), reader, quant_format=QuantFormat.QDQ)
    ours_ops, theirs_ops = optimized_ops(ours, tmp_path), optimized_ops(theirs, tmp_path)
    assert theirs_ops["QLinearConv"] == 2
    assert ours_ops["QLinearConv"] == theirs_ops["QLinearConv"]
    assert sum(ours_ops[op] for op in FUSED) >= sum(theirs_ops[op] for op in FUSED)
    assert ours_ops["Conv"] + ours_ops["FusedConv"] == 0  # no Conv left in float
    # the added pairs are exact copies: unoptimized, the model computes what it did without them
    copies = [n for n in onnx.load(ours).graph.node if n.name.endswith("_fuse_quantize")]
    assert copies
    stripped = onnx.load(ours)
    rename = {n.output[0].replace("_fuse_quantized", "_fuse_dequantized"): n.input[0] for n in copies}
    keep = [n for n in stripped.graph.node if not n.name.endswith(("_fuse_quantize", "_fuse_dequantize"))]
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
    del stripped.graph.node[:]
    stripped.graph.node.extend(keep)
    onnx.save(stripped, tmp_path / "stripped.onnx")
    x = load_npz(MODELS / "mnist_cnn.heldout.npz").arrays["input"][:256]
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_array_equal(run(ours, x, off), run(tmp_path / "stripped.onnx", x, off))
