"""Calibration data: loading (.npz without pickle, ONNX model-zoo test_data_set dirs) and checks.

A ``Dataset`` holds arrays keyed by the model's input names with samples stacked on axis 0, and
optional ``labels``. ``check_against`` verifies names, dtypes, shapes, finiteness and label range
against the model before any expensive work starts.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from fitonnx.errors import DataError
from fitonnx.model.graph import InputSpec

LABELS_KEY = "labels"
SIDECAR_SUFFIXES = (".calib.npz",)


@dataclass(frozen=True)
class Dataset:
    """Model inputs stacked on axis 0 (``arrays``), optional ``labels``, and where they came from."""

    arrays: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "<memory>"
    synthetic: bool = field(default=False)

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def sample(self, index: int, specs: Mapping[str, InputSpec]) -> dict[str, np.ndarray]:
        """The feed for one sample: a batch of one, or the whole slice when the model has no batch axis."""
        feed: dict[str, np.ndarray] = {}
        for name, spec in specs.items():
            array = self.arrays[name]
            if array.ndim == spec.rank + 1:
                feed[name] = np.asarray(array[index])  # a 0-d array, not a numpy scalar, for scalar inputs
            else:
                feed[name] = array[index : index + 1]
        return feed

    def whole_samples(self, specs: Mapping[str, InputSpec]) -> bool:
        """True when samples are fed whole (arrays have one more axis than the model inputs)."""
        return all(self.arrays[name].ndim == spec.rank + 1 for name, spec in specs.items())

    def sample_labels(self, index: int, specs: Mapping[str, InputSpec]) -> np.ndarray | None:
        """Labels of one sample, shaped like the sample's feed (with or without a batch axis of one)."""
        if self.labels is None:
            return None
        return self.labels[index] if self.whole_samples(specs) else self.labels[index : index + 1]

    def head(self, n: int) -> Dataset:
        """The first ``n`` samples."""
        arrays = {k: v[:n] for k, v in self.arrays.items()}
        labels = None if self.labels is None else self.labels[:n]
        return Dataset(arrays=arrays, labels=labels, source=self.source, synthetic=self.synthetic)

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)


