"""Allocation over quantization formats: one format of the target's menu per tensor, exact storage costs.

``recommend --formats``: each weight's candidates are the formats its toolchain stores it in
(``Target.menu``: per tensor, per output channel, per block, FP8, NVFP4, ...), each with its FIT
(``score.formats_fit``: Σ_j F_jj · E[δ_j²](f) from the per-element Fisher diagonal) and its exact
storage in bits, scales and zero points included (``formats.storage_bits``). The same exact
multiple-choice knapsack as for bit widths (``knapsack.pareto_front``) gives the front of FIT
against those sizes, so ``--avg-bits`` and ``--size-kb`` count the scales too.

A per-channel or per-block format applies only where the weight's op gives it an axis (Conv,
ConvTranspose, Gemm, MatMul) and, per block, where the axis divides into whole blocks; elsewhere
the weight gets the format's per-tensor twin, as the toolchain would keep it.

Activations take the target's activation menu (``FormatMenu.all_activations``: per-tensor formats
and, where the toolchain blocks them at run time, MX/NVFP4 blocks). They are not stored, so, as
for bit widths (``knapsack.allocate``), they do not count toward the weight budget: one format for
all (``act_format``, default the target's; a block format only where it applies, the others stay
float), or with ``act_avg_bits`` their own exact allocation over the candidates (``act_format`` a
tuple, default the whole menu) under an average of bits per activation element, block scales
counted. Their FIT is the score's in-graph per-sample statistic (Σ g²·E[δ²](a): FP8/FP16 per
tensor, MX/NVFP4 blocks) and, for integer grids only, the range model Tr(F)·Δ²/12
(``ACTIVATION_FIT_MODELS``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from fitonnx.allocate.knapsack import (
    ActivationChoice,
    Allocation,
    Budget,
    BudgetKind,
    Front,
    Item,
    UniformConfig,
    make_allocation,
    pareto_front,
    pick,
    weight_bytes,
)
from fitonnx.allocate.recommendation import ParetoPoint
from fitonnx.allocate.targets import Target, activation_format_fit, get_target
from fitonnx.errors import FitonnxError
from fitonnx.formats import Format, Granularity, get_format, parse_format, storage_bits
from fitonnx.formats.block_nodes import is_dynamic_block
from fitonnx.model.graph import Kind, QuantTensor
from fitonnx.score.fit import ScoreReport, TensorScore
from fitonnx.score.formats_fit import WeightFormatFit, applies

WEIGHT_SLOT = 1  # Conv/Gemm/MatMul read their weight at input 1


@dataclass(frozen=True)
class FormatOptions:
    """What ``allocate_formats`` may choose from: the target's menu, optionally restricted."""

    target: str
    weight_formats: tuple[str, ...] | None = None  # None: the target's menu
    # every activation in this format (None: the target's default); with act_avg_bits, the candidates
    act_format: str | tuple[str, ...] | None = None
    act_avg_bits: float | None = None  # or an exact allocation of activation formats under this average
    tolerance: float = 0.0

    def check(self) -> Target:
        """The target, once every format named is known and on its menu."""
        target = get_target(self.target)
        menu = target.format_menu()
        offered = {f.name for f in menu.all_weight_formats()}
        for name in self.weight_formats or ():
            fmt = parse_format(name)
            if fmt.name not in offered:
                raise FitonnxError(
                    f"expected weight formats among target {target.name!r}'s {', '.join(sorted(offered))}; "
                    f"found {name!r}"
                )
        self.activation_choices(target)
        return target

    def activation_choices(self, target: Target) -> tuple[tuple[str, ...], str | None]:
        """The candidate activation formats and the one fixed format (None under ``act_avg_bits``)."""
        menu = target.format_menu()
        picked = self._activation_names(target)
        if self.act_avg_bits is None:
            if picked is not None and len(picked) > 1:
                raise FitonnxError(
                    f"expected one --act-format for every activation; found {','.join(picked)}",
                    hint="several formats are candidates only with --act-avg-bits (an average over activation elements)",
                )
            fixed = menu.default_activation if picked is None else picked[0]
            return (fixed,), fixed
        candidates = picked or menu.all_activations()
        narrowest = min(get_format(n).bits for n in candidates)
        if not math.isfinite(self.act_avg_bits) or self.act_avg_bits < narrowest:
            raise FitonnxError(
                f"expected --act-avg-bits of at least {narrowest} (the narrowest candidate activation format); "
                f"found {self.act_avg_bits:g}"
            )
        return candidates, None

    def _activation_names(self, target: Target) -> tuple[str, ...] | None:
        """The registry names of ``act_format`` (None when not given), each on the target's menu."""
        if self.act_format is None:
            return None
        raw = (self.act_format,) if isinstance(self.act_format, str) else self.act_format
        names = tuple(dict.fromkeys(parse_format(n).name for n in raw))
        offered = target.format_menu().all_activations()
        for name in names:
            if name not in offered:
                raise FitonnxError(
                    f"expected activation formats among target {target.name!r}'s {', '.join(offered)}; found {name!r}"
                )
        return names


