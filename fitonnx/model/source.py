"""Where a command's model and calibration data come from: paths, loaded values, or random samples."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from fitonnx.errors import DataError
from fitonnx.model import data as data_mod
from fitonnx.model import graph
from fitonnx.model.data import Dataset
from fitonnx.model.load import LoadedModel, load_model


@dataclass(frozen=True)
class RandomData:
    """Random inputs instead of calibration data: a smoke test, never a real sensitivity."""

    samples: int
    seed: int = 0


# (a fisher.session.Session is accepted too where a command opens the model)
ModelSource = str | os.PathLike[str] | onnx.ModelProto | LoadedModel
DataSource = str | os.PathLike[str] | Dataset | RandomData | None


class RandomDataWarning(UserWarning):
    """Scoring with random inputs: the result says little about real sensitivity."""


def load_source(model: ModelSource) -> LoadedModel:
    """The loaded model, loading it when given a path or a ModelProto."""
    return model if isinstance(model, LoadedModel) else load_model(model)


def resolve_data(
    loaded: LoadedModel,
    data: DataSource,
    random_samples: int | None = None,
    seed: int = 0,
    max_samples: int | None = None,
) -> Dataset:
    """Explicit data, else the bundled sidecar (``<model>.calib.npz``), else random only on request.

    With ``max_samples``, files are read (and random samples made) only that far, plus one sample
    that says more exist: memory does not grow with the data file or ``--random-data N``.
    """
    if isinstance(data, RandomData):
        data, random_samples, seed = None, data.samples, data.seed
    specs = graph.input_specs(loaded.proto)
    if isinstance(data, Dataset):
        return data
    if data is not None:
        return data_mod.load_data(data, list(specs), max_samples)
    if random_samples is not None:
        warnings.warn(
            "scoring with random inputs: the result says little about real sensitivity", RandomDataWarning, stacklevel=3
        )
        return data_mod.random_data(specs, random_samples, seed, max_samples)
    sidecar = data_mod.sidecar_for(loaded.path) if loaded.path is not None else None
    if sidecar is None:
        raise DataError(
            f"expected calibration data for {loaded.name}; found no --data and no "
            f"{Path(loaded.name).stem}.calib.npz beside it",
            hint="pass --data calib.npz (keys = input names, optional 'labels'), or --random-data N for a smoke test",
        )
    return data_mod.load_npz(sidecar, max_samples)
