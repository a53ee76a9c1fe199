"""ONNX Runtime: TensorQuantOverrides as JSON, and a QDQ model made by onnxruntime.quantization itself.

The overrides are written the way Olive stores them (quant types by enum name) and turned back
into ``QuantType`` members, checked by onnxruntime's own ``TensorQuantOverridesHelper``, before
``quantize_static`` gets them through ``extra_options["TensorQuantOverrides"]``.

Bits → quant types: weights 4/8/16 → QInt4/QInt8/QInt16, symmetric when the recommendation's
target says so (ort, qnn, tensorrt: yes; generic: no); activations 4/8/16 → QUInt4/QUInt8/QUInt16
(asymmetric), or QInt* symmetric for a symmetric-activation toolchain (TensorRT). onnxruntime
picks the scales from the calibration data: symmetric int8/int16 use the narrow range (±127,
±32767, step max|x|/127 as the targets assume), symmetric int4 the full one (−8..7, step
2·max|x|/15, a little finer than the max|x|/7 the FIT figures assume).

Only the tensors the recommendation quantizes get Q/DQ: ``op_types_to_quantize`` is limited to the
ops that read them, the outputs of those ops are not quantized (``OpTypesToExcludeOutputQuantization``),
ops that read no quantized tensor are in ``nodes_to_exclude``, and the inputs onnxruntime quantizes
with its defaults although the recommendation keeps them in float (the other input of a node
whose weight is quantized, say) get their float tensor back. Every rounding in the exported model
is thus one the FIT score accounted for. onnxruntime's CPU kernels fuse a DequantizeLinear → op →
QuantizeLinear group into an integer kernel only when the op's output is quantized too: where a
recommended activation is reached from an op's output through Relu/MaxPool/layout ops only, the
output gets an exact copy of the activation's Q/DQ (``fusion``), which rounds nothing more.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, version_converter
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_utils, quantize_static
from onnxruntime.quantization.registry import QDQRegistry
from onnxruntime.quantization.tensor_quant_overrides import TensorQuantOverridesHelper

from fitonnx.allocate.recommendation import Recommendation
from fitonnx.allocate.targets import Scheme
from fitonnx.errors import DataError, FitonnxError, InternalError, UnsupportedError
from fitonnx.export.common import (
    ExportPlan,
    ExportResult,
    Toolchain,
    channel_axis,
    plan_export,
    quantizable_sites,
)
from fitonnx.export.fusion import add_upstream_copies
from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text
from fitonnx.model import data as data_mod
from fitonnx.model import graph
from fitonnx.model.data import Dataset
from fitonnx.prepare.opset import MAX_IR_VERSION, MAX_OPSET, opset_of, runnable

ORT = Toolchain("ONNX Runtime", weight_bits=frozenset({4, 8, 16}), activation_bits=frozenset({4, 8, 16}))

CALIBRATION_BATCH = 64
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
OPSET_WITH_INT4_INT16 = 21  # Q/DQ of int4/int16 in the default domain; below it, com.microsoft's
OPSET_PER_CHANNEL = 13  # Q/DQ's axis attribute
BITS_OF_TYPE = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.INT8: 8,
    TensorProto.UINT8: 8,
    TensorProto.INT16: 16,
    TensorProto.UINT16: 16,
}


def quant_type_name(bits: int, signed: bool) -> str:
    """QuantType's member name for an integer grid: ``QInt4``, ``QUInt8``, ..."""
    return f"Q{'Int' if signed else 'UInt'}{bits}"


@dataclass(frozen=True)
class QdqSettings:
    """How a toolchain wants its QDQ model: symmetry, shared or dedicated Q/DQ pairs, bias, op domain."""

    toolchain: Toolchain
    weight_symmetric: bool
    activation_symmetric: bool
    dedicated_pairs: bool = False
    quantize_bias: bool = True
    standard_domain_only: bool = False  # no com.microsoft Q/DQ: lift the opset to 21 for int4/int16


def ort_settings(plan: ExportPlan) -> QdqSettings:
    """ONNX Runtime's QDQ: the symmetry of the recommendation's target, onnxruntime's defaults otherwise."""
    return QdqSettings(
        toolchain=ORT,
        weight_symmetric=plan.target.weight_scheme is Scheme.SYMMETRIC,
        activation_symmetric=plan.target.activation_scheme is Scheme.SYMMETRIC,
    )


