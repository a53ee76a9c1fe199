"""Score a model end to end: open it, run the Fisher stage, combine the traces with a noise model."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import onnx

from fitonnx.errors import FitonnxError
from fitonnx.fisher import engine, losses
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import Session, fisher_traces, open_model, prepare_notes
from fitonnx.fisher.statistics import NO_STATISTICS, Deferred, Statistics
from fitonnx.formats import Format, parse_format
from fitonnx.model.graph import FLOAT_TYPES, Kind
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.progress import as_progress
from fitonnx.scale import warm_up
from fitonnx.score import formats_fit, noise
from fitonnx.score.fit import DEFAULT_ACTIVATION_BITS, DEFAULT_WEIGHT_BITS, Provenance, ScoreReport, build_report


class DegenerateTraceWarning(UserWarning):
    """Every Fisher trace is zero: the FIT ranking carries no information."""


def check_traces(report: ScoreReport, target: losses.OutputTarget) -> tuple[str, ...]:
    """Refuse non-finite traces; warn (and return a note) when every trace is zero. Never silent."""
    traces = [(t.name, t.ef_trace) for t in report.tensors]
    bad = [name for name, v in traces if not math.isfinite(v)]
    if bad:
        raise FitonnxError(
            f"expected finite Fisher traces; {len(bad)} of {len(traces)} tensors have NaN or infinite traces "
            f"(first {bad[0]!r}): the loss or its gradient overflows on this data",
            hint="check the data for saturated or huge values and the model for NaN/inf weights",
        )
    if traces and all(v == 0 for _, v in traces):
        note = (
            f"every Fisher trace is 0: the loss on {target.output!r} does not change with any tensor on this data "
            f"(a saturated softmax/sigmoid, a constant output such as one multiplied by 0, or a class axis "
            f"{target.class_axis} of size 1); the FIT ranking means nothing"
        )
        warnings.warn(note, DegenerateTraceWarning, stacklevel=3)
        return (note,)
    return ()


def _body_weights(graph: onnx.GraphProto) -> list[str]:
    """Float initializers and Constant outputs inside the bodies of ``graph``'s Loop/Scan nodes
    (recursively): those prepare could not unroll (it unrolls the others, whose constants it hoists)."""
    found: list[str] = []
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for body in bodies:
                if node.op_type in ("Loop", "Scan"):
                    found += [t.name for t in body.initializer if t.data_type in FLOAT_TYPES]
                    found += [
                        n.output[0]
                        for n in body.node
                        if n.op_type == "Constant"
                        and any(a.name == "value" and a.t.data_type in FLOAT_TYPES for a in n.attribute)
                    ]
                found += _body_weights(body)
    return found


def unscored_notes(model: onnx.ModelProto, prepared: onnx.ModelProto | None = None) -> tuple[str, ...]:
    """Weights a report leaves out, said out loud: Loop/Scan body weights (of the ``prepared`` twin,
    where prepare has unrolled what it could) and sparse initializers (of ``model``)."""
    notes = []
    body = _body_weights((prepared if prepared is not None else model).graph)
    if body:
        notes.append(
            f"{len(body)} weight(s) inside Loop/Scan bodies are not scored (fitonnx scores the main graph), "
            f"e.g. {body[0]!r}"
        )
    sparse = [t.values.name for t in model.graph.sparse_initializer]
    if sparse:
        notes.append(f"{len(sparse)} sparse initializer(s) are not scored, e.g. {sparse[0]!r}")
    return tuple(notes)


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
    ``RandomData(n)`` to score random inputs (a smoke test). ``session``: an already open model
    (``model`` and ``data`` are then not read). Number formats: ``score_session``."""
    opts = options or FisherOptions()
    if session is None:
        as_progress(progress).start(1, "Loading and preparing the model")
    warm_up(opts.workers)  # local workers start while the model is prepared
    s = session if session is not None else open_model(model, data, seed=opts.seed, max_samples=opts.max_samples)
    return score_session(
        s, options=opts, weight_bits=weight_bits, activation_bits=activation_bits, noise_model=noise_model,
        progress=progress,
    )  # fmt: skip


