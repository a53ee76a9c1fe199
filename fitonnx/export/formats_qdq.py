"""A QDQ model that applies a format recommendation (``recommend --formats``) exactly as scored.

Every weight with a format is stored quantized behind a DequantizeLinear (``formats.weight_qdq``:
``axis`` per channel, ``axis`` + ``block_size`` per block at opset 21, FLOAT8E4M3FN at opset 19,
FLOAT4E2M1 with its e4m3 block scales at opset 23, fp16/bf16 as a Cast round trip), every
activation with a format gets a QuantizeLinear→DequantizeLinear pair on the calibrated range in
the recommendation (``formats.activation_qdq``). The Q/DQ arithmetic is the format's own, so the
model computes what fitonnx scored and simulated (``formats`` is tested bit for bit against
onnxruntime's QuantizeLinear/DequantizeLinear). The model is lifted to the lowest opset that has
every format used (onnx.version_converter).

ONNX Runtime's MatMulNBits (the ``ort`` target's ``uintN/bB`` MatMul weights) is written by
onnxruntime.quantization's own ``MatMulNBitsQuantizer`` (``export.nbits``) before the Q/DQ pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from fitonnx.allocate.formats_alloc import per_tensor_twin
from fitonnx.allocate.recommendation import Recommendation
from fitonnx.errors import FitonnxError, UnsupportedError
from fitonnx.export.common import ExportResult, check_names, check_runs, first_feed, save_model, working_copy
from fitonnx.export.fusion import add_upstream_copies
from fitonnx.export.nbits import apply_nbits, nbits_weights
from fitonnx.formats import (
    ElementKind,
    Format,
    Granularity,
    QdqPieces,
    ScaleType,
    activation_qdq,
    block_nodes,
    parse_format,
    weight_qdq,
)
from fitonnx.formats.block_nodes import (
    BlockLayout,
    block_layout,
    dynamic_qdq_nodes,
    dynamic_qdq_opset,
    is_dynamic_block,
)
from fitonnx.formats.onnx_nodes import min_opset
from fitonnx.formats.quantize import nvfp4_tensor_scale, params_from_range, quantize_dequantize
from fitonnx.model import graph
from fitonnx.model.data import Dataset
from fitonnx.model.runtime import make_session
from fitonnx.prepare.opset import opset_of
from fitonnx.score.formats_fit import activation_axis, format_axis

IR_FOR_OPSET = ((23, 11), (21, 10), (19, 9))  # the lowest IR version each opset needs


@dataclass(frozen=True)
class FormatPlan:
    """The recommendation's formats resolved against the model: weight → (format, axis), activation → format."""

    weights: Mapping[str, tuple[Format, int | None]]
    activations: Mapping[str, Format]
    notes: tuple[str, ...] = ()
    blocks: Mapping[str, BlockLayout] = field(default_factory=dict)  # activations in dynamic block formats

    @property
    def formats(self) -> tuple[Format, ...]:
        return (*(f for f, _ in self.weights.values()), *self.activations.values())

    def opset(self) -> int:
        """The lowest opset whose Q/DQ express every format of the plan."""
        need = [min_opset(f) for f, _ in self.weights.values()]
        need += [dynamic_qdq_opset(f) if n in self.blocks else min_opset(f) for n, f in self.activations.items()]
        return max(need, default=0)


def format_plan(model: onnx.ModelProto, rec: Recommendation, skip: frozenset[str] = frozenset()) -> FormatPlan:
    """The formats of ``rec`` for ``model`` (a working copy), weights in ``skip`` left out.

    A weight scored where prepare had rewritten its reader (a tied embedding's folded transpose read
    by MatMul) may have no channel or block axis in the original: it gets the format's per-tensor
    twin, as the toolchain would store it, and a note; without a twin (MX, NVFP4) it stays float."""
    if not rec.by_format:
        raise FitonnxError("expected a recommendation with formats (recommend --formats); found bit widths only")
    shapes = {t.name: len(t.dims) for t in model.graph.initializer}
    weights: dict[str, tuple[Format, int | None]] = {}
    notes: list[str] = []
    for name, fmt_name in rec.weight_formats.items():
        if name in skip:
            continue
        fmt = parse_format(fmt_name)
        axis = format_axis(model, name, fmt, shapes[name])
        if fmt.granularity is not Granularity.TENSOR and axis is None:
            twin = per_tensor_twin(fmt)
            notes.append(
                f"{name!r}: its readers in the model give {fmt.name} no axis; "
                + (f"written as {twin.name}" if twin is not None else "left in float")
            )
            if twin is None:
                continue
            fmt = twin
        weights[name] = (fmt, axis)
    activations = {name: parse_format(f) for name, f in rec.activation_formats.items()}
    dynamic = {n: f for n, f in activations.items() if is_dynamic_block(f)}
    types = graph.value_types(model) if dynamic else {}
    blocks = {n: activation_blocks(model, types, n, f) for n, f in dynamic.items()}
    return FormatPlan(weights, activations, tuple(notes), blocks)


