"""A model made ready for the Fisher stage, and the per-sample statistics of its gradient model.

This is the pipeline's spine up to the traces: load → data → prepare → verify → quantizable
tensors (``open_model``), then loss head → gradient model → engine (``fisher_traces``). Every
command that needs traces (score, recommend, validate, compare) starts here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from fitonnx.errors import DataError
from fitonnx.fisher import batched, engine, engines, instrument, losses, outputs, parallel
from fitonnx.fisher.checks import check_traces
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.statistics import NO_STATISTICS, Deferred, Statistics, activation_absmax, finish_weighted
from fitonnx.model import data as data_mod
from fitonnx.model import external, graph
from fitonnx.model.data import Dataset
from fitonnx.model.load import LoadedModel
from fitonnx.model.source import DataSource, ModelSource, load_source, resolve_data
from fitonnx.prepare import PreparedModel, prepare, verify
from fitonnx.prepare.support import check_differentiable
from fitonnx.prepare.types import ChangeKind
from fitonnx.progress import Progress, as_progress
from fitonnx.scale import warm_up

VERIFY_SAMPLES = 8


@dataclass(frozen=True)
class Session:
    """A model made ready for scoring: loaded, prepared, with its quantizable tensors and data."""

    loaded: LoadedModel
    prepared: PreparedModel
    specs: dict[str, graph.InputSpec]
    tensors: tuple[graph.QuantTensor, ...]
    data: Dataset
    ranks: dict[str, int]  # rank of every tensor of the prepared model that shape inference knows


def open_model(
    model: ModelSource,
    data: DataSource = None,
    *,
    random_samples: int | None = None,
    seed: int = 0,
    max_samples: int | None = None,
) -> Session:
    """Load, check the data against the model, prepare and verify the differentiable twin
    (an already open ``Session`` is returned as it is). ``max_samples`` bounds what is read of
    the data (``resolve_data``)."""
    if isinstance(model, Session):
        return model
    loaded = load_source(model)
    specs = graph.input_specs(loaded.proto)
    dataset = resolve_data(loaded, data, random_samples, seed, max_samples)
    data_mod.check_against(dataset, specs)
    first = {name: value.shape for name, value in dataset.sample(0, specs).items() if name in specs}
    # Only If specialization reads every sample (prepare); other models need none of them here.
    has_if = any(node.op_type == "If" for node in loaded.proto.graph.node)
    feeds = [dataset.sample(i, specs) for i in range(dataset.num_samples)] if has_if else []
    # Also before prepare: its optimizer pass loads the model in onnxruntime, which may crash on it.
    graph.check_window_outputs(loaded.proto, graph.value_types(loaded.proto))
    prepared = prepare(loaded.proto, input_shapes=first, feeds=feeds)
    types = graph.value_types(prepared.model)  # one shape inference serves every lookup
    graph.check_window_outputs(prepared.model, types)  # before onnxruntime runs it (it would crash)
    verify(prepared, [dataset.sample(i, specs) for i in range(min(VERIFY_SAMPLES, dataset.num_samples))])
    tensors = tuple(graph.find_quantizable(prepared.model, types))
    return Session(
        loaded=loaded,
        prepared=prepared,
        specs=specs,
        tensors=tensors,
        data=dataset,
        ranks=graph.output_ranks(prepared.model, types),
    )


# Prepare changes that alter what is scored (other changes keep every tensor and its meaning).
NOTE_KINDS = frozenset({ChangeKind.SPECIALIZE, ChangeKind.QUANTIZED, ChangeKind.UNROLL})


def prepare_notes(prepared: PreparedModel) -> tuple[str, ...]:
    """The prepare changes a score report must mention: a specialized If (its other branch is not scored),
    an already-quantized model's activation Q/DQ kept as fixed quantizers, an unrolled Loop/Scan."""
    return tuple(f"{c.where}: {c.detail}" for c in prepared.changes if c.kind in NOTE_KINDS)


def fisher_traces(
    s: Session,
    options: FisherOptions | None = None,
    *,
    progress: Progress | None = None,
    keep_gradients: bool = False,
    threads: int = 0,
    exact_points: bool = False,
    statistics: Statistics | Deferred = NO_STATISTICS,
) -> tuple[engine.FisherTraces, losses.OutputTarget, losses.FisherMode]:
    """The engine's raw per-sample statistics (for callers that need more than the report);
    ``statistics``: format statistics reduced in the graph (``FisherTraces.sums``), or ``Deferred``
    ones, whose max|a| calibration runs on the model the loop runs, at its batch size."""
    opts = options or FisherOptions()
    as_progress(progress).start(1, "Building the gradient model")  # closed by the samples' stage
    warm_up(opts.workers)  # local workers start while the gradient model is built
    single_only = "--keep-gradients" if keep_gradients else "the grid noise model" if exact_points else None
    if isinstance(statistics, Deferred) and not _may_batch(s, opts, single_only):
        statistics = statistics.complete(_absmax(s, s.prepared.model, statistics.names, opts, threads, 1))
    first = statistics.placeholder() if isinstance(statistics, Deferred) else statistics
    if single_only is None and first.weighted and opts.tol is not None:
        # a weight's g² arrives as one total per batch: --tol could not stop inside a batch
        single_only = "--tol with floating-format weight statistics"

    def build(stats: Statistics) -> instrument.GradientModel:
        return gradient_model(
            s, opts, keep_gradients=keep_gradients, threads=threads, exact_points=exact_points, statistics=stats
        )[0]

    gm, target, mode = gradient_model(
        s, opts, keep_gradients=keep_gradients, threads=threads, exact_points=exact_points, statistics=first
    )
    traces, used = _run(s, gm, opts, threads, progress, single_only, statistics, build)
    if traces.sums is not None:
        sums = finish_weighted(traces.sums, used.weighted, traces.samples)
        traces = dataclasses.replace(traces, sums=sums)
    feed = {k: v for k, v in s.data.sample(0, s.specs).items() if k in s.specs}
    return check_traces(traces, gm, feed, threads), target, mode


