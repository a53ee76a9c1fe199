"""The per-sample loop of ``engine.run`` spread over workers (``--workers N``, ``--ray``).

Samples are independent, so the run is cut into shards of consecutive samples. Each worker gets
the serialized gradient model once (it never prepares or builds anything), opens its session
once, and returns for each sample of a shard the engine's fetched values (the full gradients, when
kept, as the shard's sum of squares). The driver feeds those rows to the engine's own accumulator
in sample order and checks ``--tol`` after every sample exactly as one process does: shards run
in a bounded window, and the first sample at which the stop rule holds ends the run (shards
beyond it are cancelled). The per-sample matrix, and so the report, standard errors and
bootstrap, equal a single-process run's.

Workers read only the shards the driver cut from data it has checked (``data.check_against`` and
the engine's first-sample label checks, over every label, run here first). The Monte-Carlo
heads' noise comes from one generator drawn in sample order: a worker replays the draws of the
samples before its shard (noise only, no model runs), so sample i sees the noise it sees in one
process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.errors import InternalError
from fitonnx.fisher import engine
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import draw_noise
from fitonnx.model.data import Dataset
from fitonnx.model.graph import InputSpec
from fitonnx.model.runtime import make_session
from fitonnx.progress import Progress, as_progress
from fitonnx.scale import Job, Pool, Workers, threads_per_process

MAX_SHARD = 16  # samples per task at most: progress moves, a --tol stop wastes little
SHARDS_PER_SLOT = 4  # at least this many tasks per worker when the data allows (load balance)


@dataclass(frozen=True)
class _Context:
    """What each worker receives once: the gradient model and how to run it."""

    gm: GradientModel
    specs: Mapping[str, InputSpec]
    layout: engine.FetchLayout
    enumeration: tuple[tuple[int, ...], int] | None
    seed: int
    threads: int
    device: str = "cpu"


@dataclass(frozen=True)
class _Shard:
    """Samples ``start`` .. ``start + data.num_samples - 1`` of the run, already checked."""

    start: int
    data: Dataset


@dataclass(frozen=True)
class _Rows:
    """A shard's results: per sample, the fetched scalars (every output but the full gradients and the
    format statistics) as float64 in fetch order; and the shard's Σ of squared full gradients (if the
    model has them) followed by its Σ of each format statistic (``GradientModel.sum_outputs``)."""

    start: int
    scalars: np.ndarray  # [samples, fetched scalars]
    diag: tuple[np.ndarray, ...]


class _Worker:
    """A worker's state for one run: the session, the shapes cache and the noise generator."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.session = make_session(ctx.gm.model_bytes, ctx.threads, device=ctx.device)
        self.shapes = engine._Shapes(ctx.gm, list(ctx.specs), ctx.threads)
        self.noisy = any(part.noise is not None for part in ctx.gm.head.heads)
        self.rng = np.random.default_rng(ctx.seed)
        self.cursor = 0  # the sample the generator's next draws belong to

    def seek(self, i: int, tap_shapes: engine.TapShapes) -> None:
        """Bring the noise generator to sample ``i`` by drawing (and dropping) the noise of the samples
        before it, head by head as ``engine._head_feeds`` draws it (every sample of a dataset has the
        same shapes, so the same noise shapes)."""
        if not self.noisy:
            return
        if i < self.cursor:
            self.rng, self.cursor = np.random.default_rng(self.ctx.seed), 0
        heads = self.ctx.gm.head.heads
        for _ in range(self.cursor, i):
            for part, tap_shape in zip(heads, tap_shapes, strict=True):
                if part.noise is not None:
                    draw_noise(part.noise, part.noise_shape(tap_shape), self.rng)
        self.cursor = i


def _setup(ctx: _Context) -> _Worker:
    return _Worker(ctx)


def _work(w: _Worker, shard: _Shard) -> _Rows:
    """Run the shard's samples; the scalars of each and the shard's sums of squared gradients."""
    ctx, data = w.ctx, shard.data
    gm, layout = ctx.gm, ctx.layout
    rows: list[np.ndarray] = []
    sums: list[engine.RunningSum] = []
    for local in range(data.num_samples):
        i = shard.start + local
        feed = {k: v for k, v in data.sample(local, ctx.specs).items() if k in ctx.specs}
        zeros, tap_shapes = w.shapes.get(feed)
        w.seek(i, tap_shapes)
        run_feed = {**feed, **zeros, **engine._head_feeds(gm, data, ctx.specs, local, tap_shapes, w.rng)}
        w.cursor = i + 1
        values = engine._run_one(w.session, layout, run_feed, ctx.enumeration, gm, i)
        summed = [
            g if ctx.enumeration is not None else np.square(g)  # an enumerating head squares them
            for g in (np.asarray(grad, np.float64) for grad in values[layout.grads])
        ] + list(values[layout.sums])
        if local == 0:
            sums = [engine.RunningSum() for _ in summed]
        for total, v in zip(sums, summed, strict=True):
            total.add(v)
        arrays = range(layout.grads.start, layout.grads.stop), range(layout.sums.start, layout.sums.stop)
        kept = [v for k, v in enumerate(values) if k not in arrays[0] and k not in arrays[1]]
        rows.append(np.array([float(np.asarray(v).reshape(())) for v in kept], np.float64))
    return _Rows(shard.start, np.stack(rows), tuple(np.asarray(total.value(), np.float64) for total in sums))


