"""Weights kept as external data: the folders their files live in, read one tensor at a time.

A model whose external data is large (``KEEP_EXTERNAL_BYTES``) is never materialised in one
protobuf: ``load`` keeps its initializers as external references (relative locations, checked to
stay inside the model's folder) and registers the folder here. Every copy of the model — the
prepared twin, the probe, the gradient model, the batched model — then refers to the same files,
and a protobuf of any of them stays small. Sessions find the files through ``session_folder``
(onnxruntime's external-initializer folder setting, or absolute locations for onnxruntime < 1.20,
which has no such setting); Python reads one tensor at a time with ``tensor_array``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import Message
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from fitonnx.errors import InternalError

# Models whose external data exceeds this keep it external (smaller ones are read in, as before).
KEEP_EXTERNAL_BYTES = 1 << 30
ORT_VERSION = ort.__version__
_FOLDERS: list[Path] = []


def keep(folder: Path) -> None:
    """Register ``folder`` as holding the external data of a model kept external."""
    root = folder.resolve()
    if root not in _FOLDERS:
        _FOLDERS.append(root)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of ``model`` (subgraphs included) whose data is in an external file (not ``MEMORY``)."""
    return [
        t
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t) and _location(t) != MEMORY
    ]


# The location of initializers handed to onnxruntime as values, not serialized (``detached``).
MEMORY = "fitonnx-memory"
DETACH_BYTES = 1 << 16  # smaller initializers stay in the protobuf
_DETACHABLE = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32)


def _copy_fields(dst: Message, src: Message, skip: str) -> None:
    """Copy every set field of ``src`` except ``skip`` into ``dst`` (a message of the same type)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def detached(model: onnx.ModelProto, min_bytes: int = DETACH_BYTES) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` whose main-graph initializers of at least ``min_bytes`` (held in the protobuf)
    are references to ``MEMORY``, and their values by name, for ``runtime.make_session(initializers=)``:
    neither the copy nor the session's protobuf carries the weights (``model`` is not changed)."""
    slim = onnx.ModelProto()
    _copy_fields(slim, model, "graph")
    _copy_fields(slim.graph, model.graph, "initializer")
    values: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type in _DETACHABLE else None
        size = int(np.prod(t.dims, dtype=np.int64)) * (dtype.itemsize if dtype is not None else 0)
        if dtype is None or size < min_bytes or not t.HasField("raw_data"):
            slim.graph.initializer.append(t)
            continue
        values[t.name] = np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
        ref = slim.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        ref.data_location = TensorProto.EXTERNAL
        for key, value in (("location", MEMORY), ("offset", "0"), ("length", str(size))):
            ref.external_data.add(key=key, value=value)
    return slim, values


def _location(tensor: onnx.TensorProto) -> str:
    return next(e.value for e in tensor.external_data if e.key == "location")


def folder_of(locations: Iterable[str]) -> Path:
    """The registered folder holding every one of ``locations`` (a model's files sit in one folder)."""
    wanted = set(locations)
    for folder in reversed(_FOLDERS):
        if all((folder / loc).is_file() for loc in wanted):
            return folder
    raise InternalError(f"external data {sorted(wanted)[:3]} is in no folder loaded by fitonnx")


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of ``tensor``, read from its external file when it has one (one tensor in memory)."""
    if not external_data_helper.uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = external_data_helper.ExternalDataInfo(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    path = folder_of([info.location]) / info.location
    values = np.fromfile(path, dtype=dtype, count=count, offset=int(info.offset or 0))
    return values.reshape(tuple(tensor.dims))


def session_folder(model_bytes: bytes) -> tuple[bytes, str | None]:
    """``model_bytes`` as onnxruntime should load them, and the folder of their external data
    (None for a model with none). For onnxruntime < 1.20 the locations are made absolute instead."""
    if b"location" not in model_bytes:
        return model_bytes, None
    model = onnx.ModelProto.FromString(model_bytes)
    tensors = external_tensors(model)
    if not tensors:
        return model_bytes, None
    folder = folder_of(_location(t) for t in tensors)
    if _ort_version() >= (1, 20):
        return model_bytes, str(folder)
    for t in tensors:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = os.path.join(str(folder), entry.value)
    return model.SerializeToString(), None


def supported() -> bool:
    """Whether this onnxruntime runs models whose weights stay external (from bytes: 1.20 and later;
    1.19's optimizer needs the model's own path for external initializers)."""
    return _ort_version() >= (1, 20)


def _ort_version() -> tuple[int, int]:
    major, minor = ORT_VERSION.split(".")[:2]
    return int(major), int(minor)


class LazyArrays(Mapping[str, np.ndarray]):
    """Initializer values by name, each read (``tensor_array``) the first time it is looked up:
    a pass that needs a few weights does not hold them all."""

    def __init__(self, tensors: Iterable[onnx.TensorProto]) -> None:
        self._tensors = {t.name: t for t in tensors}
        self._values: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._values:
            self._values[name] = tensor_array(self._tensors[name])
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
