"""FIT of every quantizable tensor under any number format.

FIT_t(f) = Σ_j F_jj · E[δ_j²](f) (``fitonnx.formats.fit``). A per-channel format groups the
elements along the consuming op's output-channel axis, a per-block format along its reduction
axis (the axis a toolchain blocks: MatMulNBits' K); per tensor it is the paper's Tr(F)·Δ²/12.

Two ways to the same numbers:
- ``plan_statistics`` + ``format_fits``: the statistics each format needs (``fisher.statistics``:
  per-group Fisher mass for integer grids reduced inside the gradient graph, Σ_j F_jj·c_j for a
  weight's floating-format noise and measured error from its summed g², Σ g²·E[δ²](a) per sample
  for activations in the graph). This is what ``score --format`` runs.
- ``weight_format_fits``: weights only, from a full diagonal kept with ``keep_gradients``
  (``FisherTraces.diag``); the independent check of the first.

Which formats apply: every format to a weight read by Conv/ConvTranspose/Gemm/MatMul (per block only
when the block size divides the axis); to other weights (embedding tables read by Gather, recurrent
weights) integer grids per tensor and fp16/bf16 casts, since the scaled floating formats (FP8, FP4,
MX, NVFP4) are what toolchains use for GEMM/convolution weights; to an activation the per-tensor
formats whose scale is one float32 (integers, fp8/fp4 with a calibrated max|a|, fp16/bf16), and the
dynamic block formats (``mxfp8/32``, ``mxfp4/32``, ``nvfp4/16``: e8m0 or e4m3 scales computed per
sample from each block's own max|a|, as TensorRT's DynamicQuantize and the OCP MX spec do) along the
consumer's reduction axis (``activation_axis``), the last block zero-padded when B does not divide
it (ONNX's short last block). Their expected and measured FIT (Σ g²·E[δ²], Σ g²·(Q(a) − a)²) are
summed per sample in the gradient graph (``fisher.statistics.BlockStat``); their bits count the
block scales.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

from fitonnx.errors import FitonnxError, InternalError
from fitonnx.fisher.engine import FisherTraces
from fitonnx.fisher.statistics import BlockStat, GroupStat, NoiseStat, Statistics, WeightedStat, noise_needs_scale
from fitonnx.formats import (
    Format,
    Granularity,
    ScaleType,
    bits_per_element,
    expand,
    fit_expected,
    fit_measured,
    group_delta_sq,
    group_shape,
    params_from_range,
    parse_format,
    qparams,
    quantize_dequantize,
)
from fitonnx.formats.block_nodes import is_dynamic_block
from fitonnx.formats.quantize import nvfp4_tensor_scale
from fitonnx.model import external
from fitonnx.model.graph import Kind, QuantTensor


@dataclass(frozen=True)
class WeightFormatFit:
    """One weight under one format: the expected (noise-model) and the measured FIT."""

    name: str
    format: str
    axis: int | None
    expected: float
    measured: float


def _consumers(model: onnx.ModelProto, name: str) -> list[tuple[onnx.NodeProto, int]]:
    return [(n, slot) for n in model.graph.node for slot, i in enumerate(n.input) if i == name]


def _weight_axes(node: onnx.NodeProto, slot: int, rank: int) -> tuple[int, int] | None:
    """(output-channel axis, reduction axis) of ``node``'s weight input, as toolchains read them."""
    if slot != 1:
        return None
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "ConvTranspose":
        return 1, 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, 1) if trans_b else (1, 0)
    if node.op_type == "MatMul" and rank >= 2:
        return rank - 1, rank - 2
    return None


