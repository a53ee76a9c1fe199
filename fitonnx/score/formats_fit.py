"""FIT of a weight under any number format, from the per-element Fisher diagonal.

FIT_t(f) = Σ_j F_jj · E[δ_j²](f) (``fitonnx.formats.fit``). A per-channel format groups the
elements along the consuming op's output-channel axis, a per-block format along its reduction
axis (the axis a toolchain blocks: MatMulNBits' K); per tensor it is the paper's Tr(F)·Δ²/12.
The diagonal comes from a gradient model built with ``keep_gradients`` (``FisherTraces.diag``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from fitonnx.errors import InternalError
from fitonnx.formats import Format, Granularity, fit_expected, fit_measured
from fitonnx.model import external


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
