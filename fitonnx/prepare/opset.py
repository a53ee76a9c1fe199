"""Bring the model's default-domain opset and IR version into the range the gradient engine supports.

Uses onnx.version_converter (the well-kept library pass) rather than hand-written adapters, both up
(opsets before 13 lack the loss ops' forms) and down (onnxruntime 1.19 loads opsets up to 21).
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from fitonnx.errors import UnsupportedError
from fitonnx.model.graph import default_opset
from fitonnx.prepare.types import Change, ChangeKind

MIN_OPSET = 13  # SoftmaxCrossEntropyLoss and ReduceSum-with-axes-input forms used by the loss heads
MAX_OPSET = 21  # the newest opset onnxruntime 1.19 loads
MAX_IR_VERSION = 10  # the newest IR version onnxruntime 1.19 loads (onnx 1.16)


opset_of = default_opset  # the name the passes and exporters know it by


def runnable(model: onnx.ModelProto) -> bool:
    """Whether this onnxruntime can load the model as it is (IR version and default opset)."""
    return model.ir_version <= MAX_IR_VERSION and opset_of(model) <= MAX_OPSET


def convert_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    version = opset_of(model)
    target = MIN_OPSET if version < MIN_OPSET else MAX_OPSET if version > MAX_OPSET else version
    changes: list[Change] = []
    if target == version:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        try:
            out = version_converter.convert_version(model, target)
        except Exception as exc:
            raise UnsupportedError(
                f"expected an opset in [{MIN_OPSET}, {MAX_OPSET}] or one onnx.version_converter can convert; "
                f"converting opset {version} to {target} failed: {str(exc).strip().splitlines()[0][:200]}",
                hint=f"re-export the model with an opset between {MIN_OPSET} and {MAX_OPSET}",
            ) from None
        changes.append(Change(ChangeKind.OPSET, "model", f"opset {version} -> {target} (onnx.version_converter)"))
    if out.ir_version > MAX_IR_VERSION:
        # Metadata only: the IR versions after 10 add types and fields onnxruntime 1.19 cannot read,
        # which a model using them would fail on at load time anyway.
        changes.append(Change(ChangeKind.OPSET, "model", f"IR version {out.ir_version} -> {MAX_IR_VERSION}"))
        out.ir_version = MAX_IR_VERSION
    return out, changes
