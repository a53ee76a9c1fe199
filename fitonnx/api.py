"""The public Python API: everything the CLI does is one call here."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from fitonnx.allocate import knapsack as allocate
from fitonnx.errors import DataError
from fitonnx.fisher import engine, instrument, losses
from fitonnx.fisher.options import FisherOptions
from fitonnx.model import data as data_mod
from fitonnx.model import graph
from fitonnx.model.data import Dataset
from fitonnx.model.load import LoadedModel, load_model
from fitonnx.prepare import PreparedModel, prepare, verify
from fitonnx.prepare.support import check_differentiable
from fitonnx.score import fit as score_mod
from fitonnx.score import noise

if TYPE_CHECKING:
    from fitonnx.export.bundle import Written

ModelSource = str | os.PathLike[str] | onnx.ModelProto | LoadedModel
DataSource = str | os.PathLike[str] | Dataset | None

VERIFY_SAMPLES = 8


class RandomDataWarning(UserWarning):
    """Scoring with random inputs: the result says little about real sensitivity."""


@dataclass(frozen=True)
class Session:
    """A model made ready for scoring: loaded, prepared, with its quantizable tensors and data."""

    loaded: LoadedModel
    prepared: PreparedModel
    specs: dict[str, graph.InputSpec]
    tensors: tuple[graph.QuantTensor, ...]
    data: Dataset
    ranks: dict[str, int]  # rank of every tensor of the prepared model that shape inference knows


def _load(model: ModelSource) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def resolve_data(loaded: LoadedModel, data: DataSource, random_samples: int | None, seed: int) -> Dataset:
    """Explicit data, else the bundled sidecar (``<model>.calib.npz``), else random only on request."""
    specs = graph.input_specs(loaded.proto)
    if isinstance(data, Dataset):
        return data
    if data is not None:
        return data_mod.load_data(data, list(specs))
    if random_samples is not None:
        warnings.warn(
            "scoring with random inputs: the result says little about real sensitivity", RandomDataWarning, stacklevel=3
        )
        return data_mod.random_data(specs, random_samples, seed)
    sidecar = data_mod.sidecar_for(loaded.path) if loaded.path is not None else None
    if sidecar is None:
        raise DataError(
            f"expected calibration data for {loaded.name}; found no --data and no "
            f"{Path(loaded.name).stem}.calib.npz beside it",
            hint="pass --data calib.npz (keys = input names, optional 'labels'), or --random-data N for a smoke test",
        )
    return data_mod.load_npz(sidecar)


def open_model(
    model: ModelSource, data: DataSource = None, *, random_samples: int | None = None, seed: int = 0
) -> Session:
    """Load, check the data against the model, prepare and verify the differentiable twin."""
    loaded = _load(model)
    specs = graph.input_specs(loaded.proto)
    dataset = resolve_data(loaded, data, random_samples, seed)
    data_mod.check_against(dataset, specs)
    first = {name: value.shape for name, value in dataset.sample(0, specs).items() if name in specs}
    feeds = [dataset.sample(i, specs) for i in range(dataset.num_samples)]
    prepared = prepare(loaded.proto, input_shapes=first, feeds=feeds)
    verify(prepared, [dataset.sample(i, specs) for i in range(min(VERIFY_SAMPLES, dataset.num_samples))])
    types = graph.value_types(prepared.model)  # one shape inference serves both lookups
    tensors = tuple(graph.find_quantizable(prepared.model, types))
    return Session(
        loaded=loaded,
        prepared=prepared,
        specs=specs,
        tensors=tensors,
        data=dataset,
        ranks=graph.output_ranks(prepared.model, types),
    )


def score(
    model: ModelSource,
    data: DataSource = None,
    *,
    options: FisherOptions | None = None,
    weight_bits: Sequence[int] = score_mod.DEFAULT_WEIGHT_BITS,
    activation_bits: Sequence[int] = score_mod.DEFAULT_ACTIVATION_BITS,
    noise_model: noise.NoiseModel | str = noise.NoiseModel.UNIFORM,
    random_samples: int | None = None,
    progress: engine.ProgressFn | None = None,
    session: Session | None = None,
) -> score_mod.ScoreReport:
    """Fisher traces and FIT for every quantizable weight and activation of ``model``.

    ``options``: how the Fisher is estimated (default: ``FisherOptions()``). ``noise_model``:
    ``uniform`` (the paper) or ``grid`` (see fitonnx.noise). ``random_samples``: score that many
    random inputs instead of data (a smoke test)."""
    opts = options or FisherOptions()
    kind = noise.NoiseModel(noise_model)
    s = session if session is not None else open_model(model, data, random_samples=random_samples, seed=opts.seed)
    traces, target, mode = fisher_traces(s, opts, progress=progress, exact_points=kind is noise.NoiseModel.GRID)
    report = score_mod.score(
        s.prepared.model,
        traces,
        model_name=s.loaded.name,
        fisher=mode.value,
        likelihood=target.likelihood.value,
        output=target.output,
        data_source=s.data.source,
        weight_bits=tuple(weight_bits),
        activation_bits=tuple(activation_bits),
        noise_model=kind,
    )
    notes = prepare_notes(s.prepared)
    if target.probabilities and target.likelihood is losses.Likelihood.CATEGORICAL:
        notes += (
            f"{target.output!r} is read as class probabilities (non-negative, summing to 1 over axis "
            f"{target.class_axis} on the first sample, with no Softmax in front): the loss uses their log",
        )
    return dataclasses.replace(report, notes=notes)


# Prepare changes that alter what is scored (other changes keep every tensor and its meaning).
NOTE_KINDS = frozenset({"specialize"})


def prepare_notes(prepared: PreparedModel) -> tuple[str, ...]:
    """The prepare changes a score report must mention: a specialized If (its other branch is not scored)."""
    return tuple(f"{c.where}: {c.detail}" for c in prepared.changes if c.kind in NOTE_KINDS)


def fisher_traces(
    s: Session,
    options: FisherOptions | None = None,
    *,
    progress: engine.ProgressFn | None = None,
    keep_gradients: bool = False,
    threads: int = 0,
    exact_points: bool = False,
) -> tuple[engine.FisherTraces, losses.OutputTarget, losses.FisherMode]:
    """The engine's raw per-sample statistics (for callers that need more than the report)."""
    opts = options or FisherOptions()
    gm, target, mode = gradient_model(
        s, opts, keep_gradients=keep_gradients, threads=threads, exact_points=exact_points
    )
    traces = engine.run(gm, s.data, s.specs, opts.run_options(threads), progress)
    return traces, target, mode


