"""Run the gradient model once per calibration sample and accumulate Fisher statistics.

Per-sample squared gradient norms arrive as float64 scalars from the gradient graph and are kept
per sample (an N × T float64 matrix), so traces, standard errors and bootstrap rankings all come
from the same exact per-sample values: Tr(F_t) = (1/N)·Σ_i ‖∂ℓ_i/∂t‖².
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fitonnx.errors import DataError, InternalError, ModelError, UnsupportedError
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import LABELS, Likelihood, OutputTarget, draw_noise
from fitonnx.fisher.statistics import CHUNK, DIAG
from fitonnx.model.data import Dataset
from fitonnx.model.graph import InputSpec, QuantTensor
from fitonnx.model.runtime import make_session
from fitonnx.progress import Progress, as_progress
from fitonnx.values import TextEnum


class StopReason(TextEnum):
    """Why the engine stopped reading samples; a str, so the report's JSON keeps these values."""

    DATA_EXHAUSTED = "data exhausted"
    MAX_SAMPLES = "max-samples"
    TOL = "tol"


@dataclass(frozen=True)
class RunOptions:
    """How many samples to use and when to stop."""

    max_samples: int | None = None
    tol: float | None = None  # stop once the relative standard error of the total trace < tol
    min_samples: int = 16  # never stop on ``tol`` before this many samples
    seed: int = 0
    threads: int = 0  # 0: onnxruntime's default (all cores)
    device: str = "cpu"  # where the gradient session runs (``model.runtime.DEVICES``)


@dataclass(frozen=True)
class PointTraces:
    """Per-sample Fisher mass of the elements equal to 0, to the tensor's min or to its max.

    Each array is [samples, tensors] float64, ‖g_i ⊙ 1[t_i = v]‖² with v the tensor's min/max over
    all calibration samples (zero for a sample that does not reach it): what the grid noise model
    subtracts from the trace for values the quantization grid represents exactly.
    """

    zero: np.ndarray
    at_min: np.ndarray
    at_max: np.ndarray


@dataclass(frozen=True)
class FisherTraces:
    """What the engine measured: per-sample squared norms and activation ranges."""

    tensors: tuple[QuantTensor, ...]
    per_sample: np.ndarray  # [samples, tensors] float64: ‖∂ℓ_i/∂t‖²
    act_min: Mapping[str, float]
    act_max: Mapping[str, float]
    act_shapes: Mapping[str, tuple[int, ...]]  # per-sample activation shape seen on the first sample
    stop_reason: StopReason
    diag: Mapping[str, np.ndarray] | None = None  # Σ_i (∂ℓ_i/∂t)² / N, if requested
    extra: Mapping[str, np.ndarray] | None = None  # per-sample values of ``extra_outputs``, if requested
    points: PointTraces | None = None  # if the gradient model has ``point_outputs``
    targets: tuple[OutputTarget, ...] = ()  # the outputs of the loss and how each was read
    notes: tuple[str, ...] = ()  # the gradient model's notes on the loss (``GradientModel.notes``)
    batch_size: int = 1  # samples per run (``fisher.batched``)
    batch_note: str = ""  # why the run is at batch 1 when a larger batch was asked for ("" otherwise)
    engine: str = ""  # the gradient engine that computed them (``fisher.engines``)
    device: str = "cpu"
    # Mean over samples of ``GradientModel.sum_outputs``, by key (a weight's g², ``statistics.diag_key``,
    # summed: ``fisher_traces`` replaces it with its weighted statistics).
    sums: Mapping[str, np.ndarray] | None = None

    @property
    def samples(self) -> int:
        return int(self.per_sample.shape[0])

    def trace(self) -> np.ndarray:
        return self.per_sample.mean(axis=0)

    def trace_se(self) -> np.ndarray:
        n = self.samples
        if n < 2:
            return np.full(self.per_sample.shape[1], np.nan)
        return self.per_sample.std(axis=0, ddof=1) / np.sqrt(n)


def probe_values(
    probe_bytes: bytes, outputs: Sequence[str], feed: Mapping[str, np.ndarray], threads: int = 0
) -> dict[str, np.ndarray]:
    """Run the probe model once and return each exposed tensor."""
    values = make_session(probe_bytes, threads).run(list(outputs), dict(feed))
    return {name: np.asarray(v) for name, v in zip(outputs, values, strict=True)}


