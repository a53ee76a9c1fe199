"""``fitonnx inspect``: what fitonnx would score in a model and what it must change first, without data.

Lists the quantizable weights and activations of the prepared model (shapes from
onnx.shape_inference, symbolic sizes by name), what the prepare stage changes (opset conversion,
optimizer folds, Constant promotion, BatchNormalization folds, op rewrites) and every node that
would block a gradient, with the outputs whose loss it blocks.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from fitonnx.errors import FitonnxError
from fitonnx.files.atomic import write_atomic
from fitonnx.fisher.losses import OutputTarget, resolve_output
from fitonnx.model.graph import Kind, find_quantizable, output_ranks
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
    inspected = [
        InspectedTensor(
            name=t.name,
            kind=t.kind,
            dtype=_dtype(types.get(t.name)),
            shape=types[t.name].shape if t.name in types else t.shape,
            op_types=t.op_types,
            nodes=t.nodes,
            origins=prepared.origin_of(t.name),
        )
        for t in tensors
    ]
    try:
        blockers = find_blockers(prepared.model, [t.name for t in tensors])
    except FitonnxError as exc:
        problems.append(str(exc))
        blockers = []
    inits = {t.name for t in proto.graph.initializer}
    original_types = tensor_types(proto)
    loss: OutputTarget | None = None
    loss_problem = None
    try:
        loss = resolve_output(prepared.model, output_ranks(prepared.model), None, None, None)
    except FitonnxError as exc:
        loss_problem = str(exc)
    return Inspection(
        model=loaded.name,
        opset=opset_of(proto),
        prepared_opset=opset_of(prepared.model),
        ir_version=proto.ir_version,
        inputs=tuple(
            TensorInfo(v.name, _dtype(original_types.get(v.name)), _shape(original_types.get(v.name)))
            for v in proto.graph.input
            if v.name not in inits
        ),
        outputs=tuple(
            TensorInfo(v.name, _dtype(types.get(v.name)), _shape(types.get(v.name)))
            for v in prepared.model.graph.output
        ),
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


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def format_shape(shape: tuple[Dim, ...] | None) -> str:
    if shape is None:
        return "?"
    if not shape:
        return "scalar"
    return "x".join("?" if d is None else str(d) for d in shape)


def _consumers(t: InspectedTensor, limit: int = 3) -> str:
    pairs = [f"{op} {node}" for op, node in zip(t.op_types, t.nodes, strict=True)]
    more = f", +{len(pairs) - limit} more" if len(pairs) > limit else ""
    return ", ".join(pairs[:limit]) + more


def format_inspection(insp: Inspection) -> str:
    """The terminal report of ``fitonnx inspect``."""
    opset = f"opset {insp.opset}" + (f" -> {insp.prepared_opset}" if insp.prepared_opset != insp.opset else "")
    lines = [f"{insp.model}: {opset}, IR version {insp.ir_version}"]
    for label, items in (("inputs", insp.inputs), ("outputs", insp.outputs)):
        lines.append(f"{label}: " + ", ".join(f"{t.name} {t.dtype}[{format_shape(t.shape)}]" for t in items))
    loss = describe_loss(insp.loss) if insp.loss else insp.loss_problem
    if insp.has_if:
        loss += " (with If branches still in: scoring inlines the branch the data takes, which can change this)"
    lines.append(f"loss (default, no labels): {loss}")
    name_w = min(48, max([len("name")] + [len(t.name) for t in (*insp.weights, *insp.activations)]))

    lines += ["", f"quantizable weights: {len(insp.weights)}, {insp.parameters:,} parameters"]
    if insp.weights:
        lines.append(f"  {'name':<{name_w}} {'shape':<16} {'params':>10}  read by")
        for t in insp.weights:
            numel = f"{t.numel:,}" if t.numel is not None else "?"
            origin = f"  (from {', '.join(t.origins)})" if t.origins != (t.name,) else ""
            lines.append(f"  {t.name:<{name_w}} {format_shape(t.shape):<16} {numel:>10}  {_consumers(t)}{origin}")
    lines += ["", f"quantizable activations: {len(insp.activations)}"]
    if insp.activations:
        lines.append(f"  {'name':<{name_w}} {'shape':<16} {'elements':>10}  read by")
        for t in insp.activations:
            numel = f"{t.numel:,}" if t.numel is not None else "?"
            lines.append(f"  {t.name:<{name_w}} {format_shape(t.shape):<16} {numel:>10}  {_consumers(t)}")

    lines += ["", f"prepare changes: {len(insp.changes)}" + ("" if insp.changes else " (the model is used as it is)")]
    for c in insp.changes:
        lines.append(f"  {c.kind:<9} {c.where}: {c.detail}")

    lines += [
        "",
        f"unsupported: {len(insp.unsupported) + len(insp.problems)}"
        + ("" if insp.unsupported or insp.problems else " (none)"),
    ]
    for problem in insp.problems:
        lines.append(f"  prepare failed: {problem}")
    for b in insp.unsupported:
        outputs = f" [blocks output {', '.join(repr(o) for o in b.outputs)}]" if b.outputs else ""
        lines.append(f"  {b.describe()}{outputs}")
    symbolic = insp.symbolic_inputs
    if symbolic:
        lines += [
            "",
            "note: inputs with symbolic sizes ("
            + ", ".join(f"{t.name} [{format_shape(t.shape)}]" for t in symbolic)
            + "); `fitonnx score` fixes them from the data, which rewrites needing sizes use; preview with --input-shape",
        ]
    return "\n".join(lines)


def describe_loss(t: OutputTarget) -> str:
    """One line: which output the loss reads, as what, and from which tensor."""
    what = t.likelihood.value + (f" over axis {t.class_axis}" if t.class_axis is not None else "")
    source = "" if t.tap == t.output else f", from {t.tap!r} (the values before its Softmax/Sigmoid)"
    if t.probabilities:
        source = ", read as probabilities"
    return f"{what} on {t.output!r}{source}"


def to_dict(insp: Inspection) -> dict[str, Any]:
    """The JSON form of an inspection (schema in README.md, "Inspecting a model")."""

    def tensor(t: InspectedTensor) -> dict[str, Any]:
        return {
            "name": t.name,
            "dtype": t.dtype,
            "shape": None if t.shape is None else list(t.shape),
            "numel": t.numel,
            "op_types": list(t.op_types),
            "nodes": list(t.nodes),
            "origins": list(t.origins),
        }

    def info(t: TensorInfo) -> dict[str, Any]:
        return {"name": t.name, "dtype": t.dtype, "shape": None if t.shape is None else list(t.shape)}

    return {
        "model": insp.model,
        "opset": insp.opset,
        "prepared_opset": insp.prepared_opset,
        "ir_version": insp.ir_version,
        "inputs": [info(t) for t in insp.inputs],
        "outputs": [info(t) for t in insp.outputs],
        "weights": [tensor(t) for t in insp.weights],
        "activations": [tensor(t) for t in insp.activations],
        "totals": {"weights": len(insp.weights), "activations": len(insp.activations), "parameters": insp.parameters},
        "changes": [{"kind": c.kind, "where": c.where, "detail": c.detail} for c in insp.changes],
        "unsupported": [
            {"op_type": b.op_type, "domain": b.domain, "node": b.node, "reason": b.reason, "outputs": list(b.outputs)}
            for b in insp.unsupported
        ],
        "problems": list(insp.problems),
        "loss": None
        if insp.loss is None
        else {
            "output": insp.loss.output,
            "tap": insp.loss.tap,
            "likelihood": insp.loss.likelihood.value,
            "class_axis": insp.loss.class_axis,
            "probabilities": insp.loss.probabilities,
        },
    }


def write_json(insp: Inspection, path: str | os.PathLike[str]) -> None:

    def write(f: io.TextIOBase) -> None:
        json.dump(to_dict(insp), f, indent=2)
        f.write("\n")

    write_atomic(path, write)