def _scalar_layout(layout: engine.FetchLayout) -> engine.FetchLayout:
    """``layout`` without the full gradients and the format statistics (the last group): where each
    group sits in a ``_Rows`` row."""
    g = layout.grads.stop - layout.grads.start
    names = layout.names[: layout.grads.start] + layout.names[layout.grads.stop : layout.sums.start]

    def shift(s: slice) -> slice:
        return slice(s.start - g, s.stop - g)

    return dataclasses.replace(
        layout,
        names=names,
        grads=slice(layout.grads.start, layout.grads.start),
        extra=shift(layout.extra),
        points=shift(layout.points),
        sums=slice(layout.sums.start - g, layout.sums.start - g),
    )


def _shards(data: Dataset, specs: Mapping[str, InputSpec], total: int, slots: int) -> list[_Shard]:
    """Consecutive shards of the first ``total`` samples, the model's inputs and labels only."""
    size = max(1, min(MAX_SHARD, math.ceil(total / (SHARDS_PER_SLOT * max(slots, 1)))))
    out = []
    for a in range(0, total, size):
        b = min(a + size, total)
        arrays = {name: data.arrays[name][a:b] for name in specs}
        labels = None if data.labels is None else data.labels[a:b]
        out.append(_Shard(a, Dataset(arrays, labels, source=data.source, synthetic=data.synthetic)))
    return out


def run(
    gm: GradientModel,
    data: Dataset,
    specs: Mapping[str, InputSpec],
    options: engine.RunOptions,
    workers: Workers | None = None,
    progress: Progress | None = None,
    extra_outputs: Sequence[str] = (),
) -> engine.FisherTraces:
    """``engine.run`` on ``workers`` (in this process when they are not parallel): the same traces."""
    if workers is None or not workers.parallel:
        return engine.run(gm, data, specs, options, progress, extra_outputs)
    total = data.num_samples if options.max_samples is None else min(options.max_samples, data.num_samples)
    layout = engine.FetchLayout.of(gm, extra_outputs)
    feed = {k: v for k, v in data.sample(0, specs).items() if k in specs}
    zeros, tap_shapes = engine._Shapes(gm, list(specs), options.threads).get(feed)
    act_shapes = {act: z.shape for act, z in zip((a for a, _ in gm.perturbations), zeros.values(), strict=True)}
    enumeration = engine._first_sample_checks(gm, data, specs, tap_shapes[0])  # every label, before any shard
    threads = (options.threads or 1) if workers.ray else threads_per_process(workers.processes, options.threads)
    ctx = _Context(gm, dict(specs), layout, enumeration, options.seed, threads, options.device)
    acc = engine._Accumulator(gm, _scalar_layout(layout), total)
    with Pool(workers, Job(ctx, _setup, _work)) as pool:
        shards = _shards(data, specs, total, pool.slots)
        stop, diag = _merge(pool, shards, acc, options, progress)
    stop = stop or (engine.StopReason.MAX_SAMPLES if total < data.num_samples else engine.StopReason.DATA_EXHAUSTED)
    if gm.grad_outputs or gm.sum_outputs:  # the accumulator holds no arrays of its own: the shards' sums
        acc.diag = list(diag[: len(gm.grad_outputs)])
        acc.sums = list(diag[len(gm.grad_outputs) :])
    traces = acc.result(act_shapes, stop, extra_outputs)
    if traces.samples != (total if stop is not engine.StopReason.TOL else acc.done):
        raise InternalError(f"a parallel run merged {traces.samples} of {total} samples")
    return traces


def _merge(
    pool: Pool, shards: list[_Shard], acc: engine._Accumulator, options: engine.RunOptions, progress: Progress | None
) -> tuple[engine.StopReason | None, tuple[np.ndarray, ...]]:
    """Feed the shards' rows to ``acc`` in sample order, stopping at the first converged sample;
    the stop reason (None: every shard ran) and the Σ of squared gradients over the samples kept."""
    bar = as_progress(progress)
    bar.start(acc.per_sample.shape[0], "Fisher samples")
    results = pool.ordered(shards, on_done=lambda k: bar.advance(shards[k].data.num_samples))
    by_start = {shard.start: shard for shard in shards}
    diag: tuple[np.ndarray, ...] = ()
    for rows in results:
        for j, row in enumerate(rows.scalars):
            acc.add(rows.start + j, row, squared=True)
            if acc.converged(options):
                results.close()  # the shards beyond this sample are cancelled
                if rows.diag and j + 1 < len(rows.scalars):  # the sums must end at this sample too
                    cut = _Shard(rows.start, by_start[rows.start].data.head(j + 1))
                    rows = next(iter(pool.ordered([cut])))
                return engine.StopReason.TOL, _add(diag, rows.diag)
        diag = _add(diag, rows.diag)
    return None, diag


def _add(total: tuple[np.ndarray, ...], more: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return more if not total else tuple(a + b for a, b in zip(total, more, strict=True))
