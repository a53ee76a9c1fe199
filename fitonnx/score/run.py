"""Score a model end to end: open it, run the Fisher stage, combine the traces with a noise model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fitonnx.fisher import engine, losses
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import Session, fisher_traces, open_model, prepare_notes
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.score import noise
from fitonnx.score.fit import DEFAULT_ACTIVATION_BITS, DEFAULT_WEIGHT_BITS, Provenance, ScoreReport, build_report


def provenance(
    s: Session, target: losses.OutputTarget, mode: losses.FisherMode, targets: Sequence[losses.OutputTarget] = ()
) -> Provenance:
    """The provenance of a report scored from session ``s`` with this output reading and Fisher mode
    (``targets``: every output of a loss over several, joined with '+')."""
    every = list(targets) or [target]
    return Provenance(
        model=s.loaded.name,
        fisher=mode.value,
        likelihood="+".join(t.likelihood.value for t in every),
        output="+".join(t.output for t in every),
        data_source=s.data.source,
    )


def loss_notes(targets: Sequence[losses.OutputTarget]) -> tuple[str, ...]:
    """How each output of the loss is read and why (every output of a loss over several; a guessed
    reading always), with how to say otherwise."""
    notes = []
    for t in targets:
        if len(targets) == 1 and not t.guessed:
            continue
        axis = f" over axis {t.class_axis}" if t.class_axis is not None else ""
        line = f"output {t.output!r}: {t.likelihood.value}{axis} ({t.reason or 'inferred'})"
        if t.guessed:
            line += f"; a guess: say what it is with --output-kind {t.output}=logits:AXIS|boxes|hidden|probabilities"
        notes.append(line)
    return tuple(notes)


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
    s = session if session is not None else open_model(model, data, seed=opts.seed)
    traces, target, mode = fisher_traces(s, opts, progress=progress, exact_points=kind is noise.NoiseModel.GRID)
    report = build_report(
        s.prepared.model,
        traces,
        provenance(s, target, mode, traces.targets),
        weight_bits=tuple(weight_bits),
        activation_bits=tuple(activation_bits),
        noise_model=kind,
    )
    notes = prepare_notes(s.prepared) + loss_notes(traces.targets or (target,)) + traces.notes
    for t in traces.targets or (target,):
        if (
            t.probabilities
            and t.likelihood is losses.Likelihood.CATEGORICAL
            and t.reason != "--output-kind probabilities"
        ):
            notes += (
                f"{t.output!r} is read as class probabilities (non-negative, summing to 1 over axis "
                f"{t.class_axis} on the first sample, with no Softmax in front): the loss uses their log",
            )
    return dataclasses.replace(report, notes=notes)