def per_tensor_twin(fmt: Format) -> Format | None:
    """The per-tensor format a toolchain falls back to for a weight without the format's axis."""
    if fmt.granularity is Granularity.TENSOR:
        return fmt
    try:
        return Format(fmt.element, fmt.bits, Granularity.TENSOR, None, fmt.scale, fmt.range_method)
    except FitonnxError:
        return None  # MX/NVFP4 exist only in blocks


def requested_activation_formats(options: FormatOptions) -> tuple[Format, ...]:
    """The formats the activations' FIT is needed for (``score_session(activation_formats=...)``)."""
    return tuple(get_format(n) for n in options.activation_choices(options.check())[0])


def requested_formats(target: Target, restrict: Sequence[str] | None = None) -> tuple[Format, ...]:
    """Every format the weights' FIT is needed for: the menu (or ``restrict``) and the per-tensor twins."""
    menu = [parse_format(n) for n in restrict] if restrict else list(target.format_menu().all_weight_formats())
    twins = [t for f in menu if (t := per_tensor_twin(f)) is not None]
    return tuple(dict.fromkeys([*menu, *twins]))


def _weight_ops(model: onnx.ModelProto) -> dict[str, frozenset[str]]:
    ops: dict[str, set[str]] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            ops.setdefault(name, set()).add(node.op_type if slot == WEIGHT_SLOT else f"{node.op_type}:{slot}")
    return {k: frozenset(v) for k, v in ops.items()}


def weight_items(
    model: onnx.ModelProto,
    tensors: Sequence[TensorScore | QuantTensor],
    fits: Sequence[WeightFormatFit],
    target: Target,
    options: FormatOptions,
) -> list[Item]:
    """Each weight's candidate formats with FIT (the noise model's expected value) and exact storage."""
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    ops = _weight_ops(model)
    allowed = None if options.weight_formats is None else {parse_format(n).name for n in options.weight_formats}
    by_weight: dict[str, dict[str, WeightFormatFit]] = {}
    for f in fits:
        by_weight.setdefault(f.name, {})[f.format] = f
    items = []
    for t in tensors:
        if t.kind is not Kind.WEIGHT:
            continue
        rows = by_weight.get(t.name, {})
        menu = target.format_menu().weight_formats(ops.get(t.name, frozenset()))
        wanted = [f for f in menu if allowed is None or f.name in allowed]
        chosen: dict[str, WeightFormatFit] = {}
        for fmt in wanted:
            row = rows.get(fmt.name)
            twin = per_tensor_twin(fmt)
            if row is None and twin is not None and twin in menu:  # only a twin the toolchain offers
                row = rows.get(twin.name)
            if row is not None:
                chosen.setdefault(row.format, row)
        if not chosen:
            continue  # no format of the menu applies: the weight stays in float, as the toolchain leaves it
        formats = [parse_format(n) for n in chosen]
        items.append(
            Item(
                t.name,
                t.numel,
                tuple(f.bits for f in formats),
                tuple(float(r.expected) for r in chosen.values()),
                tuple(storage_bits(f, shapes[t.name], r.axis) for f, r in zip(formats, chosen.values(), strict=True)),
                tuple(chosen),
            )
        )
    return items


