"""Exporters: a recommendation written in the form each deployment toolchain reads.

``EXPORTERS`` maps a format name to an ``ExportFormat``; calling one writes the file and returns
an ``ExportResult``. Exporter modules are imported on first use (onnxruntime.quantization takes a
quarter of a second to import), so ``fitonnx score`` does not pay for them.

| format | writes | data |
|---|---|---|
| overrides | ONNX Runtime TensorQuantOverrides JSON, Olive-style (``ort_overrides.json``) | no |
| qdq | a QDQ model from onnxruntime's ``quantize_static`` (TensorRT's for a tensorrt recommendation) | yes |
| qnn | QNN/AIMET encodings, layout 0.6.1 (``encodings`` is the same) | no |
| qnn-1.0.0 | QNN/AIMET encodings, layout 1.0.0 | no |
| tensorrt | a symmetric QDQ model for TensorRT, 16-bit tensors left in float | yes |
| annotated | the original model carrying the recommendation as metadata | no |
"""

from __future__ import annotations

import os

import onnx

from fitonnx.allocate import recommendation as rec_mod
from fitonnx.allocate.recommendation import Recommendation
from fitonnx.export.common import ExportResult
from fitonnx.export.registry import EXPORTERS, ExportFormat, get_exporter
from fitonnx.model.data import Dataset
from fitonnx.model.load import load_model
from fitonnx.model.source import RANDOM_CALIBRATION, resolve_data


def export_recommendation(
    model: str | os.PathLike[str] | onnx.ModelProto,
    recommendation: Recommendation | str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | Dataset | None = None,
    random_samples: int | None = None,
    seed: int = 0,
    per_channel: bool = False,
) -> ExportResult:
    """Write ``recommendation`` (a Recommendation or a recommendation.json) for ``model`` in format ``fmt``.

    Calibration data (``data``, else the model's bundled ``<model>.calib.npz``) is read only by
    the formats that calibrate (qdq, tensorrt). ``out`` is a file, or a folder for the default name.
    """
    exporter = get_exporter(fmt)
    loaded = load_model(model)
    rec = recommendation if isinstance(recommendation, Recommendation) else rec_mod.load(recommendation)
    path = exporter.output_path(out, source=loaded.path, model_name=rec.model)
    dataset = (
        resolve_data(loaded, data, random_samples, seed, random_warning=RANDOM_CALIBRATION)
        if exporter.needs_data
        else None
    )
    return exporter(loaded.proto, rec, path, data=dataset, per_channel=per_channel, source=loaded.path)


__all__ = ["EXPORTERS", "ExportFormat", "ExportResult", "export_recommendation", "get_exporter"]
