"""``fitonnx inspect``: what fitonnx would score in a model and what it must change first, without data.

Lists the quantizable weights and activations of the prepared model (shapes from
onnx.shape_inference, symbolic sizes by name), what the prepare stage changes (opset conversion,
optimizer folds, Constant promotion, BatchNormalization folds, op rewrites) and every node that
would block a gradient, with the outputs whose loss it blocks. The views are in
``fitonnx.render.inspection``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from fitonnx.errors import FitonnxError
from fitonnx.fisher.engines import AUTO, get_engine
from fitonnx.fisher.losses import OutputTarget, resolve_output
from fitonnx.model.graph import Kind, QuantTensor, find_quantizable, output_ranks
from fitonnx.model.load import LoadedModel, load_model
from fitonnx.prepare import Change, PreparedModel, prepare
from fitonnx.prepare.opset import opset_of
from fitonnx.prepare.shapes import Dim, TensorType, tensor_types
from fitonnx.prepare.support import Blocker, find_blockers

InspectSource = str | os.PathLike[str] | onnx.ModelProto | LoadedModel


@dataclass(frozen=True)
class TensorInfo:
    """A graph input/output or a quantizable tensor: its name, element type and shape (None if unknown)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    @property
    def numel(self) -> int | None:
        if self.shape is None or not all(isinstance(d, int) for d in self.shape):
            return None
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class InspectedTensor:
    """A quantizable tensor of the prepared model, its readers and the original tensors it comes from."""

    name: str
    kind: Kind
    dtype: str
    shape: tuple[Dim, ...] | None
    op_types: tuple[str, ...]
    nodes: tuple[str, ...]
    origins: tuple[str, ...]  # names in the original model (the tensor itself when unchanged)

    @property
    def numel(self) -> int | None:
        return TensorInfo(self.name, self.dtype, self.shape).numel


@dataclass(frozen=True)
class Inspection:
    """The result of ``inspect_model``."""

    model: str
    opset: int
    prepared_opset: int
    ir_version: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    weights: tuple[InspectedTensor, ...]
    activations: tuple[InspectedTensor, ...]
    changes: tuple[Change, ...]
    unsupported: tuple[Blocker, ...]
    problems: tuple[str, ...]  # prepare errors; the lists then describe the unprepared model
    loss: OutputTarget | None = None  # how score reads the outputs by default, without labels
    loss_problem: str | None = None  # why no default loss could be chosen
    has_if: bool = False  # the prepared graph still holds If nodes (scoring specializes them on data)

    @property
    def parameters(self) -> int:
        return sum(w.numel or 0 for w in self.weights)

    @property
    def symbolic_inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(i for i in self.inputs if i.shape is None or not all(isinstance(d, int) for d in i.shape))


def _dtype(t: TensorType | None) -> str:
    if t is None or t.elem_type == 0:
        return "?"
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)))


def _inspected(t: QuantTensor, types: Mapping[str, TensorType], prepared: PreparedModel) -> InspectedTensor:
    """A quantizable tensor with its inferred type and the original tensors it comes from."""
    return InspectedTensor(
        name=t.name,
        kind=t.kind,
        dtype=_dtype(types.get(t.name)),
        shape=types[t.name].shape if t.name in types else t.shape,
        op_types=t.op_types,
        nodes=t.nodes,
        origins=prepared.origin_of(t.name),
    )


def _infos(names: Sequence[str], types: Mapping[str, TensorType]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(name, _dtype(types.get(name)), _shape(types.get(name))) for name in names)


def _default_loss(model: onnx.ModelProto) -> tuple[OutputTarget | None, str | None]:
    """How score reads the outputs without labels, or why no default could be chosen."""
    try:
        return resolve_output(model, output_ranks(model), None, None, None), None
    except FitonnxError as exc:
        return None, str(exc)


def inspect_model(model: InspectSource, *, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Inspection:
    """Prepare ``model`` (no data) and describe what fitonnx would score and change.

    ``input_shapes`` fixes symbolic input sizes as scoring does from the data (some rewrites need
    static sizes). A model the prepare stage rejects is still described, from its unprepared graph,
    with the reason under ``problems``.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    proto = loaded.proto
    problems: list[str] = []
    try:
        prepared = prepare(proto, input_shapes=input_shapes)
    except FitonnxError as exc:
        problems.append(str(exc))
        prepared = PreparedModel(original=proto, model=proto, changes=(), reference=proto)
    types = tensor_types(prepared.model)
    tensors = find_quantizable(prepared.model)
    inspected = [_inspected(t, types, prepared) for t in tensors]
    try:
        engine = get_engine(AUTO)
        blockers = find_blockers(prepared.model, [t.name for t in tensors], gradient_ops=engine.gradient_ops)
    except FitonnxError as exc:
        problems.append(str(exc))
        blockers = []
    inits = {t.name for t in proto.graph.initializer}
    loss, loss_problem = _default_loss(prepared.model)
    return Inspection(
        model=loaded.name,
        opset=opset_of(proto),
        prepared_opset=opset_of(prepared.model),
        ir_version=proto.ir_version,
        inputs=_infos([v.name for v in proto.graph.input if v.name not in inits], tensor_types(proto)),
        outputs=_infos([v.name for v in prepared.model.graph.output], types),
        weights=tuple(t for t in inspected if t.kind is Kind.WEIGHT),
        activations=tuple(t for t in inspected if t.kind is Kind.ACTIVATION),
        changes=prepared.changes,
        unsupported=tuple(blockers),
        problems=tuple(problems),
        loss=loss,
        loss_problem=loss_problem,
        has_if=any(n.op_type == "If" for n in prepared.model.graph.node),
    )


def _shape(t: TensorType | None) -> tuple[Dim, ...] | None:
    return None if t is None else t.shape
