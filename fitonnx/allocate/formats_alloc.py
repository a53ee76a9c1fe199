"""Allocation over quantization formats: one format of the target's menu per tensor, exact storage costs.

``recommend --formats``: each weight's candidates are the formats its toolchain stores it in
(``Target.menu``: per tensor, per output channel, per block, FP8, NVFP4, ...), each with its FIT
(``score.formats_fit``: Σ_j F_jj · E[δ_j²](f) from the per-element Fisher diagonal) and its exact
storage in bits, scales and zero points included (``formats.storage_bits``). The same exact
multiple-choice knapsack as for bit widths (``knapsack.pareto_front``) gives the front of FIT
against those sizes, so ``--avg-bits`` and ``--size-kb`` count the scales too.

A per-channel or per-block format applies only where the weight's op gives it an axis (Conv,
ConvTranspose, Gemm, MatMul) and, per block, where the axis divides into whole blocks; elsewhere
the weight gets the format's per-tensor twin, as the toolchain would keep it. Activations are
per tensor: all at one format (the target's default or ``act_format``).
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
from fitonnx.model.graph import Kind, QuantTensor
from fitonnx.score.fit import ScoreReport, TensorScore
from fitonnx.score.formats_fit import WeightFormatFit, applies

WEIGHT_SLOT = 1  # Conv/Gemm/MatMul read their weight at input 1


@dataclass(frozen=True)
class FormatOptions:
    """What ``allocate_formats`` may choose from: the target's menu, optionally restricted."""

    target: str
    weight_formats: tuple[str, ...] | None = None  # None: the target's menu
    act_format: str | None = None  # None: the target's default activation format
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
        if self.act_format is not None and parse_format(self.act_format).name not in menu.activations:
            raise FitonnxError(
                f"expected an activation format among target {target.name!r}'s {', '.join(menu.activations)}; "
                f"found {self.act_format!r}"
            )
        return target


def per_tensor_twin(fmt: Format) -> Format | None:
    """The per-tensor format a toolchain falls back to for a weight without the format's axis."""
    if fmt.granularity is Granularity.TENSOR:
        return fmt
    try:
        return Format(fmt.element, fmt.bits, Granularity.TENSOR, None, fmt.scale, fmt.range_method)
    except FitonnxError:
        return None  # MX/NVFP4 exist only in blocks


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
    menu = target.format_menu()
    w_items = weight_items(model, report.tensors, fits, target, options)
    if not w_items:
        raise FitonnxError(f"expected quantizable weights in {report.model}; found none")
    act = get_format(parse_format(options.act_format).name if options.act_format else menu.default_activation)
    acts = [t for t in report.tensors if t.kind is Kind.ACTIVATION]
    a_fits = {t.name: activation_format_fit(act, t.ef_trace, t.min, t.max) for t in acts}
    a_fit = float(sum(a_fits.values()))
    front = pareto_front(w_items, options.tolerance)
    chosen = pick(front, budget, fit_offset=a_fit)
    per_format: dict[str, Mapping[str, float]] = {it.name: dict(zip(it.formats, it.fit, strict=True)) for it in w_items}
    per_format.update({name: {act.name: value} for name, value in a_fits.items()})
    activations = ActivationChoice({t.name: act.bits for t in acts}, a_fit)
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
        activation_formats={t.name: act.name for t in acts},
        fit_per_format=per_format,
    )