def build_overrides(
    plan: ExportPlan, *, weight_symmetric: bool, activation_symmetric: bool, per_channel: bool
) -> dict[str, list[dict[str, Any]]]:
    """TensorQuantOverrides for the plan's quantized tensors, Olive-style (quant types by name)."""
    overrides: dict[str, list[dict[str, Any]]] = {}
    for name, bits in plan.weights.items():
        entry: dict[str, Any] = {"quant_type": quant_type_name(bits, signed=True), "symmetric": weight_symmetric}
        axis = channel_axis(plan.model, name) if per_channel else None
        if axis is not None:
            entry["axis"] = axis
        overrides[name] = [entry]
    for name, bits in plan.activations.items():
        if activation_symmetric:
            overrides[name] = [{"quant_type": quant_type_name(bits, signed=True), "symmetric": True}]
        else:
            overrides[name] = [{"quant_type": quant_type_name(bits, signed=False)}]
    return overrides


def _as_quant_types(overrides: Any, source: str) -> dict[str, list[dict[str, Any]]]:
    """Olive-style overrides (quant types by name) with ``QuantType`` members in their place."""
    if not isinstance(overrides, Mapping):
        raise FitonnxError(f"expected a JSON object of tensor name → list of overrides in {source}")
    converted: dict[str, list[dict[str, Any]]] = {}
    for name, entries in overrides.items():
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
            raise FitonnxError(f"expected a list of objects for {name!r} in {source}; found {entries!r}")
        out_entries = []
        for entry in entries:
            item = dict(entry)
            if isinstance(item.get("convert"), Mapping):
                item["convert"] = dict(item["convert"])
            for holder in (item, item.get("convert")):
                if isinstance(holder, dict) and isinstance(holder.get("quant_type"), str):
                    try:
                        holder["quant_type"] = QuantType[holder["quant_type"]]
                    except KeyError:
                        raise FitonnxError(
                            f"expected a quant_type among {[q.name for q in QuantType]} for {name!r} in {source}; "
                            f"found {holder['quant_type']!r}"
                        ) from None
            out_entries.append(item)
        converted[name] = out_entries
    return converted


def to_quantizer_overrides(
    overrides: Mapping[str, Any], model: onnx.ModelProto, source: str = "the overrides"
) -> dict[str, list[dict[str, Any]]]:
    """Olive-style overrides → what ``quantize_static`` takes (QuantType members), checked by onnxruntime.

    Each tensor is checked on its own: onnxruntime 1.19's ``TensorQuantOverridesHelper.is_valid``
    returns after the first tensor of the dict it is given.
    """
    converted = _as_quant_types(overrides, source)
    inits = {t.name: t for t in model.graph.initializer}
    tensors = {v.name for v in model.graph.input} | {o for n in model.graph.node for o in n.output}
    for name, entries in converted.items():
        ok, why = TensorQuantOverridesHelper({name: entries}).is_valid(inits, tensors, QuantType.QUInt8)
        if not ok:
            raise FitonnxError(f"expected TensorQuantOverrides onnxruntime accepts in {source}; {why}")
    return converted


def load_overrides(
    path: str | Path, model: str | Path | onnx.ModelProto | None = None
) -> dict[str, list[dict[str, Any]]]:
    """An ``ort_overrides.json`` as ``quantize_static(extra_options={"TensorQuantOverrides": ...})``
    takes it: the JSON stores quant types by name (as Olive does), onnxruntime wants ``QuantType``
    members. With ``model``, onnxruntime's own checker also checks the overrides against it."""
    path = Path(path)
    try:
        overrides = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FitonnxError(f"expected a TensorQuantOverrides JSON file at {str(path)!r}: {exc}") from None
    if model is None:
        return _as_quant_types(overrides, str(path))
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_model(str(model), load_external_data=False)
    return to_quantizer_overrides(overrides, proto, str(path))


def calibration_reader(data: str | Path | Dataset, model: str | Path | onnx.ModelProto) -> CalibrationDataReader:
    """onnxruntime's ``CalibrationDataReader`` over a calibration .npz (what ``fitonnx data`` writes)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_model(str(model), load_external_data=False)
    dataset = data if isinstance(data, Dataset) else data_mod.load_npz(data)
    specs = graph.input_specs(proto)
    data_mod.check_against(dataset, specs)
    return DatasetReader(dataset, specs)


class DatasetReader(CalibrationDataReader):
    """onnxruntime's calibration reader over a fitonnx Dataset: batches along a dynamic batch axis, else one sample at a time."""

    def __init__(self, data: Dataset, specs: Mapping[str, graph.InputSpec], batch: int = CALIBRATION_BATCH) -> None:
        self._feeds = self._iterate(data, specs, batch)

    @staticmethod
    def _iterate(data: Dataset, specs: Mapping[str, graph.InputSpec], batch: int) -> Iterator[dict[str, np.ndarray]]:
        batched = all(
            data.arrays[name].ndim == spec.rank and spec.rank > 0 and spec.shape[0] is None
            for name, spec in specs.items()
        )
        n = data.num_samples
        if batched:
            for start in range(0, n, batch):
                yield {name: data.arrays[name][start : start + batch] for name in specs}
        else:
            for i in range(n):
                yield {name: value for name, value in data.sample(i, specs).items() if name in specs}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@contextmanager