def probe_shapes(
    probe_bytes: bytes, outputs: Sequence[str], feed: Mapping[str, np.ndarray], threads: int = 0
) -> dict[str, tuple[int, ...]]:
    """Run the probe model once and return the shape of each exposed tensor."""
    return {name: v.shape for name, v in probe_values(probe_bytes, outputs, feed, threads).items()}


TapShapes = tuple[tuple[int, ...], ...]  # the shape of each loss tap, order of ``head.heads``


class _Shapes:
    """Zero inputs and noise shapes per input-shape signature, found by running the probe model."""

    def __init__(self, gm: GradientModel, inputs: Sequence[str], threads: int) -> None:
        self.gm = gm
        self.threads = threads
        self.probe = None  # created on the first sample whose shapes the build did not measure
        self.cache: dict[tuple, tuple[dict[str, np.ndarray], TapShapes]] = {}
        known = gm.sample_shapes
        if all(name in known for name in (*inputs, *gm.probe_outputs)):
            key = tuple(sorted((name, tuple(known[name])) for name in inputs))
            self.cache[key] = self._entry(known)

    def _entry(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], TapShapes]:
        zeros = {zero: np.zeros(shapes[act], np.float32) for act, zero in self.gm.perturbations}
        return zeros, tuple(tuple(shapes[t.tap]) for t in self.gm.head.targets)

    def get(self, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], TapShapes]:
        key = tuple(sorted((k, tuple(v.shape)) for k, v in feed.items()))
        if key not in self.cache:
            if self.probe is None:
                self.probe = make_session(self.gm.probe_bytes, self.threads)
            values = self.probe.run(list(self.gm.probe_outputs), dict(feed))
            shapes = {name: np.asarray(v).shape for name, v in zip(self.gm.probe_outputs, values, strict=True)}
            self.cache[key] = self._entry(shapes)
        return self.cache[key]


@dataclass(frozen=True)
class FetchLayout:
    """Which outputs of the gradient model one run fetches, and where each group sits in the result.

    Order: squared norms (one per tensor), activation (min, max) pairs, full gradients, the caller's
    extra outputs, the grid model's point statistics (three per tensor), then the format statistics."""

    names: tuple[str, ...]
    sqnorms: slice
    ranges: slice
    grads: slice
    extra: slice
    points: slice
    sums: slice

    @classmethod
    def of(cls, gm: GradientModel, extra_outputs: Sequence[str] = ()) -> FetchLayout:
        groups = [
            list(gm.sqnorm_outputs),
            [name for pair in gm.range_outputs for name in pair],
            list(gm.grad_outputs),
            list(extra_outputs),
            [name for triple in gm.point_outputs for name in triple],
            [name for _, name in gm.sum_outputs],
        ]
        bounds = np.cumsum([0, *map(len, groups)]).tolist()
        cuts = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        return cls(tuple(n for g in groups for n in g), *cuts)


class RunningSum:
    """Σ over samples of one format statistic in float64. A float32 array (a weight's g²) is summed in
    float32 over runs of at most ``CHUNK`` samples first, as the graph sums elements (half the memory
    traffic of a float64 sum per sample, ≤ CHUNK·2⁻²⁴ relative); anything else in float64 directly."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.part: np.ndarray | None = None  # float32 partial sum of the current run
        self.run = 0

    def add(self, value: Any, samples: int = 1) -> None:
        """Add one sample's value, or (``samples`` > 1) a float32 total over that many samples."""
        v = np.asarray(value)
        if v.dtype == np.float32 and v.ndim:
            if self.run + samples > CHUNK:
                self._flush()
            if self.part is None:
                self.part = np.array(v)
            else:
                np.add(self.part, v, out=self.part)
            self.run += samples
            if self.run == CHUNK:
                self._flush()
        elif self.total is None:
            self.total = np.array(v, np.float64)
        else:
            np.add(self.total, v, out=self.total)

    def _flush(self) -> None:
        if self.part is not None:
            self.total = self.part.astype(np.float64) if self.total is None else self.total + self.part
        self.part, self.run = None, 0

    def value(self) -> np.ndarray:
        """The sum so far: float64, or the float32 partial sum itself when no run has ended (its
        float64 value is the same; the caller's float64 arithmetic converts it)."""
        if self.total is None and self.part is not None:
            return self.part
        self._flush()
        assert self.total is not None
        return self.total


