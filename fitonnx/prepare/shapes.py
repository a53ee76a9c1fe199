"""Tensor element types and shapes from onnx.shape_inference (the library pass), and the pass that stores them.

The rewrites need ranks (a channel axis to broadcast on) and sometimes static sizes; ``inspect``
shows activation shapes without running the model. Symbolic dimensions keep their names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from fitonnx.errors import UnsupportedError
from fitonnx.model.graph import bodies
from fitonnx.model.runtime import make_session
from fitonnx.prepare.types import Change, ChangeKind

Dim = int | str | None  # a size, a symbolic name, or unknown


@dataclass(frozen=True)
class TensorType:
    """Element type (``onnx.TensorProto`` enum) and shape (None when even the rank is unknown)."""

    elem_type: int
    shape: tuple[Dim, ...] | None

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        if self.shape is None or not all(isinstance(d, int) for d in self.shape):
            return None
        return tuple(int(d) for d in self.shape)  # type: ignore[arg-type]


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is advisory: a model it cannot follow keeps what it declares
        return model


def _dims(value: onnx.ValueInfoProto) -> TensorType | None:
    if not value.type.HasField("tensor_type"):
        return None
    tt = value.type.tensor_type
    if not tt.HasField("shape"):
        return TensorType(tt.elem_type, None)
    dims: list[Dim] = []
    for d in tt.shape.dim:
        # paddle2onnx writes dim_value -1 for a dynamic size: read it as unknown
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None))
    return TensorType(tt.elem_type, tuple(dims))


def tensor_types(model: onnx.ModelProto) -> dict[str, TensorType]:
    """Type and shape of every tensor shape inference can tell, initializers included.

    Inference starts from the inputs alone: stored intermediate shapes may be stale (exporters'
    layout passes, inputs fixed since), and inference would keep them.
    """
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    del fresh.graph.value_info[:]
    inferred = _infer(fresh)
    out: dict[str, TensorType] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = _dims(value)
        if t is not None and (value.name not in out or out[value.name].shape is None):
            out[value.name] = t
    for tensor in model.graph.initializer:
        out[tensor.name] = TensorType(tensor.data_type, tuple(int(d) for d in tensor.dims))
    return out


def fix_input_shapes(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[onnx.ModelProto, list[Change]]:
    """Declare the graph inputs named in ``shapes`` with those static sizes.

    Scoring feeds every sample with the same shapes, so nothing is lost; static sizes let the
    optimizer fold shape arithmetic and let rewrites that need sizes (Resize, CumSum, pooling
    reshapes) apply, and onnxruntime-training needs them for pooling gradients.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in out.graph.initializer}
    fixed: list[str] = []
    for value in out.graph.input:
        if value.name in inits or value.name not in shapes or not value.type.HasField("tensor_type"):
            continue
        tt = value.type.tensor_type
        before = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tt.shape.dim]
        target = [int(d) for d in shapes[value.name]]
        if tt.HasField("shape") and before == target:
            continue
        if tt.HasField("shape") and (
            len(before) != len(target) or any(b is not None and b != t for b, t in zip(before, target, strict=True))
        ):
            continue  # the data check reports real mismatches; never declare a shape the model contradicts
        tt.ClearField("shape")
        for d in target:
            tt.shape.dim.add().dim_value = d
        fixed.append(f"{value.name} {target}")
    if not fixed:
        return out, []
    if any(bodies(n) for n in out.graph.node):  # only a subgraph can hold shapes the new static inputs contradict
        _check_loads(out)
    return out, [Change(ChangeKind.SHAPES, "model", "inputs fixed to the data's shapes: " + ", ".join(fixed))]


def _check_loads(model: onnx.ModelProto) -> None:
    """Raise if onnxruntime rejects the model with static inputs (stale shapes declared in subgraphs do that)."""
    if model.ByteSize() >= 1 << 31:  # cannot be passed as bytes; scoring such a model fails earlier anyway
        return
    try:
        make_session(model.SerializeToString(), optimize=False)
    except Exception as exc:
        first = str(exc).rsplit("] : ", 1)[-1].strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(f"onnxruntime rejects the model: {first[:200]}") from None


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    """Replace the stored intermediate shapes by freshly inferred ones (earlier passes may have left stale ones).

    Not a change of what the model computes, so it reports none.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    inferred = _infer(out)
    if inferred is not out:
        out.graph.value_info.extend(inferred.graph.value_info)
    return out, []
