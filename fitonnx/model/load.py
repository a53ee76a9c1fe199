"""Load an ONNX model from an untrusted path, safely.

External data is resolved only inside the model's own folder: a tensor whose ``location``
points elsewhere (absolute path, ``..``, symlink out) is rejected before any byte is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import external_data_helper

from fitonnx.errors import ModelError
from fitonnx.model import external


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX model and where it came from (``path`` is None for in-memory models)."""

    proto: onnx.ModelProto
    path: Path | None

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else (self.proto.graph.name or "model")


def _external_info(tensor: onnx.TensorProto) -> external_data_helper.ExternalDataInfo:
    """The external-data fields of ``tensor``; malformed ones (``length: abc``) refused in one line."""
    try:
        info = external_data_helper.ExternalDataInfo(tensor)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"tensor {_text(tensor.name)!r} has malformed external-data fields ({exc})") from None
    for key in ("offset", "length"):
        value = getattr(info, key, None)
        if value is not None and int(value) < 0:
            raise ModelError(
                f"tensor {_text(tensor.name)!r}: expected a non-negative external-data {key}; found {value}"
            )
    return info


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _graphs(sub)


def _check_names(model: onnx.ModelProto, path: Path | None) -> None:
    """Every name must be UTF-8: protobuf hands back ``bytes`` for one that is not."""
    for graph in _graphs(model.graph):
        values = [*graph.input, *graph.output, *graph.value_info]
        named = [("graph", graph.name), *(("tensor", t.name) for t in graph.initializer)]
        named += [("value", v.name) for v in values]
        for node in graph.node:
            named += [("node", node.name), ("op type", node.op_type), ("domain", node.domain)]
            named += [("tensor", t) for t in [*node.input, *node.output]]
            named += [("attribute", a.name) for a in node.attribute]
        for kind, name in named:
            if isinstance(name, bytes):
                raise ModelError(
                    f"expected UTF-8 names in {_describe(path)}; the {kind} name {_text(name)!r} is not valid UTF-8",
                    hint="rename it (onnx.helper / onnx-modifier) and save the model again",
                )


# Attributes onnxruntime trusts: a zero, negative or huge value crashes it (SIGSEGV/SIGFPE) instead of failing.
_POSITIVE = {"kernel_shape", "strides", "dilations", "group"}
_NON_NEGATIVE = {"pads", "output_padding"}
_WINDOW_MAX = 2**20  # far beyond any real kernel, stride or pad; 2**31 - 1 overflows onnxruntime's size arithmetic
_WINDOW_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool", "MaxUnpool"}


def _check_window_attributes(model: onnx.ModelProto) -> None:
    """Refuse kernel/stride/dilation/pad/group values that make onnxruntime crash rather than fail."""
    for graph in _graphs(model.graph):
        for i, node in enumerate(graph.node):
            if node.op_type not in _WINDOW_OPS or node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                values = list(attr.ints) if attr.type == onnx.AttributeProto.INTS else [attr.i]
                if attr.name not in _POSITIVE | _NON_NEGATIVE:
                    continue
                low = 1 if attr.name in _POSITIVE else 0
                if any(not low <= v <= _WINDOW_MAX for v in values):
                    bound = f"between {low} and {_WINDOW_MAX}"
                    raise ModelError(
                        f"node {node.name or f'{node.op_type}_{i}'!r} ({node.op_type}): expected {attr.name} "
                        f"{bound}; found {values if attr.type == onnx.AttributeProto.INTS else values[0]}"
                    )


def _check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = _external_info(tensor)
        location = info.location
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise ModelError(
                f"tensor {tensor.name!r} stores its data at {location!r}, outside the model's folder",
                hint="external data must live next to the model file",
            )
        if not target.is_file():
            raise ModelError(f"tensor {tensor.name!r} expects external data file {location!r}; none found in {root}")


def load_model(source: str | os.PathLike[str] | onnx.ModelProto) -> LoadedModel:
    """Read an ONNX model (a path or an in-memory proto) and check it is well formed.

    The returned proto is a private copy: nothing fitonnx does can change the caller's model.
    """
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        path = None
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"expected an ONNX model file at {str(path)!r}; no such file")
        try:
            proto = onnx.load_model(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish variants
            raise ModelError(
                f"expected an ONNX model in {str(path)!r}; could not parse it ({type(exc).__name__})"
            ) from None
        _check_external_locations(proto, path.parent)
        size = _external_bytes(proto, path)
        if size > external.KEEP_EXTERNAL_BYTES and external.supported():
            external.keep(path.parent)  # weights stay in their files (model.external)
        elif size + proto.ByteSize() > PROTOBUF_LIMIT:
            raise ModelError(
                f"expected a model under 2 GiB for onnxruntime {external.ORT_VERSION}; {path.name} holds "
                f"{(size + proto.ByteSize()) / 2**30:.2f} GiB with its external data",
                hint="models over 2 GiB keep their weights external with onnxruntime >= 1.20 (pip install -U onnxruntime)",
            )
        else:
            try:
                external_data_helper.load_external_data_for_model(proto, str(path.parent))
            except Exception as exc:
                raise ModelError(f"could not read the external data of {str(path)!r}: {exc}") from None
    if len(proto.graph.node) == 0:
        raise ModelError(f"expected an ONNX model with a graph; {_describe(path)} has no nodes")
    _check_names(proto, path)
    if len(proto.graph.output) == 0:
        raise ModelError(f"expected an ONNX model with at least one graph output; {_describe(path)} has none")
    _check_window_attributes(proto)
    try:
        # A model whose weights stay external is checked from its file (the checker finds them there).
        kept = path is not None and bool(external.external_tensors(proto))
        onnx.checker.check_model(str(path) if kept else proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelError(f"{_describe(path)} is not a valid ONNX model: {first}") from None
    return LoadedModel(proto=proto, path=path)


# One protobuf cannot exceed 2 GiB: the limit for a model read into memory.
PROTOBUF_LIMIT = 2**31 - 1


def _external_bytes(proto: onnx.ModelProto, path: Path) -> int:
    """How many bytes of ``proto``'s tensors live in external files."""
    external = 0
    for tensor in external_data_helper._get_all_tensors(proto):  # onnx's own (private) walker
        if external_data_helper.uses_external_data(tensor):
            info = _external_info(tensor)
            external += int(info.length or (path.parent / info.location).stat().st_size)
    return external


def _describe(path: Path | None) -> str:
    return repr(str(path)) if path is not None else "the in-memory model"