class _Accumulator:
    """Per-sample rows of every fetched statistic, and the running sums the stop rule reads."""

    def __init__(self, gm: GradientModel, layout: FetchLayout, total: int) -> None:
        self.gm, self.layout = gm, layout
        n_act = len(gm.activations)
        self.per_sample = np.zeros((total, len(gm.tensors)), np.float64)
        self.lo, self.hi = np.full(n_act, np.inf), np.full(n_act, -np.inf)
        self.act_lo, self.act_hi = np.zeros((total, n_act)), np.zeros((total, n_act))
        self.extra = np.zeros((total, layout.extra.stop - layout.extra.start))
        self.points = np.zeros((total, layout.points.stop - layout.points.start))
        self.diag: list[np.ndarray] = [np.zeros(0)] * len(gm.grad_outputs)
        self.running = [RunningSum() for _ in range(layout.sums.stop - layout.sums.start)]
        self.sums: list[np.ndarray] | None = None  # float64 sums, set by a parallel run's merge
        self.done, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, i: int, values: Sequence[Any], squared: bool) -> None:
        """Record sample ``i``; ``squared``: the full gradients arrive already squared (enumerated labels)."""
        lay = self.layout
        row = np.array(values[lay.sqnorms], dtype=np.float64)
        if not np.all(np.isfinite(row)):
            bad = self.gm.tensors[int(np.argmin(np.isfinite(row)))].name
            raise ModelError(
                f"expected finite gradients; sample {i} gives a non-finite gradient for {bad!r}",
                hint="check the sample for extreme values or the model for overflow",
            )
        self.per_sample[i] = row
        if self.gm.activations:
            ranges = np.array(values[lay.ranges], dtype=np.float64).reshape(-1, 2)
            np.minimum(self.lo, ranges[:, 0], out=self.lo)
            np.maximum(self.hi, ranges[:, 1], out=self.hi)
            self.act_lo[i], self.act_hi[i] = ranges[:, 0], ranges[:, 1]
        self.extra[i] = np.array(values[lay.extra], dtype=np.float64)
        self.points[i] = np.array(values[lay.points], dtype=np.float64)
        for k, grad in enumerate(values[lay.grads]):
            sq = np.asarray(grad, np.float64) if squared else np.square(np.asarray(grad, np.float64))
            self.diag[k] = sq if i == 0 else self.diag[k] + sq
        for total, value in zip(self.running, values[lay.sums], strict=True):
            if value is not None:  # None: a batch total, added by the batched loop
                total.add(value)
        self.done = i + 1
        total = row.sum()
        self.s1 += total
        self.s2 += total * total

    def _sums(self) -> list[np.ndarray]:
        return self.sums if self.sums is not None else [r.value() for r in self.running]

    def converged(self, options: RunOptions) -> bool:
        """The relative standard error of the total trace is below ``options.tol``."""
        n = self.done
        if options.tol is None or n < max(options.min_samples, 2):
            return False
        mean = self.s1 / n
        var = max(self.s2 / n - mean * mean, 0.0) * n / (n - 1)
        return bool(mean > 0 and np.sqrt(var / n) / mean < options.tol)

    def result(self, act_shapes: Mapping[str, tuple[int, ...]], stop_reason: StopReason, extra_outputs: Sequence[str]):
        gm, n = self.gm, self.done
        names = [a.name for a in gm.activations]
        return FisherTraces(
            targets=gm.head.targets,
            notes=gm.notes,
            tensors=gm.tensors,
            per_sample=self.per_sample[:n],
            act_min=dict(zip(names, self.lo.tolist(), strict=True)),
            act_max=dict(zip(names, self.hi.tolist(), strict=True)),
            act_shapes=act_shapes,
            stop_reason=stop_reason,
            diag=({t.name: d / n for t, d in zip(gm.tensors, self.diag, strict=True)} if gm.grad_outputs else None),
            extra=({name: self.extra[:n, k] for k, name in enumerate(extra_outputs)} if extra_outputs else None),
            points=(
                _point_traces(gm, self.points[:n], self.act_lo[:n], self.act_hi[:n], self.lo, self.hi)
                if self.points.shape[1]
                else None
            ),
            sums={
                # a weight's g² stays a total: finish_weighted divides its products
                key: s if key.endswith(DIAG) else np.divide(s, n, dtype=np.float64)
                for (key, _), s in zip(gm.sum_outputs, self._sums(), strict=True)
            }
            if gm.sum_outputs
            else None,
        )