def _int4_numpy_types() -> Iterator[None]:
    """Let onnxruntime 1.19's quantizer handle int4 with this onnx.

    It takes numpy types for INT4/UINT4 from ``onnx.reference.custom_element_types``, which newer
    onnx releases (1.23 here) no longer have, so its table holds None and 4-bit weights fail with
    "must be 8-bit before packing". Its own comments say those types are int8/uint8 underneath;
    the table entries are set for the call and restored after.
    """
    table = quant_utils.ONNX_TYPE_TO_NP_TYPE
    saved = {t: table.get(t) for t in (TensorProto.INT4, TensorProto.UINT4)}
    if saved[TensorProto.INT4] is None:
        table[TensorProto.INT4] = np.dtype(np.int8)
    if saved[TensorProto.UINT4] is None:
        table[TensorProto.UINT4] = np.dtype(np.uint8)
    try:
        yield
    finally:
        table.update(saved)


# For scripts that call quantize_static themselves with 4-bit overrides (the README's recipe).
int4_compat = _int4_numpy_types


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Silence the advice onnxruntime's quantizer logs on the root logger ("consider pre-processing")."""
    root = logging.getLogger()
    added = None
    if not root.handlers:  # logging.warning() would otherwise install a stderr handler for good
        added = logging.NullHandler()
        root.addHandler(added)
    previous = root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        if added is not None:
            root.removeHandler(added)


def _convert_opset(model: onnx.ModelProto, version: int, why: str) -> onnx.ModelProto:
    try:
        return version_converter.convert_version(model, version)
    except Exception as exc:
        raise UnsupportedError(
            f"expected a model onnx.version_converter can lift from opset {opset_of(model)} to {version} ({why}); "
            f"it failed: {str(exc).splitlines()[0][:200]}"
        ) from None


def restore_float_inputs(
    quantized: onnx.ModelProto, original: onnx.ModelProto, sites: list[tuple[str, int, str]]
) -> onnx.ModelProto:
    """Feed each (node, slot) its original float tensor again and drop the Q/DQ nodes nothing reads."""
    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    nodes = {n.name: n for n in out.graph.node}
    originals = {t.name: t for t in original.graph.initializer}
    present = {t.name for t in out.graph.initializer}
    for node_name, slot, tensor in sites:
        node = nodes.get(node_name)
        if node is None:
            raise InternalError(f"node {node_name!r} vanished from the quantized model")
        if node.input[slot] == tensor:
            continue
        node.input[slot] = tensor
        if tensor in originals and tensor not in present:
            out.graph.initializer.append(originals[tensor])
            present.add(tensor)
    _prune(out)
    return out