def least_storage(model: onnx.ModelProto, tensors: Sequence[QuantTensor], options: FormatOptions) -> tuple[int, int]:
    """The smallest exact storage in bits (scales and zero points included) the weights among
    ``tensors`` of the prepared ``model`` can take on the menu, and their element count: each weight
    in its smallest candidate, the candidates ``allocate_formats`` will have (before any scoring)."""
    target = options.check()
    weights = [t for t in tensors if t.kind is Kind.WEIGHT]
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    candidates = [
        WeightFormatFit(t.name, fmt.name, axis, 0.0, math.nan)
        for t in weights
        for fmt in requested_formats(target, options.weight_formats)
        for ok, axis in [applies(model, t, fmt, shapes[t.name])]
        if ok
    ]
    items = weight_items(model, weights, candidates, target, options)
    return sum(min(item.sizes) for item in items), sum(item.numel for item in items)


def _front_points(front: Front, activation_fit: float, indices: np.ndarray) -> tuple[ParetoPoint, ...]:
    total = sum(item.numel for item in front.items)
    return tuple(
        ParetoPoint(
            weight_bytes=weight_bytes(int(front.sizes[i])),
            avg_weight_bits=float(front.sizes[i]) / total if total else 0.0,
            fit=float(front.fits[i]) + activation_fit,
            weight_bits=front.config(int(i)),
            weight_formats=front.formats(int(i)),
        )
        for i in np.asarray(indices, np.int64).tolist()
    )


def _uniform(items: Sequence[Item], activation_fit: float) -> tuple[UniformConfig, ...]:
    """Every weight in one format, for the formats every weight can take."""
    common = set(items[0].formats).intersection(*(set(it.formats) for it in items[1:]))
    out = []
    for name in sorted(common, key=lambda n: (get_format(n).bits, n)):
        k = [it.formats.index(name) for it in items]
        size = sum(it.sizes[j] for it, j in zip(items, k, strict=True))
        fit = sum(it.fit[j] for it, j in zip(items, k, strict=True)) + activation_fit
        out.append(UniformConfig(get_format(name).bits, weight_bytes(size), fit, format=name, size_bits=size))
    return tuple(out)


def allocate_formats(
    report: ScoreReport,
    model: onnx.ModelProto,
    fits: Sequence[WeightFormatFit],
    budget: Budget,
    options: FormatOptions,
) -> Allocation:
    """Per-tensor formats for ``options.target`` under ``budget``; ``model`` is the scored (prepared)
    model the ``fits`` (``score.formats_fit.weight_fits`` of ``format_fits``) were computed on."""
    target = options.check()
    w_items = weight_items(model, report.tensors, fits, target, options)
    if not w_items:
        raise FitonnxError(f"expected quantizable weights in {report.model}; found none")
    a_items = activation_items(report, model, target, options.activation_choices(target)[0])
    a_formats, a_fit = choose_activations(a_items, options, target)
    front = pareto_front(w_items, options.tolerance)
    chosen = pick(front, budget, fit_offset=a_fit)
    per_format: dict[str, Mapping[str, float]] = {
        it.name: dict(zip(it.formats, it.fit, strict=True)) for it in [*w_items, *a_items]
    }
    a_bits = {name: get_format(f).bits for name, f in a_formats.items()}
    activations = ActivationChoice(a_bits, a_fit, options.act_avg_bits)
    return make_allocation(
        report,
        target,
        budget,
        front,
        chosen,
        activations,
        _uniform(w_items, a_fit),
        _front_points,
        weight_formats=front.formats(chosen.index),
        activation_formats=a_formats,
        fit_per_format=per_format,
        activation_fit_models={name: fit_model(get_format(f)) for name, f in a_formats.items()},
    )