def format_axis(model: onnx.ModelProto, weight: str, fmt: Format, rank: int) -> int | None:
    """The axis ``fmt`` groups ``weight`` along, or None when its readers disagree or are not Conv/Gemm/MatMul.

    Per-tensor formats need no axis and always get ``None``; callers skip a grouped format whose
    axis is ``None`` (the toolchain would keep such a weight per tensor)."""
    if fmt.granularity is Granularity.TENSOR:
        return None
    axes = {_weight_axes(n, slot, rank) for n, slot in _consumers(model, weight)}
    if len(axes) != 1 or None in axes:
        return None
    channel, reduction = axes.pop()
    return channel if fmt.granularity is Granularity.CHANNEL else reduction


def _activation_axis(node: onnx.NodeProto, slot: int, rank: int | None) -> int | None:
    """The reduction axis of ``node``'s float data input ``slot`` (None where no toolchain blocks it);
    MatMul's counts from the end, so that it holds whatever the rank (``rank`` None: unknown)."""
    trans = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
    if node.op_type == "MatMul" and slot in (0, 1):
        return -1 if slot == 0 or rank == 1 else -2
    if node.op_type == "Gemm" and slot == 0:
        return 0 if trans.get("transA", 0) else 1
    if node.op_type == "Gemm" and slot == 1:
        return 1 if trans.get("transB", 0) else 0
    if node.op_type in ("Conv", "ConvTranspose") and slot == 0:
        return 1
    return None


def activation_axis(model: onnx.ModelProto, name: str, rank: int | None = None) -> int | None:
    """The axis an activation's dynamic blocks run along: its consumers' reduction axis (MatMul/Gemm:
    K; Conv/ConvTranspose: the input channels, as the MX paper blocks convolutions), or None when
    those readers disagree or none reads it (LSTM/GRU inputs, or no such reader)."""
    readers = [(n, slot) for n, slot in _consumers(model, name) if n.op_type in _BLOCKED_READERS]
    axes = {_activation_axis(n, slot, rank) for n, slot in readers}  # other readers (a residual Add) read it in float
    return axes.pop() if len(axes) == 1 else None


_BLOCKED_READERS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def weight_format_fits(
    model: onnx.ModelProto, diag: Mapping[str, np.ndarray], formats: Sequence[Format]
) -> list[WeightFormatFit]:
    """Expected and measured FIT of every weight in ``diag`` under each format that applies to it."""
    values = external.LazyArrays(t for t in model.graph.initializer if t.name in diag)
    out: list[WeightFormatFit] = []
    for name, fisher in diag.items():
        if name not in values:
            continue  # an activation: its noise depends on each sample's values
        w = values[name].astype(np.float32)
        if w.shape != np.shape(fisher):
            raise InternalError(f"Fisher diagonal of {name!r} has shape {np.shape(fisher)}, the weight {w.shape}")
        for fmt in formats:
            axis = format_axis(model, name, fmt, w.ndim)
            if fmt.granularity is not Granularity.TENSOR and axis is None:
                continue
            if fmt.granularity is Granularity.BLOCK and w.shape[axis] % (fmt.block_size or 1):
                continue  # toolchains pad the last block; not modelled yet
            out.append(
                WeightFormatFit(
                    name, fmt.name, axis, fit_expected(fmt, w, fisher, axis), fit_measured(fmt, w, fisher, axis)
                )
            )
    return out


# What ``score --target`` scores: the formats each toolchain quantizes to (issue 11's facts; the
# names are those of ``allocate.targets.TARGETS``). Per-channel and per-block formats apply to
# weights only, so one list serves weights and activations.
TARGET_FORMATS: dict[str, tuple[str, ...]] = {
    # per-channel symmetric INT8/INT4 weights, FP8 E4M3 weights and activations, NVFP4 weights,
    # per-tensor INT8/FP8 activations, FP16 for what stays in float; NVFP4 (block 16, FP8 scales) and
    # MXFP8 (block 32, E8M0 scales) activations quantized dynamically per block (TensorRT's
    # DynamicQuantize; "Quantization Schemes": MXFP8 "is a dynamic per-block quantization scheme")
    "tensorrt": ("int8/ch", "int4/ch", "int8", "fp8e4m3", "nvfp4/16", "mxfp8/32", "fp16"),
    # per-channel INT4/8/16 weights, UINT8/16 activations
    "qnn": ("int4/ch", "int8/ch", "int16/ch", "uint8", "uint16"),
    # QDQ (per tensor, per channel when asked), MatMulNBits INT4 weights in blocks (asymmetric by default)
    "ort": ("int8", "int8/ch", "uint8", "uint16", "uint4/b32", "uint4/b128"),
}