def activation_blocks(model: onnx.ModelProto, types: graph.ValueTypes, name: str, fmt: Format) -> BlockLayout:
    """How activation ``name`` of ``model`` is cut into ``fmt``'s blocks: along its readers'
    reduction axis (``score.formats_fit.activation_axis``), the axis' length from shape inference
    (``types``: ``graph.value_types(model)``)."""
    shape = types.get(name, (0, None))[1]
    axis = None if shape is None else activation_axis(model, name, len(shape))
    if shape is None or axis is None or shape[axis] is None:
        raise FitonnxError(
            f"expected activation {name!r} read by MatMul/Gemm/Conv with a known length along their reduction axis "
            f"for {fmt.name}; found shape {shape} and axis {axis}"
        )
    axis %= len(shape)
    if axis >= 2 and any(d is None for d in shape[axis + 1 :]):
        raise FitonnxError(f"expected known dimensions after axis {axis} of activation {name!r}; found {shape}")
    return block_layout(tuple(1 if d is None else d for d in shape), axis, fmt.block_size or 1)


def lift_opset(model: onnx.ModelProto, plan: FormatPlan) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` at the lowest opset (≥ its own) whose Q/DQ express every format, and a note when lifted."""
    formats = plan.formats
    need = max(opset_of(model), plan.opset())
    if need == opset_of(model):
        return model, []
    try:
        out = version_converter.convert_version(model, need)
    except Exception as exc:
        raise UnsupportedError(
            f"expected a model onnx.version_converter lifts from opset {opset_of(model)} to {need} for "
            f"{sorted({f.name for f in formats})}; it failed: {str(exc).splitlines()[0][:200]}"
        ) from None
    ir = next((v for opset, v in IR_FOR_OPSET if need >= opset), out.ir_version)
    out.ir_version = max(out.ir_version, ir)
    return out, [f"opset {opset_of(model)} → {need} (onnx.version_converter) for the formats' Q/DQ"]


def _reroute(g: onnx.GraphProto, tensor: str, replacement: str, skip: set[str]) -> None:
    for node in g.node:
        if node.name in skip:
            continue
        node.input[:] = [replacement if name == tensor else name for name in node.input]


def _weight_pieces(fmt: Format, name: str, values: np.ndarray, axis: int | None, runnable: bool) -> QdqPieces:
    """A weight's Q/DQ; ``runnable`` replaces FP4 (which onnxruntime's CPU provider lacks) by its
    dequantized float values, the same numbers, so that onnxruntime can check the rest of the model."""
    if runnable and fmt.element is ElementKind.FP4_E2M1:
        deq = quantize_dequantize(values, fmt, axis)
        tensor = numpy_helper.from_array(deq.astype(np.float32), f"{name}_dequantized")
        return QdqPieces((), (tensor,), 0, tensor.name)
    return weight_qdq(fmt, name, values, axis, runnable=runnable)


def _dynamic_pieces(
    fmt: Format, name: str, layout: BlockLayout, absmax: float, opset: int, runnable: bool
) -> QdqPieces:
    """An activation's dynamic block Q/DQ (``block_nodes.dynamic_qdq_nodes``; NVFP4's tensor scale from
    the calibrated max|a|). ``runnable``: FP4, which onnxruntime lacks, as the same numbers in float
    arithmetic (``block_nodes.block_qdq_nodes``), so that onnxruntime can check the rest of the model."""
    p = f"{name}_{fmt.name.replace('/', '_')}_"
    inits: list[onnx.TensorProto] = []
    scale = None
    if fmt.scale is ScaleType.E4M3:
        scale = p + "tensor_scale"
        inits.append(numpy_helper.from_array(np.asarray(nvfp4_tensor_scale(absmax), np.float32), scale))
    make = block_nodes.block_qdq_nodes if runnable and fmt.element is ElementKind.FP4_E2M1 else dynamic_qdq_nodes
    nodes, more = make(name, p, fmt, layout, opset, scale)
    out = f"{name}_dequantized"
    nodes.append(helper.make_node("Identity", [p + "out"], [out], name=f"{name}_dequantize"))
    return QdqPieces(tuple(nodes), (*inits, *more), dynamic_qdq_opset(fmt), out)


def apply_formats(
    model: onnx.ModelProto, rec: Recommendation, plan: FormatPlan, *, runnable: bool = True
) -> tuple[onnx.ModelProto, list[str]]:
    """A new model with ``plan``'s Q/DQ in place (``model`` untouched), and notes."""
    work, notes = lift_opset(model, plan)
    out = onnx.ModelProto()
    out.CopyFrom(work)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    head: list[onnx.NodeProto] = []
    for name, (fmt, axis) in plan.weights.items():
        pieces = _weight_pieces(fmt, name, numpy_helper.to_array(inits[name]), axis, runnable)
        _reroute(g, name, pieces.output, set())
        head.extend(pieces.nodes)
        g.initializer.extend(pieces.initializers)
    used = graph.reads(g.node) | {o.name for o in g.output}
    gone = {name for name in plan.weights if name not in used}
    kept = [t for t in g.initializer if t.name not in gone]
    del g.initializer[:]
    g.initializer.extend(kept)
    declared = [v for v in g.input if v.name not in gone]  # old IR versions list weights as inputs too
    del g.input[:]
    g.input.extend(declared)
    after: dict[str, list[onnx.NodeProto]] = {}
    for name, fmt in plan.activations.items():
        if name not in rec.ranges:
            raise FitonnxError(
                f"expected a calibration range for activation {name!r} in the recommendation; found none"
            )
        lo, hi = rec.ranges[name]
        if name in plan.blocks:
            pieces = _dynamic_pieces(fmt, name, plan.blocks[name], max(abs(lo), abs(hi)), opset_of(work), runnable)
        else:
            pieces = activation_qdq(fmt, name, (), None, params_from_range(fmt, lo, hi), runnable=runnable)
        _reroute(g, name, pieces.output, {n.name for n in pieces.nodes})
        g.initializer.extend(pieces.initializers)
        after.setdefault(name, []).extend(pieces.nodes)
    inputs = {v.name for v in g.input}
    first = [n for name in after if name in inputs or name in inits for n in after[name]]
    nodes = [*head, *first]
    for node in g.node:
        nodes.append(node)
        for output in node.output:
            nodes.extend(after.get(output, []))
    del g.node[:]
    g.node.extend(nodes)
    return out, notes


def format_model(
    model: onnx.ModelProto, rec: Recommendation, *, skip: frozenset[str] = frozenset(), runnable: bool = True
) -> tuple[onnx.ModelProto, FormatPlan, list[str]]:
    """The QDQ model of a format recommendation for ``model`` (the original, or one whose weights in
    ``skip`` another writer already quantized), its plan and notes."""
    work = working_copy(model)
    check_names(work, rec)
    plan = format_plan(work, rec, skip)
    out, notes = apply_formats(work, rec, plan, runnable=runnable)
    return out, plan, notes


def _check_loadable(model: onnx.ModelProto) -> None:
    """A one-line error when the installed onnxruntime cannot load the opset/IR version the formats need."""
    try:
        make_session(model.SerializeToString(), optimize=False)
    except Exception as exc:
        text = str(exc)
        if "IR version" in text or "opset" in text.lower():
            raise UnsupportedError(
                f"expected an onnxruntime that loads opset {opset_of(model)} (IR version {model.ir_version}), "
                f"which these formats need, to check the export; this one does not: {text.splitlines()[0][-160:]}",
                hint="use a newer onnxruntime, or formats of a lower opset (int8: 13, fp8: 19, int4 and blocks: 21)",
            ) from None


def write_format_model(
    model: onnx.ModelProto,
    rec: Recommendation,
    out: Path,
    *,
    data: Dataset | None,
    kind: str,
    nbits: bool = False,
    optimize: bool = True,
) -> ExportResult:
    """Write the QDQ model of a format recommendation (``nbits``: MatMul weights in blocked uint
    formats as MatMulNBits), checked to run in onnxruntime first (on the first sample of ``data``
    when given; ``optimize=False`` checks it with onnxruntime's optimizer off, for files another
    runtime reads). FP4 weights, which onnxruntime cannot run, are checked through their
    dequantized values."""
    work = working_copy(model)
    check_names(work, rec)
    to_nbits = nbits_weights(work, {n: parse_format(f) for n, f in rec.weight_formats.items()}) if nbits else {}
    plan = format_plan(work, rec, frozenset(to_nbits))
    fused = {n: f.bits for n, f in plan.activations.items() if f.is_int}  # exact copies that let ORT fuse (issue 15)
    written, notes = apply_formats(work, rec, plan, runnable=False)
    notes = [*plan.notes, *notes]
    written = apply_nbits(add_upstream_copies(written, fused)[0], to_nbits)
    has_fp4 = any(f.element is ElementKind.FP4_E2M1 for f in plan.formats)
    runnable = add_upstream_copies(apply_formats(work, rec, plan, runnable=True)[0], fused)[0]
    check = apply_nbits(runnable, to_nbits) if has_fp4 else written
    if has_fp4:
        notes.append(
            "onnxruntime has no FLOAT4E2M1 kernel: the model was checked with the FP4 weights' dequantized values "
            "and the FP4 activations' blocks in float arithmetic"
        )
    feed = None if data is None else first_feed(data, graph.input_specs(check))
    _check_loadable(check)
    check_runs(check, feed, optimize=optimize)
    save_model(written, out)
    quantized = {n: f.bits for n, (f, _) in plan.weights.items()}
    quantized |= {n: f.bits for n, f in to_nbits.items()} | {n: f.bits for n, f in plan.activations.items()}
    if to_nbits:
        notes.append(f"{len(to_nbits)} MatMul weights as MatMulNBits (onnxruntime.quantization's MatMulNBitsQuantizer)")
    unlisted = tuple(t.name for t in graph.find_quantizable(work) if t.name not in quantized)
    return ExportResult(kind, out, quantized, unlisted, tuple(notes))
