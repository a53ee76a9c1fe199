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
from fitonnx.fisher.losses import OutputTarget
from fitonnx.fisher.outputs import OutputRequest, ancestors, loss_outputs, resolve_one
from fitonnx.model.graph import Kind, QuantTensor, find_quantizable, output_ranks
from fitonnx.model.load import LoadedModel, load_model
from fitonnx.model.runtime import make_session
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
    # Every output of score's default loss (``loss`` is the first) and the notes score would print
    # about it (outputs left out, readings that are guesses, tensors reaching no output).
    loss_outputs: tuple[OutputTarget, ...] = ()
    loss_notes: tuple[str, ...] = ()
    # Blockers that only a symbolic input size causes: score fixes the sizes from the data, and with
    # static sizes the prepare stage handles these nodes (checked with a guess of the sizes).
    shape_dependent: tuple[Blocker, ...] = ()

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


def _default_loss(
    model: onnx.ModelProto, tensors: Sequence[QuantTensor]
) -> tuple[tuple[OutputTarget, ...], str | None, tuple[str, ...]]:
    """How score reads the outputs without labels (by their real shapes when the model runs on
    inputs of static size), or why no default could be chosen; and the notes score would add."""
    shapes = _runtime_shapes(model)
    request = OutputRequest(None, None, None, {}, None, shapes)
    try:
        chosen, notes = loss_outputs(model, request)
        targets = tuple(resolve_one(model, output_ranks(model), name, request) for name in chosen)
    except FitonnxError as exc:
        return (), str(exc), ()
    for t in targets:
        if t.guessed:
            notes.append(f"output {t.output!r}: {t.reason}; say what it is with --output-kind {t.output}=KIND")
    needed = ancestors(model, [t.tap for t in targets])
    unreached = [t.name for t in tensors if t.name not in needed]
    if unreached:
        notes.append(f"{len(unreached)} tensor(s) reach no output of the loss and are not scored: {unreached[:5]}")
    return targets, None, tuple(notes)


def _runtime_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str, ...]]:
    """The outputs' shapes on one synthetic sample (symbolic input sizes guessed as in
    ``_guessed_sizes``); where onnxruntime refuses it, the declared shapes (symbolic sizes by name).

    Score reads shapes from a probe run on the data; inputs of the same sizes give the same shapes
    to every model whose shapes do not depend on values."""
    declared = {v.name: _declared(v) for v in [*model.graph.input, *model.graph.output]}
    guess = _guessed_sizes(model) or {}
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    feed: dict[str, np.ndarray] = {}
    for v in model.graph.input:
        dims = guess.get(v.name, declared[v.name])
        if v.name in inits:
            continue
        if dims is None or not all(isinstance(d, int) for d in dims):
            return {k: d for k, d in declared.items() if d is not None}
        dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        floating = np.issubdtype(dtype, np.floating)
        feed[v.name] = rng.normal(size=dims).astype(dtype) if floating else np.zeros(dims, dtype)
    try:
        session = make_session(model.SerializeToString())
        names = [o.name for o in session.get_outputs()]
        ran = {n: np.asarray(v).shape for n, v in zip(names, session.run(names, feed), strict=True)}
    except Exception:  # onnxruntime refuses the synthetic input: the declared shapes
        return {k: d for k, d in declared.items() if d is not None}
    return {**{k: tuple(v.shape) for k, v in feed.items()}, **ran}


def _declared(v: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    t = v.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def _guessed_sizes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
    """Static sizes for every input with symbolic ones (1 for the first axis, 64 elsewhere), or None
    when none has symbolic sizes or a rank is unknown."""
    inits = {t.name for t in model.graph.initializer}
    guess: dict[str, tuple[int, ...]] = {}
    for v in model.graph.input:
        t = v.type.tensor_type
        if v.name in inits or not t.HasField("shape"):
            if v.name not in inits:
                return None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if 0 in dims:
            guess[v.name] = tuple(d or (1 if k == 0 else 64) for k, d in enumerate(dims))
    return guess or None


def _shape_dependent(proto: onnx.ModelProto, blockers: Sequence[Blocker]) -> tuple[Blocker, ...]:
    """The blockers that disappear once the symbolic input sizes are static (score's case)."""
    guess = _guessed_sizes(proto)
    if not blockers or guess is None:
        return ()
    try:
        fixed = prepare(proto, input_shapes=guess)
        names = [t.name for t in find_quantizable(fixed.model)]
        ops = get_engine(AUTO).gradient_ops
        remaining = {b.node for b in find_blockers(fixed.model, names, gradient_ops=ops)}
    except FitonnxError:
        return ()
    return tuple(b for b in blockers if b.node not in remaining)


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
    targets, loss_problem, loss_notes = _default_loss(prepared.model, tensors)
    moved = _shape_dependent(proto, blockers) if not input_shapes and not problems else ()
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
        unsupported=tuple(b for b in blockers if b not in moved),
        problems=tuple(problems),
        loss=targets[0] if targets else None,
        loss_problem=loss_problem,
        loss_outputs=targets,
        loss_notes=loss_notes,
        shape_dependent=moved,
        has_if=any(n.op_type == "If" for n in prepared.model.graph.node),
    )


def _shape(t: TensorType | None) -> tuple[Dim, ...] | None:
    return None if t is None else t.shape