def target_formats(target: str) -> tuple[Format, ...]:
    """The formats ``score --target`` scores for ``target``; an unknown name fails with the known ones."""
    if target not in TARGET_FORMATS:
        raise FitonnxError(f"expected a target among {sorted(TARGET_FORMATS)} for scoring formats; found {target!r}")
    return tuple(parse_format(n) for n in TARGET_FORMATS[target])


@dataclass(frozen=True)
class FormatFit:
    """One tensor under one format, from the in-graph statistics.

    ``expected``: Σ_j F_jj · E[δ_j²] under the format's noise model (integers: Σ_g mass_g · Δ_g²/12);
    ``measured``: Σ_j F_jj · (Q(w_j) − w_j)² for a weight under a floating format, (1/N)·Σ_i Σ_j
    g_ij²·(Q(a_ij) − a_ij)² for an activation under a dynamic block format (None otherwise);
    ``bits``: storage bits per element, scales and zero points included (``formats.bits_per_element``).
    """

    tensor: str
    format: str
    axis: int | None
    expected: float
    measured: float | None
    bits: float


def applies(model: onnx.ModelProto, t: QuantTensor, fmt: Format, shape: tuple[int, ...]) -> tuple[bool, int | None]:
    """Whether ``fmt`` applies to tensor ``t`` of ``shape`` (see the module docstring), and its axis."""
    if t.kind is Kind.ACTIVATION and is_dynamic_block(fmt):
        axis = activation_axis(model, t.name, len(shape) if shape else None)
        if axis is None or not shape:
            return axis is not None, axis  # the shape is unknown before the first sample: axis as the op says
        return -len(shape) <= axis < len(shape), axis % len(shape)
    if t.kind is Kind.ACTIVATION:
        return fmt.granularity is Granularity.TENSOR and fmt.scale in (ScaleType.FLOAT32, ScaleType.NONE), None
    axis = format_axis(model, t.name, fmt, len(shape))
    if fmt.scale is not ScaleType.NONE and not fmt.is_int and not _matmul_like(model, t.name, len(shape)):
        return False, None  # FP8/FP4/MX/NVFP4 quantize Conv/Gemm/MatMul weights, not embedding tables
    if fmt.granularity is Granularity.TENSOR:
        return True, None
    if axis is None or (fmt.granularity is Granularity.BLOCK and shape[axis] % (fmt.block_size or 1)):
        return False, None
    return True, axis


def _matmul_like(model: onnx.ModelProto, weight: str, rank: int) -> bool:
    """Every reader of ``weight`` takes it as the weight of a Conv, ConvTranspose, Gemm or MatMul."""
    readers = _consumers(model, weight)
    return bool(readers) and all(_weight_axes(n, slot, rank) is not None for n, slot in readers)


