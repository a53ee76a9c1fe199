"""The per-sample loop of the ``onnx`` engine in batches: one batched backward pass per B samples.

Samples are independent once BatchNormalization is folded, and the loss is a sum over the batch
(every head reduces with a sum), so one backward pass of B samples gives each sample's activation
gradients as they are, and ``autodiff.per_sample_sqnorms`` turns each layer's input and output
gradient into each sample's weight-gradient squared norm — never the square of a batch gradient.

The batched model is the source model prepared again with the batch axis of its inputs fixed to
B (so shape folding sees B, not 1), tapped and given the same loss head as the batch-1 gradient
model. Before it is used, a probe of it on the first batch must give every activation and loss
tap the batch-1 shapes with B in front and, for the batch's first and last sample, the values a
batch-1 run gives; otherwise (a reshape that folds the batch, a fixed batch axis, samples that mix)
the loop runs at batch 1 and the report says why. A partial last batch is padded with copies of its
last sample, whose values are dropped. Statistics are added one sample at a time, so ``--tol``
stops at the same sample as at batch 1, and the per-sample matrix has the same rows.

Format statistics (``fisher.statistics``) run here too: each sample's weight gradient is formed from
the batch's layer input and output gradient (``per_sample_sqnorms``' ``sample_grads``), group and
activation statistics are one row per sample, a weight's g² one float32 total per batch (over the
real samples only for a padded batch, ``statistics.BATCH_MASK``); such a total cannot stop inside a
batch, so ``--tol`` with those runs at batch 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from fitonnx.errors import FitonnxError, ModelError
from fitonnx.fisher import instrument
from fitonnx.fisher.autodiff.per_sample import (
    per_sample_sqnorms,
    sample_grad_name,
    sample_grad_problem,
    weight_readers,
)
from fitonnx.fisher.engine import (
    FetchLayout,
    FisherTraces,
    RunOptions,
    StopReason,
    _Accumulator,
    _first_sample_checks,
    _head_feeds,
    probe_values,
)
from fitonnx.fisher.losses import LOSS
from fitonnx.fisher.statistics import BATCH_MASK, DIAG, NO_STATISTICS, Statistics, add_statistics, masked
from fitonnx.model.data import Dataset
from fitonnx.model.graph import InputSpec, Kind, default_opset
from fitonnx.model.runtime import make_session
from fitonnx.prepare import prepare
from fitonnx.progress import Progress, as_progress

# Samples per batched run when --batch-size is not given (bench/engines.py, BENCHMARKS.md).
DEFAULT_BATCH_SIZE = 8
# Batch and batch-1 probe values of one sample agree to float32 rounding of different kernels.
PROBE_RTOL = 1e-3


@dataclass(frozen=True)
class BatchedModel:
    """The batched gradient model: per-sample [B] outputs in the batch-1 model's fetch layout."""

    model_bytes: bytes
    batch: int
    layout: FetchLayout
    totals: frozenset[int] = frozenset()  # fetched outputs that are one total over the batch (a weight's g²)
    mask_input: bool = False  # the model reads ``statistics.BATCH_MASK``
    partial: tuple[str, ...] = ()  # what a padded batch fetches: the totals over its real samples only

    def fetch(self, samples: int) -> list[str]:
        """The outputs to fetch for a batch of ``samples`` real samples."""
        return list(self.layout.names if samples == self.batch or not self.partial else self.partial)


def batch_plan(
    gm: instrument.GradientModel,
    data: Dataset,
    specs: Mapping[str, InputSpec],
    batch: int,
    *,
    batched_engine: bool,
    single_only: str | None = None,
) -> tuple[int, str | None]:
    """The batch size the loop can use (1 or ``batch``) and, when it falls back to 1, why.

    ``batched_engine``: the gradient engine runs batches (``onnx``); ``single_only`` names an
    option that needs batch-1 runs (full gradients, grid points), if one is set."""
    if batch <= 1 or data.num_samples < 2:
        return 1, None
    why = None
    if not batched_engine:
        why = "the ort-training engine runs one sample at a time"
    elif single_only is not None:
        why = f"{single_only} needs one sample per run"
    elif gm.head.enumerate_labels:
        why = "--fisher exact runs one pass per class and sample"
    elif any(p is not None and p[0] != 0 for p in (h.perm for h in gm.head.heads)):
        why = "the loss reads an output whose first axis is not the batch"
    else:
        why = _batch_axis_problem(gm, data, specs)
    return (1, why) if why else (batch, None)