def gradient_model(
    s: Session,
    options: FisherOptions | None = None,
    *,
    keep_gradients: bool = False,
    threads: int = 0,
    exact_points: bool = False,
) -> tuple[instrument.GradientModel, losses.OutputTarget, losses.FisherMode]:
    """The gradient model ``fisher_traces`` runs, for callers that add per-sample outputs of their own
    (``options``: only the mode and the output matter here, not the sample budget).

    ``exact_points`` adds the statistics of the grid noise model (``noise.NoiseModel.GRID``)."""
    opts = options or FisherOptions()
    mode = opts.fisher if opts.fisher is not None else losses.default_mode(s.data.labels)
    labels = s.data.labels if mode is losses.FisherMode.EMPIRICAL else None
    if mode is losses.FisherMode.EMPIRICAL and s.data.labels is None:
        raise DataError(
            f"expected 'labels' in {s.data.source} for --fisher empirical; found none", hint="use --fisher mc"
        )
    ranks = s.ranks
    target = losses.resolve_output(
        s.prepared.model, ranks, opts.output, opts.likelihood, s.data.labels, opts.class_axis
    )
    labels_dtype = np.dtype(np.int64) if mode is losses.FisherMode.EXACT else None if labels is None else labels.dtype
    # Name any op without a usable gradient before onnxruntime's builder fails on it in C++.
    check_differentiable(s.prepared.model, [t.name for t in s.tensors], [target.tap])
    activations = [t for t in s.tensors if t.kind is graph.Kind.ACTIVATION]
    probe, names = instrument.build_probe(s.prepared.model, activations, target.tap)
    feed = s.data.sample(0, s.specs)
    values = engine.probe_values(probe, names, feed, threads)
    shapes = {name: value.shape for name, value in values.items()}
    target = losses.check_probabilities(target, values[target.tap])
    head = losses.build_head(target, mode, labels_dtype)
    gm = instrument.build_gradient_model(
        s.prepared.model,
        s.tensors,
        head,
        labels_dtype,
        ranks={name: len(shape) for name, shape in shapes.items()},
        keep_gradients=keep_gradients,
        exact_points=exact_points,
        # Every sample has these shapes; pooling gradients need them concrete (see instrument).
        shapes={**shapes, **{name: value.shape for name, value in feed.items() if name in s.specs}},
    )
    return gm, target, mode