def _weights(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    return {
        t.name: external.tensor_array(t).astype(np.float32, copy=False)
        for t in model.graph.initializer
        if t.name in names
    }


def _weight_stats(fmt: Format, name: str, w: np.ndarray, axis: int | None) -> list[GroupStat | WeightedStat]:
    """The in-graph statistics a weight needs under ``fmt`` (none for a per-tensor integer grid)."""
    if fmt.is_int:
        return [] if axis is None else [GroupStat(name, axis, fmt.block_size)]
    # |Q(w) − w| in float32 is exact: Q(w) is within a factor 2 of w, or 0 (Sterbenz), or saturates.
    err = np.abs(quantize_dequantize(w, fmt, axis) - w)
    stats: list[GroupStat | WeightedStat] = [WeightedStat(name, f"{fmt.name}:measured", err)]
    if not (fmt.scale is ScaleType.NONE and _overflows(fmt, float(w.min()), float(w.max()))):
        stats.append(WeightedStat(name, f"{fmt.name}:expected", noise_root(fmt, w, axis)))
    return stats  # (an fp16/bf16 overflow has infinite FIT: no statistic needed)


def noise_root(fmt: Format, w: np.ndarray, axis: int | None) -> np.ndarray:
    """√E[δ_j²] per element of a weight under floating ``fmt`` (float32): √``noise_power`` without its
    float64 temporaries (1.9 s → 0.5 s on BERT's embedding table). The binade of |w|/s follows from the
    float32 exponents and mantissas of |w| and s: ⌊log2(|w|/s)⌋ = e_w − e_s − [m_w < m_s] (frexp),
    exact because both mantissas have 24 bits; E[δ²] = (s · 2^(e − m))²/12 at or above the smallest
    normal binade, (|w|/s − max)² · s² beyond the largest element."""
    w = np.asarray(w, np.float32)
    info = ml_dtypes.finfo(fmt.dtype)
    top, mant, emin = float(info.max), int(info.nmant), int(info.minexp)
    gshape = group_shape(fmt, w.shape, axis)
    group_scale = np.asarray(qparams(w, fmt, axis).scale, np.float32).reshape(gshape)
    # Per tensor and per channel the group arrays broadcast as they are (fast); blocks are repeated.
    spread = (lambda a: expand(fmt, a, w.shape, axis)) if fmt.granularity is Granularity.BLOCK else (lambda a: a)
    ms, es = (spread(a) for a in np.frexp(group_scale))
    scale = spread(group_scale)
    mw, ew = np.frexp(np.abs(w))
    binade = ew - es - (mw < ms)
    binade[w == 0] = emin
    np.maximum(binade, emin, out=binade)
    root = np.ldexp(np.float32(1.0 / math.sqrt(12.0)), binade - mant) * scale
    tiny = binade - mant < -100  # bf16's lowest binades: 2^(e − m)/√12 would be subnormal in float32
    if tiny.any():
        scale_tiny = np.broadcast_to(scale, w.shape)[tiny]
        root[tiny] = (np.ldexp(1.0 / math.sqrt(12.0), binade[tiny] - mant) * scale_tiny).astype(np.float32)
    near = binade >= math.floor(math.log2(top))  # only the top binade can hold values beyond the largest
    if near.any():
        scale_near = np.broadcast_to(scale, w.shape)[near].astype(np.float64)
        v = np.abs(w[near]).astype(np.float64) / scale_near
        beyond = v > top
        fixed = root[near]
        fixed[beyond] = ((v[beyond] - top) * scale_near[beyond]).astype(np.float32)
        root[near] = fixed
    return root


def activation_scale(fmt: Format, absmax: float) -> float:
    """The float32 scale of a floating activation format calibrated to max|a| = ``absmax``."""
    return float(np.asarray(params_from_range(fmt, -absmax, absmax).scale).ravel()[0])


def scaled_activations(tensors: Sequence[QuantTensor], formats: Sequence[Format]) -> list[str]:
    """Activations whose floating formats need a calibrated max|a| before the gradient run."""
    if not any(
        not f.is_int and noise_needs_scale(f) and (f.granularity is Granularity.TENSOR or f.scale is ScaleType.E4M3)
        for f in formats
    ):
        return []
    return [t.name for t in tensors if t.kind is Kind.ACTIVATION]


@dataclass(frozen=True)
class Roles:
    """Which formats are scored on which tensors, by name: on weights ``weights``, on activations
    ``activations`` (None: every format asked for)."""

    weights: frozenset[str] | None = None
    activations: frozenset[str] | None = None

    def scores(self, t: QuantTensor, fmt: Format) -> bool:
        names = self.weights if t.kind is Kind.WEIGHT else self.activations
        return names is None or fmt.name in names


EVERY_ROLE = Roles()


def plan_statistics(
    model: onnx.ModelProto,
    tensors: Sequence[QuantTensor],
    formats: Sequence[Format],
    absmax: Mapping[str, float] | None = None,
    roles: Roles = EVERY_ROLE,
) -> Statistics:
    """The in-graph statistics ``format_fits`` needs for ``formats`` over ``tensors``.

    ``absmax``: max|a| of each activation over the calibration samples (``fisher.statistics.
    activation_absmax``), needed for floating formats with a scale (``scaled_activations``).
    ``roles``: which of ``formats`` are scored on weights and which on activations."""
    values = _weights(model, {t.name for t in tensors if t.kind is Kind.WEIGHT})
    groups: dict[str, GroupStat] = {}
    weighted: list[WeightedStat] = []
    noise: list[NoiseStat] = []
    blocks: list[BlockStat] = []
    for t in tensors:
        for fmt in formats:
            shape = values[t.name].shape if t.kind is Kind.WEIGHT else tuple(t.shape or ())
            ok, axis = applies(model, t, fmt, shape)
            if not ok or not roles.scores(t, fmt) or (t.kind is Kind.ACTIVATION and fmt.is_int):
                continue
            if t.kind is Kind.ACTIVATION and is_dynamic_block(fmt):
                blocks.append(_block_stat(t.name, fmt, axis, absmax))
                continue
            if t.kind is Kind.WEIGHT:
                for stat in _weight_stats(fmt, t.name, values[t.name], axis):
                    if isinstance(stat, GroupStat):
                        groups.setdefault(stat.key, stat)
                    else:
                        weighted.append(stat)
                continue
            if noise_needs_scale(fmt) and (absmax is None or t.name not in absmax):
                raise InternalError(f"activation {t.name!r} under {fmt.name} needs its calibrated max|a|")
            scale = activation_scale(fmt, absmax[t.name]) if absmax is not None and noise_needs_scale(fmt) else 1.0
            noise.append(NoiseStat(t.name, fmt, scale))
    return Statistics(tuple(groups.values()), tuple(weighted), tuple(noise), tuple(blocks))


def _block_stat(name: str, fmt: Format, axis: int | None, absmax: Mapping[str, float] | None) -> BlockStat:
    """The in-graph statistic of activation ``name`` under dynamic block ``fmt`` (NVFP4: its tensor
    scale from the calibrated max|a|, ModelOpt's amax/(6·448))."""
    if axis is None:
        raise InternalError(f"activation {name!r} under {fmt.name} has no block axis")
    if fmt.scale is not ScaleType.E4M3:
        return BlockStat(name, fmt, axis)
    if absmax is None or name not in absmax:
        raise InternalError(f"activation {name!r} under {fmt.name} needs its calibrated max|a|")
    return BlockStat(name, fmt, axis, float(nvfp4_tensor_scale(absmax[name])))


def _sum(traces: FisherTraces, key: str) -> np.ndarray:
    if traces.sums is None or key not in traces.sums:
        raise InternalError(f"the gradient model was not built with the statistic {key!r} (plan_statistics)")
    return traces.sums[key]


def _overflows(fmt: Format, lo: float, hi: float) -> bool:
    """A plain fp16/bf16 cast of the range [lo, hi] overflows to infinity."""
    info = ml_dtypes.finfo(fmt.dtype)
    threshold = float(info.max) + float(np.ldexp(1.0, int(np.floor(np.log2(float(info.max)))) - int(info.nmant))) / 2
    return max(abs(lo), abs(hi)) >= threshold


def _weight_fit(traces: FisherTraces, fmt: Format, name: str, w: np.ndarray, axis: int | None, trace: float):
    """(expected, measured) of a weight under ``fmt`` from the traces' statistics."""
    if fmt.is_int:
        delta_sq = group_delta_sq(fmt, w, axis)
        if axis is None:
            return trace * float(delta_sq.ravel()[0]) / 12.0, None
        mass = _sum(traces, GroupStat(name, axis, fmt.block_size).key).reshape(group_shape(fmt, w.shape, axis))
        return float(np.sum(mass * delta_sq) / 12.0), None
    measured = float(_sum(traces, f"{name}|{fmt.name}:measured"))
    if fmt.scale is ScaleType.NONE and _overflows(fmt, float(w.min()), float(w.max())):
        return math.inf, measured
    return float(_sum(traces, f"{name}|{fmt.name}:expected")), measured


def format_fits(
    traces: FisherTraces,
    model: onnx.ModelProto,
    formats: Sequence[Format],
    roles: Roles = EVERY_ROLE,
) -> dict[tuple[str, str], FormatFit]:
    """FIT of every scored tensor under every format that applies to it, keyed (tensor, format name).

    ``traces`` must come from a gradient model built with ``plan_statistics(model, traces.tensors,
    formats, ..., roles)``; ``model`` is the prepared model (its weights define the weight grids)."""
    values = _weights(model, {t.name for t in traces.tensors if t.kind is Kind.WEIGHT})
    trace = dict(zip((t.name for t in traces.tensors), traces.trace().tolist(), strict=True))
    out: dict[tuple[str, str], FormatFit] = {}
    for t in traces.tensors:
        shape = values[t.name].shape if t.kind is Kind.WEIGHT else tuple(traces.act_shapes.get(t.name, ()))
        for fmt in formats:
            ok, axis = applies(model, t, fmt, shape)
            if not ok or not roles.scores(t, fmt):
                continue
            if t.kind is Kind.WEIGHT:
                expected, measured = _weight_fit(traces, fmt, t.name, values[t.name], axis, trace[t.name])
            elif is_dynamic_block(fmt):
                expected, measured = _block_activation_fit(traces, fmt, t.name, axis)
            else:
                expected, measured = _activation_fit(traces, fmt, t.name, trace[t.name]), None
            # An activation is not stored: its cost is the element width (and its block scales).
            stored = t.kind is Kind.WEIGHT or (is_dynamic_block(fmt) and bool(shape))
            bits = bits_per_element(fmt, shape, axis) if stored else float(fmt.bits)
            out[(t.name, fmt.name)] = FormatFit(t.name, fmt.name, axis, expected, measured, bits)
    return out


def _activation_fit(traces: FisherTraces, fmt: Format, name: str, trace: float) -> float:
    lo, hi = traces.act_min[name], traces.act_max[name]
    if fmt.is_int:
        step = float(np.asarray(params_from_range(fmt, lo, hi).scale).ravel()[0])
        return trace * step**2 / 12.0
    if fmt.scale is ScaleType.NONE and _overflows(fmt, lo, hi):
        return math.inf
    return float(_sum(traces, NoiseStat(name, fmt, 1.0).key))


def _block_activation_fit(traces: FisherTraces, fmt: Format, name: str, axis: int | None) -> tuple[float, float]:
    """(expected, measured) FIT of an activation under a dynamic block format, from its in-graph sums."""
    stat = BlockStat(name, fmt, axis if axis is not None else -1)
    return float(_sum(traces, stat.key)), float(_sum(traces, stat.measured_key))


def weight_fits(fits: Mapping[tuple[str, str], FormatFit], model: onnx.ModelProto) -> list[WeightFormatFit]:
    """The weights' entries of ``format_fits`` shaped as ``weight_format_fits`` gives them (for callers
    of the diagonal path: the same ``expected`` without ``keep_gradients``). ``measured`` is NaN for
    integer grids, whose measured error the in-graph statistics do not compute."""
    weights = {t.name for t in model.graph.initializer}
    return [
        WeightFormatFit(f.tensor, f.format, f.axis, f.expected, f.measured if f.measured is not None else math.nan)
        for f in fits.values()
        if f.tensor in weights
    ]