def _batch_axis_problem(gm: instrument.GradientModel, data: Dataset, specs: Mapping[str, InputSpec]) -> str | None:
    """Why the samples cannot be stacked on a batch axis 0 of the model's inputs, or None."""
    fixed = [
        (n, s.shape[0] if s.shape else "a scalar") for n, s in specs.items() if not s.shape or s.shape[0] is not None
    ]
    if fixed:
        return f"input {fixed[0][0]!r} has a fixed batch size of {fixed[0][1]}"
    first = {k: v for k, v in data.sample(0, specs).items() if k in specs}
    if gm.head.needs_labels and data.labels is not None:
        first["labels"] = np.asarray(data.sample_labels(0, specs))
    single = [name for name, value in first.items() if value.ndim == 0 or value.shape[0] != 1]
    if single:
        return f"the samples of {single[0]!r} have no batch axis of 1"
    return None


def _batched_shapes(shapes: Mapping[str, tuple[int, ...]], batch: int) -> dict[str, tuple[int, ...]] | None:
    """Per-sample shapes with ``batch`` in front; None if one does not start with a batch axis of 1."""
    out = {}
    for name, shape in shapes.items():
        if not shape or shape[0] != 1:
            return None
        out[name] = (batch, *shape[1:])
    return out


def _stack(feeds: Sequence[Mapping[str, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
    """Per-sample feeds (batch axis of 1) concatenated, padded with copies of the last to ``batch``."""
    padded = [*feeds, *[feeds[-1]] * (batch - len(feeds))]
    return {name: np.concatenate([f[name] for f in padded], axis=0) for name in feeds[0]}


def _sample_feeds(
    gm: instrument.GradientModel,
    data: Dataset,
    specs: Mapping[str, InputSpec],
    indices: Sequence[int],
    rng: np.random.Generator | None,
) -> list[dict[str, np.ndarray]]:
    """Each sample's inputs and (with ``rng``) its head feeds, drawn in sample order as at batch 1."""
    taps = tuple(tuple(gm.sample_shapes[t.tap]) for t in gm.head.targets)
    feeds = []
    for i in indices:
        feed = {k: v for k, v in data.sample(i, specs).items() if k in specs}
        if rng is not None:
            feed |= _head_feeds(gm, data, specs, i, taps, rng)
        feeds.append(feed)
    return feeds


def _probe_matches(
    gm: instrument.GradientModel,
    prepared: onnx.ModelProto,
    data: Dataset,
    specs: Mapping[str, InputSpec],
    batch: int,
    threads: int,
) -> str | None:
    """None if the batched model computes, per sample, what the batch-1 model does; else what differs."""
    probe, names = instrument.build_probe(prepared, gm.activations, [t.tap for t in gm.head.targets])
    rows = list(range(min(batch, data.num_samples)))
    feeds = _sample_feeds(gm, data, specs, rows, None)
    try:
        together = probe_values(probe, names, _stack(feeds, batch), threads)
    except Exception as exc:
        return f"the model does not run at batch {batch} ({str(exc).splitlines()[0][:200]})"
    for row in sorted({rows[0], rows[-1]}):
        alone = probe_values(gm.probe_bytes, names, feeds[row], threads)
        for name in (n for n in names if n not in specs):  # inputs are fed, not computed (and
            # onnxruntime 1.19 returns an input exposed as an output uninitialized at 2 threads)
            a, t = alone[name], together[name]
            if t.shape != (batch, *a.shape[1:]):
                return f"tensor {name!r} has shape {list(t.shape)} at batch {batch}, {list(a.shape)} alone"
            scale = float(np.max(np.abs(a))) if a.size else 0.0
            if not np.allclose(t[row : row + 1], a, rtol=PROBE_RTOL, atol=PROBE_RTOL * scale):
                return f"sample {row} gives other values of {name!r} in a batch than alone (samples mix)"
    return None


def _add_ranges(g: onnx.GraphProto, names: Sequence[str], ranks: Mapping[str, int], opset: int) -> list[str]:
    """Per-sample min and max [B] of each activation (over every axis but the batch); their names."""
    out = []
    for k, name in enumerate(names):
        axes = list(range(1, ranks[name]))
        for op in ("ReduceMin", "ReduceMax"):
            target = f"{name}__batch_{op.lower()}{k}"
            if opset >= 18:
                axes_name = target + "_axes"
                g.initializer.append(helper.make_tensor(axes_name, TensorProto.INT64, [len(axes)], axes))
                g.node.append(helper.make_node(op, [name, axes_name], [target], keepdims=0))
            else:
                g.node.append(helper.make_node(op, [name], [target], axes=axes, keepdims=0))
            out.append(target)
    return out


@dataclass(frozen=True)
class BatchRequest:
    """What ``build`` needs: the source model (prepared again at batch B), the batch-1 twin and
    gradient model, the data, the batch size, the labels' dtype and the onnxruntime threads.

    At batch 1 the twin is used as it is: per-sample norms then only spare the session the full
    weight gradients (a model whose weights are external data would hold a copy of them)."""

    source: onnx.ModelProto
    prepared: onnx.ModelProto  # the batch-1 twin (used as it is at batch 1)
    gm: instrument.GradientModel
    data: Dataset
    specs: Mapping[str, InputSpec]
    batch: int
    labels_dtype: np.dtype | None
    threads: int = 0
    statistics: Statistics = NO_STATISTICS  # the format statistics of ``gm.sum_outputs``


def _add_format_statistics(
    g: onnx.GraphProto, r: BatchRequest, stats: Statistics, zeros: Mapping[str, str], opset: int
) -> list[tuple[str, str]]:
    """``statistics.add_statistics`` on the batched graph from the per-sample gradients; the (key,
    output) pairs, which must be ``gm.sum_outputs``' keys in their order."""
    grads = {t.name: sample_grad_name(zeros.get(t.name, t.name)) for t in r.gm.tensors}
    shapes = instrument.statistic_shapes(r.prepared, r.gm.tensors, r.gm.sample_shapes)
    pairs = add_statistics(g, stats, grads, shapes, opset, batch=r.batch)
    if [k for k, _ in pairs] != [k for k, _ in r.gm.sum_outputs]:
        raise FitonnxError("the batched model's format statistics differ from the batch-1 model's")
    return pairs


def twin(r: BatchRequest) -> onnx.ModelProto | str:
    """The source model prepared again at batch B and checked to compute, per sample, what the
    batch-1 model does (``r.prepared`` itself at batch 1), or why this model must run at batch 1."""
    gm = r.gm
    shapes = _batched_shapes(gm.sample_shapes, r.batch)
    if shapes is None or not all(name in gm.sample_shapes for name in (*r.specs, *gm.probe_outputs)):
        return "the per-sample shapes do not all start with a batch axis of 1"
    weights = [t.name for t in gm.tensors if t.kind is Kind.WEIGHT]
    stats = instrument.scored_statistics(r.statistics, gm.tensors)
    problem = sample_grad_problem(r.prepared, list(dict.fromkeys(x.tensor for x in (*stats.groups, *stats.weighted))))
    if problem:
        return problem
    if r.batch > 1:
        try:  # before the model is prepared and probed at batch B: tied weights fail here, cheaply
            weight_readers(r.prepared, weights, r.batch)
        except FitonnxError as exc:
            return exc.message
    if r.batch == 1:
        prepared = r.prepared
    else:
        has_if = any(node.op_type == "If" for node in r.source.graph.node)
        feeds = [r.data.sample(i, r.specs) for i in range(r.data.num_samples)] if has_if else []
        try:
            prepared = prepare(r.source, input_shapes={n: shapes[n] for n in r.specs}, feeds=feeds).model
        except FitonnxError as exc:
            return f"the model does not prepare at batch {r.batch} ({exc.message})"
        mismatch = _probe_matches(gm, prepared, r.data, r.specs, r.batch, r.threads)
        if mismatch:
            return mismatch
    return prepared


def batches(data: Dataset, specs: Mapping[str, InputSpec], total: int, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """The inputs of the first ``total`` samples stacked ``batch`` at a time (the last batch padded
    with copies of its last sample), for a forward pass of a ``twin`` (e.g. the max|a| calibration)."""
    for start in range(0, total, batch):
        feeds = [
            {k: v for k, v in data.sample(i, specs).items() if k in specs}
            for i in range(start, min(start + batch, total))
        ]
        yield _stack(feeds, batch)


def build(r: BatchRequest, prepared: onnx.ModelProto | None = None) -> BatchedModel | str:
    """The batched gradient model on ``prepared`` (``twin(r)`` when not given), or why this model
    must run at batch 1."""
    gm = r.gm
    if prepared is None:
        found = twin(r)
        if isinstance(found, str):
            return found
        prepared = found
    shapes = _batched_shapes(gm.sample_shapes, r.batch)
    assert shapes is not None  # twin checked it
    weights = [t.name for t in gm.tensors if t.kind is Kind.WEIGHT]
    ranks = {name: len(shape) for name, shape in shapes.items()}
    stats = instrument.scored_statistics(r.statistics, gm.tensors)
    try:
        aug = instrument.augment(prepared, gm.tensors, gm.head, r.labels_dtype, ranks, shapes)
        zeros = [zero for _, zero in aug.perturbations]
        by_act = dict(aug.perturbations)
        own = [by_act.get(name, name) for name in dict.fromkeys(x.tensor for x in (*stats.groups, *stats.weighted))]
        own += [by_act[name] for name in dict.fromkeys(x.tensor for x in (*stats.noise, *stats.blocks))]
        model = per_sample_sqnorms(aug.model, LOSS, weights, zeros, batch=r.batch, sample_grads=own)
        sums = _add_format_statistics(model.graph, r, stats, by_act, default_opset(model)) if stats else []
    except FitonnxError as exc:
        return exc.message
    names = {t.name: t.name for t in gm.tensors} | dict(aug.perturbations)
    sq = [f"{names[t.name]}_sqnorm" for t in gm.tensors]
    ranges = _add_ranges(model.graph, [a.name for a in gm.activations], ranks, default_opset(model))
    del model.graph.output[:]
    fetched = [*sq, *ranges, *(name for _, name in sums)]
    for name in fetched:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    n, m = len(sq), len(sq) + len(ranges)
    empty = slice(m, m)
    layout = FetchLayout(tuple(fetched), slice(0, n), slice(n, m), empty, empty, empty, slice(m, len(fetched)))
    totals = frozenset(m + k for k, (key, _) in enumerate(sums) if key.endswith(DIAG))
    partial = tuple(masked(name) if k in totals else name for k, name in enumerate(fetched))
    model.graph.output.extend(helper.make_empty_tensor_value_info(masked(fetched[k])) for k in sorted(totals))
    return BatchedModel(model.SerializeToString(), r.batch, layout, totals, bool(stats.weighted), partial)


def run(
    bm: BatchedModel,
    gm: instrument.GradientModel,
    data: Dataset,
    specs: Mapping[str, InputSpec],
    options: RunOptions,
    progress: Progress | None = None,
) -> FisherTraces:
    """``engine.run``'s statistics from batched runs: the same rows, the same stopping sample."""
    bar = as_progress(progress)
    session = make_session(bm.model_bytes, options.threads, device=options.device)
    total = data.num_samples if options.max_samples is None else min(options.max_samples, data.num_samples)
    acc = _Accumulator(gm, bm.layout, total)
    rng = np.random.default_rng(options.seed)
    stop_reason = StopReason.MAX_SAMPLES if total < data.num_samples else StopReason.DATA_EXHAUSTED
    zeros = {zero: np.zeros((bm.batch, *gm.sample_shapes[act][1:]), np.float32) for act, zero in gm.perturbations}
    sums = bm.layout.sums.start
    _first_sample_checks(gm, data, specs, tuple(gm.sample_shapes[gm.head.targets[0].tap]))
    bar.start(total, "Fisher samples")
    for start in range(0, total, bm.batch):
        indices = list(range(start, min(start + bm.batch, total)))
        feed = _stack(_sample_feeds(gm, data, specs, indices, rng), bm.batch)
        if bm.mask_input:
            feed[BATCH_MASK] = (np.arange(bm.batch) < len(indices)).astype(np.float32)
        try:
            values = session.run(bm.fetch(len(indices)), {**feed, **zeros})
        except Exception as exc:
            raise ModelError(
                f"onnxruntime failed on samples {indices[0]}-{indices[-1]}: {str(exc).splitlines()[0][:300]}"
            ) from None
        for k in bm.totals:  # a batch total: added once, as len(indices) samples
            acc.running[k - sums].add(values[k], samples=len(indices))
        for j, i in enumerate(indices):
            acc.add(i, [None if k in bm.totals else v[j] for k, v in enumerate(values)], squared=False)
            bar.advance(1)
            if acc.converged(options):
                if bm.totals and i != indices[-1]:
                    raise FitonnxError("a batch total cannot stop inside its batch")  # batch_plan rules it out
                return acc.result(_act_shapes(gm), StopReason.TOL, ())
    return acc.result(_act_shapes(gm), stop_reason, ())


def _act_shapes(gm: instrument.GradientModel) -> dict[str, tuple[int, ...]]:
    return {act: tuple(gm.sample_shapes[act]) for act, _ in gm.perturbations}
