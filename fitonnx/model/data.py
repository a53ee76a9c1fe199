"""Calibration data: loading (.npz without pickle, ONNX model-zoo test_data_set dirs) and checks.

A ``Dataset`` holds arrays keyed by the model's input names with samples stacked on axis 0, and
optional ``labels``. ``check_against`` verifies names, dtypes, shapes, finiteness and label range
against the model before any expensive work starts.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fitonnx.errors import DataError
from fitonnx.files.readers import LazyNpz, Limit, RandomSamples, read_tensor_pb
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


def load_npz(path: str | Path, max_samples: int | None = None, limit: Limit | None = None) -> Dataset:
    """Read an .npz of input arrays (+ optional ``labels``) without pickle, within ``limit``.

    Members are read lazily (``fitonnx.files.LazyNpz``): with ``max_samples``, only the first
    ``max_samples + 1`` samples of each array are read (the one extra tells that more exist), so
    memory does not grow with the file.
    """
    rows = None if max_samples is None else max_samples + 1
    with LazyNpz(path, limit) as npz:
        arrays = {
            key: npz.read(key) if rows is None or not npz.members[key].shape else npz.read_rows(key, 0, rows)
            for key in npz.members
        }
    labels = arrays.pop(LABELS_KEY, None)
    if not arrays:
        raise DataError(f"expected input arrays in {str(path)!r}; found only {sorted([LABELS_KEY])}")
    return Dataset(arrays=arrays, labels=labels, source=str(path))


_PB_NAME = re.compile(r"input_(\d+)\.pb$")


def _input_files(folder: Path, count: int) -> list[Path]:
    """``input_<k>.pb`` of one test set, in order; any other ``input_*.pb`` is refused."""
    files = sorted(folder.glob("input_*.pb"))
    odd = [p.name for p in files if not _PB_NAME.fullmatch(p.name)]
    if odd:
        raise DataError(f"expected files named input_<k>.pb in {str(folder)!r}; found {odd}")
    files.sort(key=lambda p: int(_PB_NAME.fullmatch(p.name).group(1)))  # type: ignore[union-attr]
    if len(files) != count:
        raise DataError(
            f"expected {count} input_*.pb files in {str(folder)!r} (one per model input); found {len(files)}"
        )
    return files


def load_test_data_dir(
    path: str | Path, input_names: list[str], max_samples: int | None = None, limit: Limit | None = None
) -> Dataset:
    """Read a model-zoo layout: ``path/test_data_set_*/input_<k>.pb``, one sample per set.

    ``input_<k>`` is the model's k-th (non-initializer) input, as the model zoo orders them.
    Each .pb is one bounded ``TensorProto`` read (``fitonnx.files.read_tensor_pb``: regular files
    only, external data inside the .pb's own folder), one set at a time, at most ``max_samples + 1``.
    """
    path = Path(path)
    sets = sorted(p for p in path.glob("test_data_set_*") if p.is_dir())
    if not sets:
        raise DataError(f"expected test_data_set_* folders in {str(path)!r}; found none")
    if max_samples is not None:
        sets = sets[: max_samples + 1]
    per_input: dict[str, list[np.ndarray]] = {name: [] for name in input_names}
    for folder in sets:
        for name, file in zip(input_names, _input_files(folder, len(input_names)), strict=True):
            per_input[name].append(read_tensor_pb(file, limit, min_rank=1))
    arrays: dict[str, np.ndarray] = {}
    for name, items in per_input.items():
        shapes = {a.shape for a in items}
        if len(shapes) > 1:
            raise DataError(f"expected equal shapes for input {name!r} across test sets; found {sorted(shapes)}")
        arrays[name] = np.concatenate(items, axis=0)
    return Dataset(arrays=arrays, source=str(path))


def load_data(path: str | Path, input_names: list[str], max_samples: int | None = None) -> Dataset:
    """Load calibration data from an .npz file or a model-zoo test-data folder."""
    path = Path(path)
    if path.is_dir():
        return load_test_data_dir(path, input_names, max_samples)
    return load_npz(path, max_samples)


def sidecar_for(model_path: Path) -> Path | None:
    """The bundled calibration file next to a model (``<stem>.calib.npz``), if there is one."""
    for suffix in SIDECAR_SUFFIXES:
        candidate = model_path.with_name(model_path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def random_data(specs: Mapping[str, InputSpec], n: int, seed: int, max_samples: int | None = None) -> Dataset:
    """Standard-normal (float) or small-integer inputs for a smoke test; says little about sensitivity.

    Samples are made as needed (``fitonnx.files.RandomSamples``): with ``max_samples`` only the
    first ``max_samples + 1`` of the ``n`` exist, whatever ``n`` is.
    """
    per_sample = {
        name: (tuple(1 if d is None else d for d in spec.shape[1:]), spec.dtype) for name, spec in specs.items()
    }
    samples = RandomSamples(per_sample, n, seed)
    arrays = samples.head(n if max_samples is None else max_samples + 1)
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
