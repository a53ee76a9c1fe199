"""Views of an ``Inspection``: the terminal report of ``fitonnx inspect`` and its JSON form."""

from __future__ import annotations

import io
import os
from typing import Any

from fitonnx.analysis.inspection import InspectedTensor, Inspection, TensorInfo
from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text
from fitonnx.fisher.losses import OutputTarget
from fitonnx.prepare.shapes import Dim


def format_shape(shape: tuple[Dim, ...] | None) -> str:
    if shape is None:
        return "?"
    if not shape:
        return "scalar"
    return "x".join("?" if d is None else str(d) for d in shape)


def describe_loss(t: OutputTarget) -> str:
    """One line: which output the loss reads, as what, and from which tensor."""
    what = t.likelihood.value + (f" over axis {t.class_axis}" if t.class_axis is not None else "")
    source = "" if t.tap == t.output else f", from {t.tap!r} (the values before its Softmax/Sigmoid)"
    if t.probabilities:
        source = ", read as probabilities"
    return f"{what} on {t.output!r}{source}"


def _consumers(t: InspectedTensor, limit: int = 3) -> str:
    pairs = [f"{op} {node}" for op, node in zip(t.op_types, t.nodes, strict=True)]
    more = f", +{len(pairs) - limit} more" if len(pairs) > limit else ""
    return ", ".join(pairs[:limit]) + more


def _tensor_lines(insp: Inspection, name_w: int) -> list[str]:
    """The quantizable weights (with where they come from) and activations."""
    lines = ["", f"quantizable weights: {len(insp.weights)}, {insp.parameters:,} parameters"]
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
    return lines


def _problem_lines(insp: Inspection) -> list[str]:
    """What prepare changes, what it cannot differentiate, and the inputs with symbolic sizes."""
    lines = ["", f"prepare changes: {len(insp.changes)}" + ("" if insp.changes else " (the model is used as it is)")]
    lines += [f"  {c.kind:<9} {c.where}: {c.detail}" for c in insp.changes]
    lines += [
        "",
        f"unsupported: {len(insp.unsupported) + len(insp.problems)}"
        + ("" if insp.unsupported or insp.problems else " (none)"),
    ]
    lines += [f"  prepare failed: {problem}" for problem in insp.problems]
    for b in insp.unsupported:
        outputs = f" [blocks output {', '.join(repr(o) for o in b.outputs)}]" if b.outputs else ""
        lines.append(f"  {b.describe()}{outputs}")
    if insp.shape_dependent:
        lines += ["", f"need static input sizes: {len(insp.shape_dependent)} (score takes them from the data)"]
        lines += [f"  {b.op_type} (node {b.node!r})" for b in insp.shape_dependent]
    symbolic = insp.symbolic_inputs
    if symbolic:
        lines += [
            "",
            "note: inputs with symbolic sizes ("
            + ", ".join(f"{t.name} [{format_shape(t.shape)}]" for t in symbolic)
            + "); `fitonnx score` fixes them from the data, which rewrites needing sizes use; preview with --input-shape",
        ]
    return lines


def format_inspection(insp: Inspection) -> str:
    """The terminal report of ``fitonnx inspect``."""
    opset = f"opset {insp.opset}" + (f" -> {insp.prepared_opset}" if insp.prepared_opset != insp.opset else "")
    lines = [f"{insp.model}: {opset}, IR version {insp.ir_version}"]
    for label, items in (("inputs", insp.inputs), ("outputs", insp.outputs)):
        lines.append(f"{label}: " + ", ".join(f"{t.name} {t.dtype}[{format_shape(t.shape)}]" for t in items))
    targets = insp.loss_outputs or ((insp.loss,) if insp.loss else ())
    loss = " + ".join(describe_loss(t) for t in targets) if targets else str(insp.loss_problem)
    if insp.has_if:
        loss += " (with If branches still in: scoring inlines the branch the data takes, which can change this)"
    lines.append(f"loss (default, no labels): {loss}")
    lines += [f"  note: {n}" for n in insp.loss_notes]
    name_w = min(48, max([len("name")] + [len(t.name) for t in (*insp.weights, *insp.activations)]))
    lines += _tensor_lines(insp, name_w)
    lines += _problem_lines(insp)
    return "\n".join(lines)


def _tensor_dict(t: InspectedTensor) -> dict[str, Any]:
    return {
        "name": t.name,
        "dtype": t.dtype,
        "shape": None if t.shape is None else list(t.shape),
        "numel": t.numel,
        "op_types": list(t.op_types),
        "nodes": list(t.nodes),
        "origins": list(t.origins),
    }


def _info_dict(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": None if t.shape is None else list(t.shape)}


def _loss_dict(t: OutputTarget | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {
        "output": t.output,
        "tap": t.tap,
        "likelihood": t.likelihood.value,
        "class_axis": t.class_axis,
        "probabilities": t.probabilities,
        "reason": t.reason,
        "guessed": t.guessed,
    }


def to_dict(insp: Inspection) -> dict[str, Any]:
    """The JSON form of an inspection (schema in README.md, "Inspecting a model")."""
    return {
        "model": insp.model,
        "opset": insp.opset,
        "prepared_opset": insp.prepared_opset,
        "ir_version": insp.ir_version,
        "inputs": [_info_dict(t) for t in insp.inputs],
        "outputs": [_info_dict(t) for t in insp.outputs],
        "weights": [_tensor_dict(t) for t in insp.weights],
        "activations": [_tensor_dict(t) for t in insp.activations],
        "totals": {"weights": len(insp.weights), "activations": len(insp.activations), "parameters": insp.parameters},
        "changes": [{"kind": c.kind, "where": c.where, "detail": c.detail} for c in insp.changes],
        "unsupported": [
            {"op_type": b.op_type, "domain": b.domain, "node": b.node, "reason": b.reason, "outputs": list(b.outputs)}
            for b in insp.unsupported
        ],
        "problems": list(insp.problems),
        "loss": _loss_dict(insp.loss),
        "loss_outputs": [_loss_dict(t) for t in insp.loss_outputs],
        "loss_notes": list(insp.loss_notes),
        "shape_dependent": [{"op_type": b.op_type, "node": b.node} for b in insp.shape_dependent],
    }


def write_json(insp: Inspection, path: str | os.PathLike[str]) -> None:
    def write(f: io.TextIOBase) -> None:
        f.write(json_text(to_dict(insp)).rstrip("\n"))
        f.write("\n")

    write_atomic(path, write)
