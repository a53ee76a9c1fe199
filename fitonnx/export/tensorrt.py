"""TensorRT: an explicit-quantization QDQ model, symmetric, with the sensitive tensors left in float.

TensorRT reads Q/DQ nodes with zero point 0 only: INT8 for weights and activations, INT4 for
weights only; a tensor at 16 bits is left without Q/DQ and runs in float (FP16 when the engine is
built with it). The model is made by onnxruntime's ``quantize_static`` with symmetric settings
(``ActivationSymmetric``/``WeightSymmetric``), a dedicated Q/DQ pair per consumer
(``DedicatedQDQPair``, TensorRT does not share them), float biases (``QuantizeBias`` off: TensorRT
quantizes biases itself) and only default-domain Q/DQ: int4 weights lift the model to opset 21
with onnx.version_converter rather than use onnxruntime's com.microsoft ops, which TensorRT does
not read. Weights are stored quantized with a DequantizeLinear, onnxruntime's default.

Not checked here: TensorRT itself (not installed); the model is checked to run in onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from fitonnx.allocate.recommendation import Recommendation
from fitonnx.allocate.targets import Scheme
from fitonnx.export.common import (
    ExportResult,
    Toolchain,
    check_runs,
    first_feed,
    plan_export,
    require_data,
    save_model,
)
from fitonnx.export.formats_qdq import write_format_model
from fitonnx.export.ort import QdqSettings, quantize_qdq
from fitonnx.model import graph
from fitonnx.model.data import Dataset

TENSORRT_TARGET = "tensorrt"
TENSORRT = Toolchain(
    "TensorRT",
    weight_bits=frozenset({4, 8}),
    activation_bits=frozenset({8}),
    float_bits=frozenset({16}),  # TensorRT has no int16: 16 bits means float16
)


def tensorrt_settings() -> QdqSettings:
    return QdqSettings(
        toolchain=TENSORRT,
        weight_symmetric=True,
        activation_symmetric=True,
        dedicated_pairs=True,
        quantize_bias=False,
        standard_domain_only=True,
    )


def write_tensorrt(
    model: onnx.ModelProto, rec: Recommendation, out: Path, *, data: Dataset | None = None, per_channel: bool = False
) -> ExportResult:
    """Write a symmetric QDQ model for TensorRT; tensors at 16 bits (or not recommended) stay float.
    A format recommendation (``recommend --formats``) is written with its own formats instead:
    per-channel INT8, blocked INT4, FP8 E4M3, NVFP4 and FP16 Q/DQ (``formats_qdq``)."""
    if rec.by_format:
        return write_format_model(model, rec, out, data=data, kind="tensorrt", optimize=False)
    dataset = require_data(data, "tensorrt")
    plan = plan_export(model, rec, TENSORRT)
    notes: list[str] = []
    if plan.target.activation_scheme is not Scheme.SYMMETRIC or plan.target.weight_scheme is not Scheme.SYMMETRIC:
        notes.append(
            f"the recommendation was made for target {plan.target.name!r} (an asymmetric grid); TensorRT's is symmetric, "
            "so its FIT figures understate the rounding of non-negative tensors"
        )
    qdq, bits, more = quantize_qdq(plan, dataset, tensorrt_settings(), per_channel=per_channel)
    notes.extend(more)
    # The file is for TensorRT. onnxruntime 1.19's CPU optimizer would fuse its Q/DQ pairs into
    # QLinearMatMul at the model's opset, for which it has no kernel from opset 21 on: check the
    # model as written, unoptimized.
    check_runs(qdq, first_feed(dataset, graph.input_specs(qdq)), optimize=False)
    save_model(qdq, out)
    return ExportResult("tensorrt", out, bits, plan.float_tensors, tuple(notes))