def score_session(
    s: Session,
    *,
    options: FisherOptions | None = None,
    weight_bits: Sequence[int] = DEFAULT_WEIGHT_BITS,
    activation_bits: Sequence[int] = DEFAULT_ACTIVATION_BITS,
    noise_model: noise.NoiseModel | str = noise.NoiseModel.UNIFORM,
    formats: Sequence[Format | str] = (),
    progress: engine.Progress | None = None,
    activation_formats: Sequence[Format | str] | None = None,
) -> ScoreReport:
    """``score_model`` on an open session, and with ``formats``: number formats (or their names,
    ``int4/ch``, ``fp8e4m3``, ``nvfp4/16``) to score every tensor under besides the bit widths
    (``TensorScore.formats``, ``ScoreReport.format_totals``; see ``score.formats_fit``).
    ``activation_formats``: the formats scored on activations, ``formats`` then being scored on
    weights only (None: every format of ``formats`` on both)."""
    opts = options or FisherOptions()
    kind = noise.NoiseModel(noise_model)
    fmts, roles = _formats_and_roles(formats, activation_formats)
    plan = format_statistics(s, fmts, roles) if fmts else NO_STATISTICS
    traces, target, mode = fisher_traces(
        s, opts, progress=progress, exact_points=kind is noise.NoiseModel.GRID, statistics=plan
    )
    report = build_report(
        s.prepared.model,
        traces,
        provenance(s, target, mode, traces.targets),
        weight_bits=tuple(weight_bits),
        activation_bits=tuple(activation_bits),
        noise_model=kind,
    )
    if fmts:
        fits = formats_fit.format_fits(traces, s.prepared.model, fmts, roles)
        report = with_formats(report, fits, fmts)
    return dataclasses.replace(report, notes=_report_notes(s, report, traces, target))


def _report_notes(
    s: Session, report: ScoreReport, traces: engine.FisherTraces, target: losses.OutputTarget
) -> tuple[str, ...]:
    """What a score report must say: prepare's changes, unscored weights, zero traces, the loss's reading."""
    notes = prepare_notes(s.prepared) + unscored_notes(s.loaded.proto, s.prepared.model) + check_traces(report, target)
    notes += loss_notes(traces.targets or (target,)) + traces.notes
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
    return notes


def _unique(fmts: list[Format]) -> list[Format]:
    return list(dict.fromkeys(fmts))


def _format(f: Format | str) -> Format:
    return f if isinstance(f, Format) else parse_format(f)


def _formats_and_roles(
    formats: Sequence[Format | str], activation_formats: Sequence[Format | str] | None
) -> tuple[list[Format], formats_fit.Roles]:
    """Every format to score, and which are scored on weights and which on activations."""
    on_weights = _unique([_format(f) for f in formats])
    if activation_formats is None:
        return on_weights, formats_fit.EVERY_ROLE
    on_acts = _unique([_format(f) for f in activation_formats])
    roles = formats_fit.Roles(frozenset(f.name for f in on_weights), frozenset(f.name for f in on_acts))
    return _unique(on_weights + on_acts), roles


def format_statistics(
    s: Session, fmts: Sequence[Format], roles: formats_fit.Roles = formats_fit.EVERY_ROLE
) -> Statistics | Deferred:
    """The in-graph statistics ``fmts`` need on session ``s`` (each on the tensors ``roles`` give it);
    where floating activation formats need each activation's max|a| first, ``Deferred`` ones:
    ``fisher_traces`` calibrates on the samples the Fisher reads, with the model and batch size of its loop."""
    on_acts = [f for f in fmts if roles.activations is None or f.name in roles.activations]
    names = formats_fit.scaled_activations(s.tensors, on_acts)
    model = s.prepared.model
    if not names:
        return formats_fit.plan_statistics(model, s.tensors, fmts, roles=roles)
    weights = [t for t in s.tensors if t.kind is Kind.WEIGHT]
    acts = [t for t in s.tensors if t.kind is Kind.ACTIVATION]
    return Deferred(
        tuple(names),
        formats_fit.plan_statistics(model, weights, fmts, roles=roles),
        lambda absmax: formats_fit.plan_statistics(model, acts, fmts, absmax, roles),
    )


def with_formats(
    report: ScoreReport, fits: dict[tuple[str, str], formats_fit.FormatFit], fmts: Sequence[Format]
) -> ScoreReport:
    """``report`` with each tensor's FIT per format and the totals per format."""
    names = tuple(f.name for f in fmts)
    tensors = tuple(
        dataclasses.replace(t, formats={n: fits[(t.name, n)] for n in names if (t.name, n) in fits})
        for t in report.tensors
    )
    totals = {n: float(sum(t.formats[n].expected for t in tensors if n in t.formats)) for n in names}
    return dataclasses.replace(report, tensors=tensors, formats=names, format_totals=totals)