def load_npz(path: str | Path) -> Dataset:
    """Read an .npz of input arrays (+ optional ``labels``) with pickle disabled."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a calibration file at {str(path)!r}; no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"{str(path)!r} holds object arrays, which need pickle to load; expected plain numeric arrays"
            ) from None
        raise DataError(f"expected an .npz archive at {str(path)!r}: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"expected an .npz archive at {str(path)!r}; could not read it ({exc})") from None
    labels = arrays.pop(LABELS_KEY, None)
    if not arrays:
        raise DataError(f"expected input arrays in {str(path)!r}; found only {sorted([LABELS_KEY])}")
    return Dataset(arrays=arrays, labels=labels, source=str(path))


_PB_NAME = re.compile(r"(input|output)_(\d+)\.pb$")


def load_test_data_dir(path: str | Path, input_names: list[str]) -> Dataset:
    """Read a model-zoo layout: ``path/test_data_set_*/input_<k>.pb``, one sample per set.

    ``input_<k>`` is the model's k-th (non-initializer) input, as the model zoo orders them.
    Each .pb holds a TensorProto parsed by protobuf, never unpickled.
    """
    path = Path(path)
    sets = sorted(p for p in path.glob("test_data_set_*") if p.is_dir())
    if not sets:
        raise DataError(f"expected test_data_set_* folders in {str(path)!r}; found none")
    per_input: dict[str, list[np.ndarray]] = {name: [] for name in input_names}
    for folder in sets:
        files = sorted(folder.glob("input_*.pb"), key=lambda p: int(_PB_NAME.search(p.name).group(2)))
        if len(files) != len(input_names):
            raise DataError(
                f"expected {len(input_names)} input_*.pb files in {str(folder)!r} "
                f"(one per model input); found {len(files)}"
            )
        for name, file in zip(input_names, files, strict=True):
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(file.read_bytes())
            except Exception:
                raise DataError(f"expected a serialized TensorProto in {str(file)!r}; could not parse it") from None
            per_input[name].append(numpy_helper.to_array(tensor))
    arrays: dict[str, np.ndarray] = {}
    for name, items in per_input.items():
        shapes = {a.shape for a in items}
        if len(shapes) > 1:
            raise DataError(f"expected equal shapes for input {name!r} across test sets; found {sorted(shapes)}")
        arrays[name] = np.concatenate(items, axis=0)
    return Dataset(arrays=arrays, source=str(path))


def load_data(path: str | Path, input_names: list[str]) -> Dataset:
    """Load calibration data from an .npz file or a model-zoo test-data folder."""
    path = Path(path)
    if path.is_dir():
        return load_test_data_dir(path, input_names)
    return load_npz(path)


def sidecar_for(model_path: Path) -> Path | None:
    """The bundled calibration file next to a model (``<stem>.calib.npz``), if there is one."""
    for suffix in SIDECAR_SUFFIXES:
        candidate = model_path.with_name(model_path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def random_data(specs: Mapping[str, InputSpec], n: int, seed: int) -> Dataset:
    """Standard-normal (float) or small-integer inputs for a smoke test; says little about sensitivity."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        shape = (n, *[1 if d is None else d for d in spec.shape[1:]]) if spec.shape else (n,)
        if np.issubdtype(spec.dtype, np.floating):
            arrays[name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            arrays[name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            arrays[name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return Dataset(arrays=arrays, source=f"random({n}, seed={seed})", synthetic=True)


def check_against(data: Dataset, specs: Mapping[str, InputSpec]) -> None:
    """Raise ``DataError`` unless every model input is present with the right dtype, shape and values."""
    missing = [name for name in specs if name not in data.arrays]
    if missing:
        raise DataError(
            f"expected arrays for model inputs {sorted(specs)}; {data.source} has {sorted(data.arrays)} "
            f"(missing {missing})",
            hint="name each .npz key after a model input, plus an optional 'labels'",
        )
    extra = sorted(set(data.arrays) - set(specs))
    if extra:
        warnings.warn(f"ignoring arrays {extra} in {data.source}: the model has no such inputs", stacklevel=2)
    counts = {name: data.arrays[name].shape[0] if data.arrays[name].ndim else 0 for name in specs}
    if len(set(counts.values())) != 1:
        raise DataError(f"expected the same number of samples on axis 0 of every input; found {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise DataError(f"expected at least one sample in {data.source}; found 0")
    for name, spec in specs.items():
        _check_array(name, data.arrays[name], spec, data.source)
    if data.labels is not None:
        if data.labels.shape[:1] != (n,):
            raise DataError(
                f"expected 'labels' with {n} entries on axis 0 (one per sample); found shape {list(data.labels.shape)}"
            )
        if np.issubdtype(data.labels.dtype, np.floating) and not np.all(np.isfinite(data.labels)):
            raise DataError(f"expected finite labels in {data.source}; found NaN or infinity")


def _check_array(name: str, array: np.ndarray, spec: InputSpec, source: str) -> None:
    if array.dtype != spec.dtype:
        raise DataError(
            f"expected dtype {spec.dtype} for input {name!r}; {source} has {array.dtype}",
            hint=f"convert with array.astype(np.{spec.dtype})",
        )
    if array.ndim == spec.rank + 1:
        sample_shape = array.shape[1:]
    elif array.ndim == spec.rank:
        sample_shape = (1, *array.shape[1:])
    else:
        raise DataError(
            f"expected input {name!r} with {spec.rank} axes (samples on axis 0), shape like "
            f"{spec.display()}; {source} has shape {list(array.shape)}"
        )
    if not spec.accepts(sample_shape):
        raise DataError(
            f"expected input {name!r} of shape {spec.display()} per sample; {source} gives samples of "
            f"shape {list(sample_shape)}"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise DataError(f"expected finite values in input {name!r}; {source} has {bad} NaN/infinite values")
