"""What ``validate`` may put on one tensor: a bit width of the min/max grid, or a named format.

A *choice* is an ``int`` (b bits on the simulation's own grid, FIT.md's model) or a ``str``, the
name of a format of ``fitonnx.formats`` (``int4/ch``, ``int8/b32``, ``fp8e4m3``, ``nvfp4/16``...).
Formats are grouped in *families* (the format without its width: ``int/ch``, ``uint``, ``fp8``),
and ``validate --format`` reports ρ per family. A grouped format that does not apply to a tensor
(a per-channel format on an activation, a block size that does not divide the reduction axis)
falls back to the same element per tensor, as a toolchain would; ``resolve`` says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from fitonnx.errors import FitonnxError
from fitonnx.formats import FORMATS, ElementKind, Format, Granularity, ScaleType, parse_format
from fitonnx.formats.block_nodes import BlockLayout, block_layout, is_dynamic_block

Choice = int | str

# Families whose elements are floating: one width each, so fp16 is added as the higher choice
# (what a TensorRT user mixes FP8 with).
FLOAT_PARTNER = "fp16"
ALL = "all"


def cost_bits(choice: Choice) -> float:
    """Bits per element of a choice's values (scales not counted): the budget axis of the sampler."""
    return float(choice) if isinstance(choice, int) else float(parse_format(choice).bits)


def sort_key(choice: Choice) -> tuple[float, str]:
    return cost_bits(choice), str(choice)


def sorted_choices(choices: Iterable[Choice]) -> tuple[Choice, ...]:
    return tuple(sorted(set(choices), key=sort_key))


def family(fmt: Format) -> str:
    """The format's family: its name without the width (``int4/ch`` → ``int/ch``; fp8 e4m3/e5m2 → ``fp8``)."""
    suffix = {Granularity.TENSOR: "", Granularity.CHANNEL: "/ch"}.get(fmt.granularity, f"/b{fmt.block_size}")
    if fmt.scale in (ScaleType.E8M0, ScaleType.E4M3):
        return fmt.name
    if fmt.is_int:
        return f"{'uint' if fmt.asymmetric else 'int'}{suffix}"
    if fmt.element in (ElementKind.FP8_E4M3FN, ElementKind.FP8_E5M2):
        return f"fp8{suffix}"
    return f"{fmt.element.value}{suffix}"


def per_tensor(fmt: Format) -> Format:
    """The same element (and range method) on one scale per tensor."""
    if fmt.granularity is Granularity.TENSOR:
        return fmt
    scale = ScaleType.NONE if fmt.scale is ScaleType.NONE else ScaleType.FLOAT32
    return Format(fmt.element, fmt.bits, Granularity.TENSOR, None, scale, fmt.range_method)


@dataclass(frozen=True)
class Family:
    """One family's candidates, cheapest first: for weights and for activations (empty: activations float)."""

    name: str
    weights: tuple[Choice, ...]
    activations: tuple[Choice, ...]


def _activation_choice(fmt: Format) -> str | None:
    """The format an activation gets for a weight format of the family (None: stays float): MX and
    NVFP4 themselves (their block scales are computed per sample at run time), the others per tensor."""
    if is_dynamic_block(fmt):
        return fmt.name
    if fmt.element is ElementKind.FP4_E2M1:
        return None  # fp4 with one float32 scale per tensor: no toolchain quantizes activations so
    return per_tensor(fmt).name


def families(names: Sequence[str], weights_only: bool) -> tuple[Family, ...]:
    """The families of the named formats (``all``: every format of the registry, 16-bit integers and
    fp16/bf16 aside), each with its widths; single-width floating families get fp16 beside them."""
    wanted: list[Format] = []
    for name in names:
        if name == ALL:
            wanted += [f for f in FORMATS.values() if not (f.is_int and f.bits == 16) and f.element not in _PLAIN_KINDS]
        else:
            wanted.append(parse_format(name))
    if not wanted:
        raise FitonnxError("expected at least one format (or 'all') for --format; found none")
    grouped: dict[str, list[Format]] = {}
    for fmt in wanted:
        grouped.setdefault(family(fmt), []).append(fmt)
    out = []
    for name, fmts in grouped.items():
        w = [f.name for f in fmts]
        if len({f.bits for f in fmts}) == 1 and not fmts[0].is_int:
            w.append(FLOAT_PARTNER)
        acts = [] if weights_only else [a for a in (_activation_choice(parse_format(c)) for c in w) if a]
        out.append(Family(name, sorted_choices(w), sorted_choices(acts)))
    return tuple(f for f in out if not _absorbed(f, out))


def _absorbed(fam: Family, every: Sequence[Family]) -> bool:
    """A one-choice family whose choice another family already holds (``--format fp8e4m3 --format
    fp16``: fp16 is the fp8 family's partner, not a family of its own with nothing to rank)."""
    return len(fam.weights) == 1 and any(o is not fam and fam.weights[0] in o.weights for o in every)


_PLAIN_KINDS = (ElementKind.FP16, ElementKind.BF16)


@dataclass(frozen=True)
class FloatGrid:
    """A floating element on a per-tensor scale: value = scale · (a float with ``mant`` mantissa bits,
    exponent ≥ ``emin``, |·| ≤ ``top``), rounded to nearest even, saturating."""

    scale: float
    mant: int
    emin: int
    top: float


@dataclass(frozen=True)
class BlockGrid:
    """A dynamic block format on one activation of per-sample ``shape`` (``formats.block_nodes``):
    blocks along ``axis``, scales from each sample's block maxima, ``tensor_scale`` NVFP4's calibrated
    float32 scale (1 for MX); ``opset`` is the graph's, which the node spelling follows."""

    fmt: Format
    shape: tuple[int, ...]
    axis: int
    tensor_scale: float
    opset: int

    @property
    def layout(self) -> BlockLayout:
        return block_layout(self.shape, self.axis, self.fmt.block_size or 1)


def float_grid(fmt: Format, scale: float) -> FloatGrid:
    info = ml_dtypes.finfo(fmt.dtype)
    return FloatGrid(float(scale), int(info.nmant), int(info.minexp), float(info.max))


def float_quantize(x: np.ndarray, grid: FloatGrid) -> np.ndarray:
    """What the simulation's floating fake quantizer computes, in numpy (float64): the reference for tests."""
    v = np.asarray(x, np.float64) / grid.scale
    with np.errstate(divide="ignore"):
        e = np.maximum(np.floor(np.log2(np.abs(v))), grid.emin)
    step = np.exp2(e - grid.mant)
    return np.clip(np.round(v / step) * step, -grid.top, grid.top) * grid.scale


def with_activations(fam: Family, activations: Sequence[Choice]) -> Family:
    return dataclasses.replace(fam, activations=sorted_choices(activations))
