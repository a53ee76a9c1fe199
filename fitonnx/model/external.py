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
from onnx import external_data_helper, helper, numpy_helper

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
    """Every tensor of ``model`` (subgraphs included) whose data is external."""
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


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
