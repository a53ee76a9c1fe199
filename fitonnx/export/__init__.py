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

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from fitonnx.allocate.recommendation import Recommendation
from fitonnx.errors import FitonnxError
from fitonnx.export.common import ExportResult, resolve_out
from fitonnx.model.data import Dataset

ExportFn = Callable[..., ExportResult]


@dataclass(frozen=True)
class ExportFormat:
    """One output format: where its writer lives, whether it calibrates, and its default file name."""

    name: str
    module: str
    function: str
    needs_data: bool
    filename: str  # default name inside a folder; {stem} is the model's file name without .onnx
    summary: str

    def load(self) -> ExportFn:
        return getattr(importlib.import_module(self.module), self.function)

    def default_path(self, folder: str | os.PathLike[str], model_name: str) -> Path:
        return Path(folder) / self.filename.format(stem=Path(model_name).name.removesuffix(".onnx"))

    def output_path(self, out: str | os.PathLike[str], *, source: Path | None, model_name: str) -> Path:
        """``out``, or the default name inside it when it is a folder; never the input model ``source``."""
        path = Path(out)
        if path.is_dir():
            path = self.default_path(path, source.name if source is not None else model_name)
        return resolve_out(path, source)

    def __call__(
        self,
        model: onnx.ModelProto,
        rec: Recommendation,
        out: str | os.PathLike[str],
        *,
        data: Dataset | None = None,
        per_channel: bool = False,
        source: Path | None = None,
    ) -> ExportResult:
        """Write ``rec`` for ``model`` to ``out`` (a file, or a folder for the default name).

        ``source`` is the input model's path: writing over it is refused.
        """
        path = self.output_path(out, source=source, model_name=rec.model)
        return self.load()(model, rec, path, data=data, per_channel=per_channel)


def _formats() -> dict[str, ExportFormat]:
    formats = [
        ExportFormat(
            "overrides",
            "fitonnx.export.ort",
            "write_overrides",
            False,
            "ort_overrides.json",
            "ONNX Runtime TensorQuantOverrides (JSON, quant types by name as Olive stores them)",
        ),
        ExportFormat(
            "qdq",
            "fitonnx.export.ort",
            "write_qdq",
            True,
            "{stem}.qdq.onnx",
            "QDQ model made by onnxruntime.quantization.quantize_static (TensorRT's for a tensorrt recommendation)",
        ),
        ExportFormat(
            "qnn",
            "fitonnx.export.qnn",
            "write_encodings",
            False,
            "{stem}.encodings",
            "QNN/AIMET encodings JSON, layout 0.6.1",
        ),
        ExportFormat(
            "encodings",
            "fitonnx.export.qnn",
            "write_encodings",
            False,
            "{stem}.encodings",
            "the same as qnn",
        ),
        ExportFormat(
            "qnn-1.0.0",
            "fitonnx.export.qnn",
            "write_encodings_v1",
            False,
            "{stem}.1.0.0.encodings",
            "QNN/AIMET encodings JSON, layout 1.0.0",
        ),
        ExportFormat(
            "tensorrt",
            "fitonnx.export.tensorrt",
            "write_tensorrt",
            True,
            "{stem}.trt.qdq.onnx",
            "symmetric QDQ model for TensorRT, 16-bit tensors left in float",
        ),
    ]
    if importlib.util.find_spec("fitonnx.export.annotate") is not None:
        formats.append(
            ExportFormat(
                "annotated",
                __name__,
                "_write_annotated",
                False,
                "{stem}.annotated.onnx",
                "the original model with the recommendation in its metadata (fitonnx.export.annotate)",
            )
        )
    return {f.name: f for f in formats}


EXPORTERS: dict[str, ExportFormat] = _formats()


def _write_annotated(
    model: onnx.ModelProto, rec: Recommendation, out: Path, *, data: Dataset | None = None, per_channel: bool = False
) -> ExportResult:
    """Adapter to fitonnx.export.annotate (written atomically to the given file)."""
    del data, per_channel
    from fitonnx.export.annotate import annotate
    from fitonnx.export.common import save_model

    save_model(annotate(model, rec), out)
    return ExportResult("annotated", out, {**rec.weight_bits, **rec.activation_bits}, ())


def get_exporter(name: str) -> ExportFormat:
    """The registered format ``name``; unknown names fail with the list of known ones."""
    try:
        return EXPORTERS[name]
    except KeyError:
        raise FitonnxError(f"expected an export format among {sorted(EXPORTERS)}; found {name!r}") from None


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
    from fitonnx import api
    from fitonnx.allocate import recommendation as rec_mod
    from fitonnx.model.load import load_model

    exporter = get_exporter(fmt)
    loaded = load_model(model)
    rec = recommendation if isinstance(recommendation, Recommendation) else rec_mod.load(recommendation)
    path = exporter.output_path(out, source=loaded.path, model_name=rec.model)
    dataset = api.resolve_data(loaded, data, random_samples, seed) if exporter.needs_data else None
    return exporter(loaded.proto, rec, path, data=dataset, per_channel=per_channel, source=loaded.path)


__all__ = ["EXPORTERS", "ExportFormat", "ExportResult", "export_recommendation", "get_exporter"]