def run(
    gm: GradientModel,
    data: Dataset,
    specs: Mapping[str, InputSpec],
    options: RunOptions,
    progress: Progress | None = None,
    extra_outputs: Sequence[str] = (),
) -> FisherTraces:
    """Forward+backward once per sample; stop at ``max_samples``, on ``tol``, or when data ends.

    ``extra_outputs`` names scalar outputs a caller added to the gradient model (e.g. per-sample
    statistics that need an activation and its gradient together); their per-sample values are
    returned in ``FisherTraces.extra``.

    With an enumerating head (``--fisher exact``) each sample runs once per class c with label c,
    and every per-sample statistic except the activation ranges is Σ_c p_c·(value for label c),
    p_c = exp(−ℓ_c) normalized to sum 1.
    """
    bar = as_progress(progress)
    session = make_session(gm.model_bytes, options.threads, device=options.device)
    shapes = _Shapes(gm, list(specs), options.threads)
    total = data.num_samples if options.max_samples is None else min(options.max_samples, data.num_samples)
    layout = FetchLayout.of(gm, extra_outputs)
    acc = _Accumulator(gm, layout, total)
    rng = np.random.default_rng(options.seed)
    stop_reason = StopReason.MAX_SAMPLES if total < data.num_samples else StopReason.DATA_EXHAUSTED
    act_shapes: dict[str, tuple[int, ...]] = {}
    enumeration: tuple[tuple[int, ...], int] | None = None  # (label shape, classes) for an enumerating head
    bar.start(total, "Fisher samples")
    for i in range(total):
        feed = {k: v for k, v in data.sample(i, specs).items() if k in specs}
        zeros, tap_shapes = shapes.get(feed)
        if i == 0:
            act_shapes = {act: z.shape for act, z in zip((a for a, _ in gm.perturbations), zeros.values(), strict=True)}
            enumeration = _first_sample_checks(gm, data, specs, tap_shapes[0])
        run_feed = {**feed, **zeros, **_head_feeds(gm, data, specs, i, tap_shapes, rng)}
        acc.add(i, _run_one(session, layout, run_feed, enumeration, gm, i), squared=enumeration is not None)
        bar.advance(1)
        if acc.converged(options):
            stop_reason = StopReason.TOL
            break
    return acc.result(act_shapes, stop_reason, extra_outputs)


def _first_sample_checks(
    gm: GradientModel, data: Dataset, specs: Mapping[str, InputSpec], tap_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], int] | None:
    """Check the labels against the output's real shape; the enumeration of an exact-Fisher head."""
    head = gm.head
    if head.needs_labels:
        _check_labels(data, data.sample_labels(0, specs), head.target.likelihood, tap_shape, head.perm)
    if not head.enumerate_labels:
        return None
    if gm.loss_output is None:
        raise InternalError("an enumerating head needs the loss as an output")
    return _enumeration(tap_shape, head.perm, head.target.likelihood)