def _prune(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads, then initializers nobody reads (in place)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = graph.reads(model.graph.node) | outputs
        dead = [n for n in model.graph.node if n.op_type in QDQ_OPS and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    used = graph.reads(model.graph.node) | outputs | {v.name for v in model.graph.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def realized_bits(
    quantized: onnx.ModelProto, sites: list[tuple[str, int, str]]
) -> tuple[dict[str, int], dict[str, str]]:
    """For each tensor read at ``sites``, the bits of the DequantizeLinear feeding it (and the domain seen)."""
    producers = graph.producers(quantized.graph.node)
    inits = {t.name: t for t in quantized.graph.initializer}
    nodes = {n.name: n for n in quantized.graph.node}
    bits: dict[str, int] = {}
    domains: dict[str, str] = {}
    for node_name, slot, tensor in sites:
        dq = producers.get(nodes[node_name].input[slot])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        typed = dq.input[2] if len(dq.input) > 2 and dq.input[2] in inits else dq.input[0]
        if typed not in inits:
            continue
        width = BITS_OF_TYPE.get(inits[typed].data_type)
        if width is not None:
            bits[tensor] = width
            domains[tensor] = dq.domain
    return bits, domains


def quantize_qdq(
    plan: ExportPlan, data: Dataset, settings: QdqSettings, *, per_channel: bool
) -> tuple[onnx.ModelProto, dict[str, int], list[str]]:
    """Run ``quantize_static`` on the plan; return the QDQ model, the bits it realized, and notes."""
    notes: list[str] = []
    model = plan.model
    quantized = plan.quantized
    if not runnable(model):
        raise UnsupportedError(
            f"expected a model this onnxruntime loads (opset <= {MAX_OPSET}, IR version <= {MAX_IR_VERSION}) "
            f"for onnxruntime's quantizer; found opset {opset_of(model)}, IR version {model.ir_version}",
            hint="re-export at a lower opset; recommendation.json and the annotated model need no onnxruntime",
        )
    if not quantized:
        notes.append("the recommendation quantizes no tensor: the model is written unchanged (all float)")
        return model, {}, notes
    model, use_contrib = _lift_opset(model, quantized, settings, per_channel=per_channel, notes=notes)
    specs = graph.input_specs(model)
    data_mod.check_against(data, specs)
    call = _quantizer_call(plan, model, settings, per_channel=per_channel, use_contrib=use_contrib)
    with tempfile.TemporaryDirectory(prefix="fitonnx-export-") as tmp:
        # quantize_static is given a path: with a ModelProto, onnxruntime 1.19 re-saves it as
        # external data that this onnx refuses to load back.
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.qdq.onnx"
        onnx.save_model(model, str(src))
        _run_quantize_static(src, dst, DatasetReader(data, specs), call)
        qdq = onnx.load_model(str(dst))
    float_sites = [s for s in call.sites if s[0] in call.quantized_nodes and s[2] not in quantized]
    qdq = restore_float_inputs(qdq, model, float_sites)
    qdq, _ = add_upstream_copies(qdq, plan.activations)  # exact copies, so that onnxruntime fuses (issue 15)
    bits, domains = realized_bits(qdq, [s for s in call.sites if s[2] in quantized])
    notes += _check_realized(quantized, bits, domains, settings)
    return qdq, bits, notes


def _lift_opset(
    model: onnx.ModelProto, quantized: Mapping[str, int], settings: QdqSettings, *, per_channel: bool, notes: list[str]
) -> tuple[onnx.ModelProto, bool]:
    """Convert the model to the opset its Q/DQ needs (noting it); whether com.microsoft Q/DQ must stand in."""
    wide = sorted({b for b in quantized.values() if b in (4, 16)})
    if wide and settings.standard_domain_only and opset_of(model) < OPSET_WITH_INT4_INT16:
        notes.append(
            f"opset {opset_of(model)} → {OPSET_WITH_INT4_INT16} (onnx.version_converter): {wide}-bit Q/DQ needs it"
        )
        model = _convert_opset(model, OPSET_WITH_INT4_INT16, f"{wide}-bit Q/DQ in the default domain")
    elif per_channel and opset_of(model) < OPSET_PER_CHANNEL:
        notes.append(f"opset {opset_of(model)} → {OPSET_PER_CHANNEL} (onnx.version_converter) for per-channel Q/DQ")
        model = _convert_opset(model, OPSET_PER_CHANNEL, "per-channel Q/DQ")
    use_contrib = bool(wide) and opset_of(model) < OPSET_WITH_INT4_INT16
    if use_contrib:
        notes.append(
            f"{wide}-bit Q/DQ at opset {opset_of(model)} use onnxruntime's com.microsoft QuantizeLinear/"
            "DequantizeLinear (UseQDQContribOps)"
        )
    return model, use_contrib


@dataclass(frozen=True)
class _QuantizerCall:
    """What ``quantize_static`` is told: which ops and nodes to quantize, and its extra options."""

    sites: list[tuple[str, int, str]]
    quantized_nodes: frozenset[str]
    op_types: list[str]
    nodes_to_exclude: list[str]
    extra_options: dict[str, Any]
    per_channel: bool
    activation_symmetric: bool


def _quantizer_call(
    plan: ExportPlan, model: onnx.ModelProto, settings: QdqSettings, *, per_channel: bool, use_contrib: bool
) -> _QuantizerCall:
    """Limit ``quantize_static`` to the nodes that read a recommended tensor, with the plan's overrides."""
    quantized = plan.quantized
    overrides_json = build_overrides(
        plan,
        weight_symmetric=settings.weight_symmetric,
        activation_symmetric=settings.activation_symmetric,
        per_channel=per_channel,
    )
    overrides = to_quantizer_overrides(overrides_json, model)
    sites = quantizable_sites(model)
    quantized_nodes = {node for node, _, tensor in sites if tensor in quantized}
    candidates = {n.name for n in model.graph.node if n.op_type in graph.WEIGHT_INPUTS and n.op_type in QDQRegistry}
    op_types = sorted({n.op_type for n in model.graph.node if n.name in quantized_nodes} & set(QDQRegistry))
    if not op_types:
        raise UnsupportedError(
            f"expected the recommended tensors to feed ops onnxruntime quantizes ({sorted(set(QDQRegistry) & set(graph.WEIGHT_INPUTS))}); "
            "found none"
        )
    # onnxruntime 1.19's quantizer sets the range of every Softmax output (adjust_tensor_ranges) and
    # fails on one it did not calibrate, i.e. whenever Softmax is not an op type to quantize: any
    # classifier ending in Softmax. Calibrating Softmax while excluding its nodes avoids that and
    # puts no Q/DQ there.
    softmax_nodes = {n.name for n in model.graph.node if n.op_type == "Softmax"}
    if softmax_nodes:
        op_types = sorted({*op_types, "Softmax"})
    extra_options: dict[str, Any] = {
        "TensorQuantOverrides": overrides,
        "OpTypesToExcludeOutputQuantization": op_types,
        "ActivationSymmetric": settings.activation_symmetric,
        "WeightSymmetric": settings.weight_symmetric,
        "DedicatedQDQPair": settings.dedicated_pairs,
        "QuantizeBias": settings.quantize_bias,
        "UseQDQContribOps": use_contrib,
    }
    return _QuantizerCall(
        sites=sites,
        quantized_nodes=frozenset(quantized_nodes),
        op_types=op_types,
        nodes_to_exclude=sorted((candidates - quantized_nodes) | softmax_nodes),
        extra_options=extra_options,
        per_channel=per_channel,
        activation_symmetric=settings.activation_symmetric,
    )


def _run_quantize_static(src: Path, dst: Path, reader: CalibrationDataReader, call: _QuantizerCall) -> None:
    """``quantize_static`` from ``src`` to ``dst``; its failures become fitonnx errors."""
    try:
        with _int4_numpy_types(), _quiet_root_logger():
            quantize_static(
                str(src),
                str(dst),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=call.op_types,
                per_channel=call.per_channel,
                activation_type=QuantType.QInt8 if call.activation_symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=call.nodes_to_exclude,
                extra_options=call.extra_options,
            )
    except (DataError, FitonnxError):
        raise
    except Exception as exc:
        raise UnsupportedError(
            f"onnxruntime.quantization.quantize_static failed on this model: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}"
        ) from exc


def _check_realized(
    quantized: Mapping[str, int], bits: Mapping[str, int], domains: Mapping[str, str], settings: QdqSettings
) -> list[str]:
    """Notes for tensors onnxruntime left in float; an error where it chose other bits or the wrong domain."""
    notes = []
    for name, want in quantized.items():
        if name not in bits:
            notes.append(f"{name!r} was not quantized by onnxruntime (it reaches its op through another op)")
        elif bits[name] != want:
            raise InternalError(f"onnxruntime quantized {name!r} to {bits[name]} bits; the plan said {want}")
    if settings.standard_domain_only and any(d not in ("", "ai.onnx") for d in domains.values()):
        raise InternalError("the QDQ model for a standard-domain toolchain has com.microsoft Q/DQ nodes")
    return notes


def write_overrides(
    model: onnx.ModelProto, rec: Recommendation, out: Path, *, data: Dataset | None = None, per_channel: bool = False
) -> ExportResult:
    """Write the recommendation as Olive-style TensorQuantOverrides JSON (no data needed)."""
    del data  # the overrides carry types only; ranges come from calibration when they are used
    p = plan_export(model, rec, ORT)
    s = ort_settings(p)
    overrides = build_overrides(
        p, weight_symmetric=s.weight_symmetric, activation_symmetric=s.activation_symmetric, per_channel=per_channel
    )
    to_quantizer_overrides(overrides, p.model)  # what we write must load in onnxruntime
    text = json_text(overrides)
    write_atomic(out, lambda f: f.write(text))
    notes = []
    if p.float_tensors:
        notes.append(
            f"{len(p.float_tensors)} quantizable tensors stay in float: TensorQuantOverrides cannot say so; "
            "exclude the nodes that read them (nodes_to_exclude) or restrict op_types_to_quantize"
        )
    return ExportResult("overrides", out, dict(p.quantized), p.float_tensors, tuple(notes))
