"""The export formats: name → the module and function that write it.

Writers are imported by name when first used, so that scoring never pays for
onnxruntime.quantization, which the QDQ writers need.
"""

from __future__ import annotations

import importlib
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
            "fitonnx.export.qdq",
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
    formats.append(
        ExportFormat(
            "annotated",
            "fitonnx.export.annotate",
            "write_model",
            False,
            "{stem}.annotated.onnx",
            "the original model with the recommendation in its metadata (fitonnx.export.annotate)",
        )
    )
    return {f.name: f for f in formats}


EXPORTERS: dict[str, ExportFormat] = _formats()


def get_exporter(name: str) -> ExportFormat:
    """The registered format ``name``; unknown names fail with the list of known ones."""
    try:
        return EXPORTERS[name]
    except KeyError:
        raise FitonnxError(f"expected an export format among {sorted(EXPORTERS)}; found {name!r}") from None
