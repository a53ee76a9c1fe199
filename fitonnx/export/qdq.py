"""The ``qdq`` export format: TensorRT's QDQ model for a tensorrt recommendation, ONNX Runtime's otherwise."""

from __future__ import annotations

from pathlib import Path

import onnx

from fitonnx.allocate.recommendation import Recommendation
from fitonnx.export.common import ExportResult, check_runs, first_feed, plan_export, require_data, save_model
from fitonnx.export.formats_qdq import write_format_model
from fitonnx.export.ort import ORT, ort_settings, quantize_qdq
from fitonnx.export.tensorrt import TENSORRT_TARGET, write_tensorrt
from fitonnx.model import graph
from fitonnx.model.data import Dataset


def write_qdq(
    model: onnx.ModelProto, rec: Recommendation, out: Path, *, data: Dataset | None = None, per_channel: bool = False
) -> ExportResult:
    """A QDQ model for the recommendation's target: TensorRT's for tensorrt, ONNX Runtime's otherwise."""
    if rec.by_format and rec.target != TENSORRT_TARGET:  # formats as scored; the ort target's MatMulNBits
        return write_format_model(model, rec, out, data=data, kind="qdq", nbits=rec.target == "ort")
    if rec.target == TENSORRT_TARGET:
        result = write_tensorrt(model, rec, out, data=data, per_channel=per_channel)
        return ExportResult("qdq", result.path, result.quantized, result.kept_float, result.notes)
    dataset = require_data(data, "qdq")
    p = plan_export(model, rec, ORT)
    qdq, bits, notes = quantize_qdq(p, dataset, ort_settings(p), per_channel=per_channel)
    check_runs(qdq, first_feed(dataset, graph.input_specs(qdq)))
    save_model(qdq, out)
    return ExportResult("qdq", out, bits, p.float_tensors, tuple(notes))
