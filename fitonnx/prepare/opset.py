"""Bring the model's default-domain opset into the range the gradient engine supports.

Uses onnx.version_converter (the well-kept library pass) rather than hand-written adapters.
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from fitonnx.errors import UnsupportedError
from fitonnx.prepare.pipeline import Change

MIN_OPSET = 13  # SoftmaxCrossEntropyLoss and ReduceSum-with-axes-input forms used by the loss heads
MAX_OPSET = 21  # the newest opset onnxruntime 1.19 loads


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    version = opset_of(model)
    target = MIN_OPSET if version < MIN_OPSET else MAX_OPSET if version > MAX_OPSET else version
    if target == version:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out, []
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise UnsupportedError(
            f"expected an opset in [{MIN_OPSET}, {MAX_OPSET}] or one onnx.version_converter can convert; "
            f"converting opset {version} to {target} failed: {str(exc).splitlines()[0][:200]}"
        ) from None
    return converted, [Change("opset", "model", f"opset {version} -> {target} (onnx.version_converter)")]