def _head_feeds(
    gm: GradientModel,
    data: Dataset,
    specs: Mapping[str, InputSpec],
    i: int,
    tap_shapes: TapShapes,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The loss head's own inputs for sample ``i``: its labels, or the noise each MC head samples from
    (drawn in the order of the heads, so a one-output loss draws exactly as before)."""
    head = gm.head
    feeds: dict[str, np.ndarray] = {}
    if head.needs_labels:
        feeds[LABELS] = data.sample_labels(i, specs)
    for part, tap_shape in zip(head.heads, tap_shapes, strict=True):
        if part.noise is not None:
            feeds[part.noise_input] = draw_noise(part.noise, part.noise_shape(tap_shape), rng)
    return feeds


def _run_one(
    session: Any,
    layout: FetchLayout,
    feed: dict[str, np.ndarray],
    enumeration: tuple[tuple[int, ...], int] | None,
    gm: GradientModel,
    i: int,
) -> list[Any]:
    """One sample's fetched values (expected over the labels for an enumerating head)."""
    try:
        if enumeration is None or gm.loss_output is None:
            return session.run(list(layout.names), feed)
        return _expected_over_labels(
            session, list(layout.names), feed, enumeration, gm.loss_output, layout.ranges, layout.grads
        )
    except Exception as exc:
        raise ModelError(f"onnxruntime failed on sample {i}: {str(exc).splitlines()[0][:300]}") from None


def _enumeration(
    tap_shape: tuple[int, ...], perm: tuple[int, ...] | None, likelihood: Likelihood = Likelihood.CATEGORICAL
) -> tuple[tuple[int, ...], int]:
    """Label shape and class count of a categorical output holding one class distribution per sample,
    or a Bernoulli output holding one probability (labels 0 and 1) (``--fisher exact``; more
    positions would need one pass per class and position)."""
    if likelihood is Likelihood.BERNOULLI:
        if int(np.prod(tap_shape, dtype=np.int64)) != 1:
            raise UnsupportedError(
                f"expected one probability per sample for --fisher exact; found output shape {list(tap_shape)}",
                hint="use --fisher mc",
            )
        return tuple(tap_shape), 2
    shape = tap_shape if perm is None else tuple(tap_shape[i] for i in perm)
    labels = (shape[0], *shape[2:]) if len(shape) >= 2 else (0,)
    if int(np.prod(labels, dtype=np.int64)) != 1:
        raise UnsupportedError(
            f"expected one class distribution per sample for --fisher exact; found output shape {list(shape)}",
            hint="use --fisher mc",
        )
    return labels, int(shape[1])


def _expected_over_labels(
    session: Any,
    fetch: list[str],
    feed: dict[str, np.ndarray],
    enumeration: tuple[tuple[int, ...], int],
    loss: str,
    keep: slice,
    square: slice,
) -> list[np.ndarray]:
    """Σ_c p_c·values(label c), p_c = exp(−ℓ_c) normalized, over the classes c of the output: the
    exact true Fisher's statistics. Values in ``keep`` do not depend on the label and are taken as
    they are; the full gradients in ``square`` are squared before weighting (Σ_c p_c·g_c²)."""
    labels_shape, classes = enumeration
    runs = [session.run([*fetch, loss], {**feed, LABELS: np.full(labels_shape, c, np.int64)}) for c in range(classes)]
    p = np.exp(-np.array([float(r[-1]) for r in runs], np.float64))
    p /= p.sum()
    out: list[np.ndarray] = []
    for k in range(len(fetch)):
        if keep.start <= k < keep.stop:
            out.append(np.asarray(runs[0][k]))
            continue
        power = 2 if square.start <= k < square.stop else 1
        out.append(sum(pc * np.asarray(r[k], np.float64) ** power for pc, r in zip(p, runs, strict=True)))
    return out


def _point_traces(
    gm: GradientModel, values: np.ndarray, act_lo: np.ndarray, act_hi: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> PointTraces:
    """Per-sample point statistics, at_min/at_max kept only where the sample reaches the global extreme."""
    zero, at_min, at_max = (values[:, k::3].copy() for k in range(3))
    column = {t.name: j for j, t in enumerate(gm.tensors)}
    for a, act in enumerate(gm.activations):
        j = column[act.name]
        at_min[:, j] *= act_lo[:, a] == lo[a]
        at_max[:, j] *= act_hi[:, a] == hi[a]
    return PointTraces(zero=zero, at_min=at_min, at_max=at_max)


def _check_labels(
    data: Dataset, first: np.ndarray, likelihood: Likelihood, tap_shape: tuple[int, ...], perm: tuple[int, ...] | None
) -> None:
    """Labels must match the output: class indices in range, or values shaped like the output."""
    labels = data.labels
    if labels is None:
        return
    if likelihood is Likelihood.CATEGORICAL:
        shape = tap_shape if perm is None else tuple(tap_shape[i] for i in perm)
        classes = shape[1]
        expected = (shape[0], *shape[2:])
        if tuple(first.shape) != expected:
            raise DataError(
                f"expected class-index labels of shape {list(expected)} per sample (the output without its "
                f"class axis); found {list(first.shape)}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"expected integer class labels for a categorical output; found {labels.dtype}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= classes:
            raise DataError(
                f"expected class labels in [0, {classes - 1}] for an output with {classes} classes; "
                f"found values in [{lo}, {hi}]"
            )
        return
    if first.size != int(np.prod(tap_shape)):
        raise DataError(
            f"expected labels shaped like the output, {list(tap_shape)} per sample; found {list(first.shape)}"
        )
    if likelihood is Likelihood.BERNOULLI and (labels.min() < 0 or labels.max() > 1):
        raise DataError(
            f"expected labels in [0, 1] for a sigmoid output; found values in [{labels.min()}, {labels.max()}]"
        )