def _total(s: Session, opts: FisherOptions) -> int:
    """The number of samples the loop reads at most."""
    return s.data.num_samples if opts.max_samples is None else min(opts.max_samples, s.data.num_samples)


def _absmax(
    s: Session, model: onnx.ModelProto, names: Sequence[str], opts: FisherOptions, threads: int, batch: int
) -> dict[str, float]:
    """max|a| of each of ``names`` over the samples the loop reads, by forward passes of ``model``
    (the prepared model at batch 1, or its batched twin) ``batch`` samples at a time."""
    return activation_absmax(model, names, batched.batches(s.data, s.specs, _total(s, opts), batch), threads)


def _may_batch(s: Session, opts: FisherOptions, single_only: str | None) -> bool:
    """Whether the loop may run batched (``batched.batch_plan``'s reasons that need no gradient model)."""
    engine_name = engines.get_engine(opts.engine).name
    size = opts.batch_size or batched.DEFAULT_BATCH_SIZE
    fixed = any(not spec.shape or spec.shape[0] is not None for spec in s.specs.values())
    return (
        engine_name == "onnx"
        and single_only is None
        and not opts.workers.parallel
        and min(size, _total(s, opts)) > 1
        and not fixed
    )


def _run(
    s: Session,
    gm: instrument.GradientModel,
    opts: FisherOptions,
    threads: int,
    progress: Progress | None,
    single_only: str | None,
    statistics: Statistics | Deferred,
    rebuild: Callable[[Statistics], instrument.GradientModel],
) -> tuple[engine.FisherTraces, Statistics]:
    """The per-sample loop: batched where the engine and the model allow it (``fisher.batched``),
    else one sample per run, saying why (``batch_note``) when a batch was asked for; and the
    statistics it computed (``Deferred`` ones calibrated on the model it ran, at its batch size:
    ``gm`` was built with their placeholder, and is rebuilt by ``rebuild`` for a batch-1 run)."""
    name = engines.get_engine(opts.engine).name
    default = batched.DEFAULT_BATCH_SIZE if name == "onnx" else 1
    if opts.workers.parallel:  # workers score one sample per run
        single_only = single_only or "--workers/--ray"
    size, note = batched.batch_plan(
        gm,
        s.data,
        s.specs,
        min(opts.batch_size or default, s.data.num_samples, opts.max_samples or s.data.num_samples),
        batched_engine=name == "onnx",
        single_only=single_only,
    )
    # Weights kept as external data: per-sample norms even at batch 1, so that the session never
    # holds full weight gradients (as large as the weights).
    norms_only = name == "onnx" and single_only is None and not gm.head.enumerate_labels
    norms_only = norms_only and bool(external.external_tensors(s.prepared.model))
    labels = s.data.labels
    dtype = labels.dtype if gm.head.needs_labels and labels is not None else None
    attempts = [size] if size > 1 else []
    if norms_only:
        attempts.append(1)
    for batch in attempts:
        stats = statistics if isinstance(statistics, Statistics) else statistics.placeholder()
        request = batched.BatchRequest(
            s.loaded.proto, s.prepared.model, gm, s.data, s.specs, batch, dtype, threads, stats
        )
        prepared = batched.twin(request)
        if isinstance(prepared, str):
            note = note or prepared
            continue
        if isinstance(statistics, Deferred):
            stats = statistics.complete(_absmax(s, prepared, statistics.names, opts, threads, batch))
        built = batched.build(dataclasses.replace(request, statistics=stats), prepared)
        if not isinstance(built, str):
            traces = batched.run(built, gm, s.data, s.specs, opts.run_options(threads), progress)
            why = note or ""
            return dataclasses.replace(traces, batch_size=batch, batch_note=why, engine=name, device=opts.device), stats
        note = note or built
    if isinstance(statistics, Deferred):
        statistics = statistics.complete(_absmax(s, s.prepared.model, statistics.names, opts, threads, 1))
        gm = rebuild(statistics)
    single = parallel.run(gm, s.data, s.specs, opts.run_options(threads), opts.workers, progress)
    return dataclasses.replace(single, engine=name, device=opts.device, batch_note=note or ""), statistics


