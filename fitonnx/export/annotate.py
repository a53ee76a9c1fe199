"""The annotated model: the original graph, unchanged in what it computes, carrying the recommendation.

Three places readers look, all metadata that no runtime executes:

- ``ModelProto.metadata_props``: ``fitonnx.recommendation`` (the whole recommendation.json, compact),
  plus ``fitonnx.target``, ``fitonnx.fit`` and ``fitonnx.weight_bytes`` for a quick look;
- ``NodeProto.metadata_props`` (IR version ≥ 10 only, where the field exists) on every quantizable
  node that reads a recommended tensor: ``fitonnx.weight_bits``, ``fitonnx.activation_bits`` and
  ``fitonnx.fit`` as JSON objects keyed by tensor name (and ``fitonnx.formats``, the format of each
  tensor, for a format recommendation, which also puts the whole map under ``fitonnx.formats`` in
  the model's metadata);
- ``GraphProto.quantization_annotation``: one ``TensorAnnotation`` per tensor with the key
  ``finn_datatype`` (``INT4``, ``UINT8``, ``FLOAT16``), as QONNX/FINN read it.

The model's IR version and opsets are left as they are, so it loads wherever the original did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import onnx
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from fitonnx.allocate.recommendation import Recommendation
from fitonnx.allocate.targets import get_target
from fitonnx.errors import FitonnxError
from fitonnx.export.common import ExportResult, save_model
from fitonnx.files.atomic import write_atomic
from fitonnx.formats import parse_format
from fitonnx.model import graph
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind

METADATA_KEY = "fitonnx.recommendation"
FINN_KEY = "finn_datatype"
FORMATS_KEY = "fitonnx.formats"  # a format recommendation's tensor → format name (``int8/ch``, ``fp8e4m3``)
NODE_METADATA_IR_VERSION = 10
SUFFIX = ".annotated.onnx"


def _set_props(props: RepeatedCompositeFieldContainer[onnx.StringStringEntryProto], values: Mapping[str, str]) -> None:
    """Replace the entries named in ``values`` (a re-annotated model keeps one of each)."""
    kept = [(p.key, p.value) for p in props if p.key not in values]
    del props[:]
    for key, value in [*kept, *values.items()]:
        props.add(key=key, value=value)


def _graph_tensors(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {t.name for t in g.initializer} | {v.name for v in g.input}
    return names | {o for n in g.node for o in n.output if o}


def annotate(model: onnx.ModelProto, rec: Recommendation) -> onnx.ModelProto:
    """A copy of ``model`` annotated with ``rec``; ``model`` is not modified."""
    target = get_target(rec.target)
    known = _graph_tensors(model)
    unknown = sorted(n for n in [*rec.weight_bits, *rec.activation_bits] if n not in known)
    if unknown:
        raise FitonnxError(
            f"expected the recommendation's tensors in the model; found {len(unknown)} it does not have: "
            f"{', '.join(map(repr, unknown[:5]))}",
            hint=f"was the recommendation made for {rec.model!r}?",
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _set_props(
        out.metadata_props,
        {
            METADATA_KEY: json.dumps(rec.to_dict(), separators=(",", ":")),
            "fitonnx.target": rec.target,
            "fitonnx.fit": repr(rec.fit),
            "fitonnx.weight_bytes": str(rec.weight_bytes),
            **({FORMATS_KEY: json.dumps({**rec.weight_formats, **rec.activation_formats})} if rec.by_format else {}),
        },
    )

    bits: dict[str, tuple[Kind, int]] = {n: (Kind.WEIGHT, b) for n, b in rec.weight_bits.items()}
    bits |= {n: (Kind.ACTIVATION, b) for n, b in rec.activation_bits.items()}
    annotations = [a for a in out.graph.quantization_annotation if a.tensor_name not in bits]
    for a in out.graph.quantization_annotation:
        if a.tensor_name in bits:  # keep what others stored there, drop only our key
            extra = [(e.key, e.value) for e in a.quant_parameter_tensor_names if e.key != FINN_KEY]
            if extra:
                keep = onnx.TensorAnnotation(tensor_name=a.tensor_name)
                for key, value in extra:
                    keep.quant_parameter_tensor_names.add(key=key, value=value)
                annotations.append(keep)
    formats = {**rec.weight_formats, **rec.activation_formats}
    for name, (kind, b) in bits.items():
        if name in formats and not parse_format(formats[name]).is_int:
            continue  # FINN has no FP8/FP4/FP16 DataType; the format is in the metadata
        lo = rec.ranges.get(name, (-1.0, 1.0))[0]
        ann = next((a for a in annotations if a.tensor_name == name), None)
        if ann is None:
            ann = onnx.TensorAnnotation(tensor_name=name)
            annotations.append(ann)
        ann.quant_parameter_tensor_names.add(key=FINN_KEY, value=target.finn_datatype(kind, b, lo))
    del out.graph.quantization_annotation[:]
    out.graph.quantization_annotation.extend(annotations)

    if out.ir_version >= NODE_METADATA_IR_VERSION:
        _annotate_nodes(out, rec)
    return out


def _annotate_nodes(model: onnx.ModelProto, rec: Recommendation) -> None:
    """Per quantizable node: the bits and FIT of the recommended tensors it reads."""
    keys = {Kind.WEIGHT: "fitonnx.weight_bits", Kind.ACTIVATION: "fitonnx.activation_bits"}
    per_node: dict[str, dict[str, dict[str, object]]] = {}
    formats = {**rec.weight_formats, **rec.activation_formats}
    for t in graph.find_quantizable(model):
        chosen = rec.weight_bits if t.kind is Kind.WEIGHT else rec.activation_bits
        if t.name not in chosen:
            continue
        b = chosen[t.name]
        fmt = formats.get(t.name)
        fit = rec.fit_per_tensor.get(t.name, {}).get(b) if fmt is None else rec.fit_per_format.get(t.name, {}).get(fmt)
        for node in t.nodes:
            entry = per_node.setdefault(node, {key: {} for key in [*keys.values(), "fitonnx.fit"]})
            entry[keys[t.kind]][t.name] = b
            if fmt is not None:
                entry.setdefault("fitonnx.formats", {})[t.name] = fmt
            if fit is not None:
                entry["fitonnx.fit"][t.name] = fit
    for i, node in enumerate(model.graph.node):
        entry = per_node.get(graph.node_name(node, i))
        if entry is not None:
            _set_props(node.metadata_props, {key: json.dumps(value) for key, value in entry.items()})


def annotated_path(out_dir: str | os.PathLike[str], model_name: str) -> Path:
    return Path(out_dir) / f"{Path(model_name).name.removesuffix('.onnx')}{SUFFIX}"


def write_annotated(
    model: onnx.ModelProto,
    rec: Recommendation,
    out_dir: str | os.PathLike[str],
    *,
    source: Path | None = None,
) -> Path:
    """Write ``<model>.annotated.onnx`` into ``out_dir`` atomically, never over ``source`` (the input)."""
    path = annotated_path(out_dir, rec.model if source is None else source.name)
    if source is not None and path.resolve() == source.resolve():
        raise FitonnxError(
            f"expected an output other than the input model; found {str(path)!r}, which is the input",
            hint="choose another --out folder",
        )
    annotated = annotate(model, rec)
    if annotated.ByteSize() >= 2**31:
        raise FitonnxError(
            f"expected a model under 2 GB for {str(path)!r}; found {annotated.ByteSize()} bytes",
            hint="fitonnx does not write external-data models yet",
        )
    write_atomic(path, annotated.SerializeToString())
    return path


def write_model(
    model: onnx.ModelProto, rec: Recommendation, out: Path, *, data: Dataset | None = None, per_channel: bool = False
) -> ExportResult:
    """The ``annotated`` export format: the annotated model written atomically to ``out``."""
    del data, per_channel
    save_model(annotate(model, rec), out)
    return ExportResult("annotated", out, {**rec.weight_bits, **rec.activation_bits}, ())
