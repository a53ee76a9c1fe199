"""Score a model end to end: open it, run the Fisher stage, combine the traces with a noise model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fitonnx.fisher import engine, losses
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import Session, fisher_traces, open_model, prepare_notes
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.progress import as_progress
from fitonnx.score import noise
from fitonnx.score.fit import DEFAULT_ACTIVATION_BITS, DEFAULT_WEIGHT_BITS, Provenance, ScoreReport, build_report


def provenance(s: Session, target: losses.OutputTarget, mode: losses.FisherMode) -> Provenance:
    """The provenance of a report scored from session ``s`` with this output reading and Fisher mode."""
    return Provenance(
        model=s.loaded.name,
        fisher=mode.value,
        likelihood=target.likelihood.value,
        output=target.output,
        data_source=s.data.source,
    )


def score_model(
    model: ModelSource,
    data: DataSource = None,
    *,
    options: FisherOptions | None = None,
    weight_bits: Sequence[int] = DEFAULT_WEIGHT_BITS,
    activation_bits: Sequence[int] = DEFAULT_ACTIVATION_BITS,
    noise_model: noise.NoiseModel | str = noise.NoiseModel.UNIFORM,
    progress: engine.Progress | None = None,
    session: Session | None = None,
) -> ScoreReport:
    """Fisher traces and FIT for every quantizable weight and activation of ``model``.

    ``options``: how the Fisher is estimated (default: ``FisherOptions()``). ``noise_model``:
    ``uniform`` (the paper) or ``grid`` (see fitonnx.score.noise). ``data`` may be
    ``RandomData(n)`` to score random inputs (a smoke test)."""
    opts = options or FisherOptions()
    kind = noise.NoiseModel(noise_model)
    if session is None:
        as_progress(progress).start(1, "Loading and preparing the model")
    s = session if session is not None else open_model(model, data, seed=opts.seed)
    traces, target, mode = fisher_traces(s, opts, progress=progress, exact_points=kind is noise.NoiseModel.GRID)
    report = build_report(
        s.prepared.model,
        traces,
        provenance(s, target, mode),
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