def inspect_tensors(model: ModelSource) -> tuple[graph.QuantTensor, ...]:
    """The quantizable tensors of the prepared model (no data needed)."""
    loaded = _load(model)
    return tuple(graph.find_quantizable(prepare(loaded.proto).model))


@dataclass(frozen=True)
class RecommendResult:
    """What ``recommend`` chose (``allocation``), the FIT report it used, and the files it wrote."""

    allocation: allocate.Allocation
    report: score_mod.ScoreReport
    written: Written | None


def recommend(
    model: ModelSource,
    data: DataSource = None,
    *,
    target: str = "generic",
    avg_bits: float | None = None,
    size_kb: float | None = None,
    max_fit: float | None = None,
    weight_bits: Sequence[int] | None = None,
    act_bits: int | None = None,
    act_avg_bits: float | None = None,
    tolerance: float = 0.0,
    out_dir: str | os.PathLike[str] | None = None,
    options: FisherOptions | None = None,
    noise_model: noise.NoiseModel | str = noise.NoiseModel.UNIFORM,
    random_samples: int | None = None,
    progress: engine.ProgressFn | None = None,
    session: Session | None = None,
) -> RecommendResult:
    """Per-tensor bit widths for ``target`` under exactly one budget (average weight bits, weight KB
    or maximum FIT), and, with ``out_dir``, every output of ``fitonnx recommend`` written there.
    ``options``: how the Fisher is estimated; ``noise_model``: as in ``score``, with the grid model
    judged on the target's own grids (``targets.Target.represents``)."""
    # Imported here: the exporters pull in onnxruntime.quantization, which scoring never needs.
    from fitonnx.export.bundle import prepare_out_dir, write_outputs

    budget = allocate.budget_from(avg_bits=avg_bits, size_kb=size_kb, max_fit=max_fit)
    tgt = allocate.check_options(target, weight_bits=weight_bits, act_bits=act_bits, act_avg_bits=act_avg_bits)
    opts = options or FisherOptions()
    s = session if session is not None else open_model(model, data, random_samples=random_samples, seed=opts.seed)
    out = None if out_dir is None else prepare_out_dir(out_dir, s.loaded.path, s.loaded.name)
    report = score(
        model,
        session=s,
        options=opts,
        weight_bits=tgt.weight_bits,
        activation_bits=tgt.activation_bits,
        noise_model=noise_model,
        progress=progress,
    )
    alloc = allocate.allocate(
        report, tgt, budget, weight_bits=weight_bits, act_bits=act_bits, act_avg_bits=act_avg_bits, tolerance=tolerance
    )
    written = (
        None
        if out is None
        else write_outputs(
            alloc, s.loaded.proto, out, source=s.loaded.path, data=s.data, origin_of=s.prepared.origin_of
        )
    )
    return RecommendResult(allocation=alloc, report=report, written=written)