IN_GRAPH = "in-graph"  # the score's per-sample Σ g²·E[δ²](a), summed in the gradient graph
RANGE = "range"  # Tr(F)·Δ²/12 from the calibrated range (integer grids)
ACTIVATION_FIT_MODELS = (IN_GRAPH, RANGE)


def fit_model(fmt: Format) -> str:
    """Where an activation's FIT under ``fmt`` comes from (``ACTIVATION_FIT_MODELS``)."""
    return RANGE if fmt.is_int else IN_GRAPH


def _activation_fit(t: TensorScore, fmt: Format) -> float | None:
    """FIT of activation ``t`` under ``fmt`` (None where a block format does not apply to it)."""
    row = t.formats.get(fmt.name)
    if row is not None:
        return float(row.expected)
    if is_dynamic_block(fmt):
        return None
    if fmt.is_int:
        return activation_format_fit(fmt, t.ef_trace, t.min, t.max)
    raise FitonnxError(
        f"expected the score report to hold activation {t.name!r} under {fmt.name} (score with that format); found none"
    )


def activation_items(report: ScoreReport, model: onnx.ModelProto, target: Target, names: Sequence[str]) -> list[Item]:
    """Each activation's candidates among ``names``: per-tensor formats everywhere, block formats
    where the target's ``dynamic`` rule admits the activation; sizes in bits per sample, block
    scales included (``FormatFit.bits``). An activation without a candidate stays float."""
    dynamic = target.format_menu().dynamic
    ops = _reader_ops(model)
    items = []
    for t in (t for t in report.tensors if t.kind is Kind.ACTIVATION):
        cands: dict[str, tuple[float, int]] = {}
        for fmt in (get_format(n) for n in names):
            fit = _activation_fit(t, fmt)
            if fit is None or not math.isfinite(fit):
                continue  # an fp16 overflow is no candidate
            if is_dynamic_block(fmt):
                row = t.formats[fmt.name]
                if dynamic is None or not dynamic.admits(
                    ops.get(t.name, frozenset()), t.shape, row.axis, fmt.block_size or 1
                ):
                    continue
                cands[fmt.name] = (fit, round(t.numel * row.bits))
            else:
                cands[fmt.name] = (fit, t.numel * fmt.bits)
        if cands:
            formats = tuple(cands)
            bits = tuple(get_format(n).bits for n in formats)
            fits, sizes = zip(*cands.values(), strict=True)
            items.append(Item(t.name, t.numel, bits, tuple(fits), tuple(sizes), formats))
    return items


def _reader_ops(model: onnx.ModelProto) -> dict[str, frozenset[str]]:
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return {k: frozenset(v) for k, v in readers.items()}


def choose_activations(items: Sequence[Item], options: FormatOptions, target: Target) -> tuple[dict[str, str], float]:
    """The activations' formats and their total FIT: the fixed format where it applies, or the exact
    allocation under ``act_avg_bits`` (average bits over the elements of the activations quantized)."""
    _, fixed = options.activation_choices(target)
    if fixed is None:
        if not items:
            raise FitonnxError("expected quantizable activations for --act-avg-bits; found none")
        front = pareto_front(items, options.tolerance)
        chosen = pick(front, Budget(BudgetKind.AVG_BITS, float(options.act_avg_bits or 0)), what="activations")
        return front.formats(chosen.index), chosen.fit
    formats = {it.name: fixed for it in items if fixed in it.formats}
    fit = sum(it.fit[it.formats.index(fixed)] for it in items if fixed in it.formats)
    return formats, float(fit)