def gradient_model(
    s: Session,
    options: FisherOptions | None = None,
    *,
    keep_gradients: bool = False,
    threads: int = 0,
    exact_points: bool = False,
    statistics: Statistics = NO_STATISTICS,
) -> tuple[instrument.GradientModel, losses.OutputTarget, losses.FisherMode]:
    """The gradient model ``fisher_traces`` runs, for callers that add per-sample outputs of their own
    (``options``: only the mode and the output matter here, not the sample budget). The target
    returned is the first output's; ``gm.head.targets`` holds every output of the loss.

    ``exact_points`` adds the statistics of the grid noise model (``noise.NoiseModel.GRID``)."""
    opts = options or FisherOptions()
    mode = opts.fisher if opts.fisher is not None else losses.default_mode(s.data.labels)
    labels = s.data.labels if mode is losses.FisherMode.EMPIRICAL else None
    if mode is losses.FisherMode.EMPIRICAL and s.data.labels is None:
        raise DataError(
            f"expected 'labels' in {s.data.source} for --fisher empirical; found none", hint="use --fisher mc"
        )
    feed = s.data.sample(0, s.specs)
    targets, values, notes = _loss_targets(s, opts, feed, threads, mode)
    tensors, dropped = _reaching(s, targets)
    labels_dtype = np.dtype(np.int64) if mode is losses.FisherMode.EXACT else None if labels is None else labels.dtype
    # Name any op without a usable gradient before the engine's builder fails on it.
    grad_engine = engines.get_engine(opts.engine)
    check_differentiable(
        s.prepared.model, [t.name for t in tensors], [t.tap for t in targets], grad_engine.gradient_ops
    )
    head = outputs.combine([losses.build_head(t, mode, labels_dtype) for t in targets])
    shapes = {name: value.shape for name, value in values.items()}
    request = instrument.GradientRequest(
        s.prepared.model,
        tensors,
        head,
        labels_dtype,
        ranks={name: len(shape) for name, shape in shapes.items()},
        keep_gradients=keep_gradients,
        exact_points=exact_points,
        statistics=statistics,
        # Every sample has these shapes; pooling gradients need them concrete (see instrument).
        shapes={**shapes, **{name: value.shape for name, value in feed.items() if name in s.specs}},
        engine=grad_engine.name,
    )
    gm = instrument.build_gradient_model(request)
    return dataclasses.replace(gm, notes=(*notes, *dropped)), targets[0], mode


def _loss_targets(
    s: Session, opts: FisherOptions, feed: dict[str, np.ndarray], threads: int, mode: losses.FisherMode
) -> tuple[list[losses.OutputTarget], dict[str, np.ndarray], list[str]]:
    """The outputs of the loss and how each is read, from the real shapes of one probe run (a stale
    declared output shape is never used); the probe's values; notes on outputs left out. The exact
    Fisher enumerates one output's classes: it reads one output (the first float one by default)."""
    model = s.prepared.model
    if mode is losses.FisherMode.EXACT and opts.output is None:
        opts = opts.replace(output=losses.pick_output(model, None))
    activations = [t for t in s.tensors if t.kind is graph.Kind.ACTIVATION]
    names = [*outputs.float_outputs(model), *outputs.candidate_taps(model)]
    probe, probed = instrument.build_probe(model, activations, names)
    values = engine.probe_values(probe, probed, feed, threads)
    shapes = {name: v.shape for name, v in values.items()} | {k: v.shape for k, v in feed.items()}
    request = outputs.OutputRequest(
        opts.output, opts.likelihood, opts.class_axis, dict(opts.output_kinds), s.data.labels, shapes
    )
    chosen, notes = outputs.loss_outputs(model, request)
    targets = [outputs.resolve_one(model, s.ranks, name, request) for name in chosen]
    missing = [t.tap for t in targets if t.tap not in values]
    if missing:  # a tap the first probe did not expose (behind ops it does not look through)
        probe, extra = instrument.build_probe(model, [], missing)
        values |= engine.probe_values(probe, extra, feed, threads)
    targets = [losses.check_probabilities(t, values[t.tap]) for t in targets]
    return targets, values, notes


def _reaching(s: Session, targets: list[losses.OutputTarget]) -> tuple[tuple[graph.QuantTensor, ...], list[str]]:
    """The tensors the loss depends on, and a note naming those it does not (they reach no output in the loss)."""
    needed = outputs.ancestors(s.prepared.model, [t.tap for t in targets])
    kept = tuple(t for t in s.tensors if t.name in needed)
    dropped = [t.name for t in s.tensors if t.name not in needed]
    if not dropped:
        return kept, []
    shown = ", ".join(repr(n) for n in dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    said = "the chosen output" if len(targets) == 1 else "any output in the loss"
    return kept, [f"{len(dropped)} tensor(s) do not reach {said} and are not scored: {shown}"]


def inspect_tensors(model: ModelSource) -> tuple[graph.QuantTensor, ...]:
    """The quantizable tensors of the prepared model (no data needed)."""
    loaded = load_source(model)
    return tuple(graph.find_quantizable(prepare(loaded.proto).model))
