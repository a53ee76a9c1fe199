"""The vocabulary of quantization formats: element type × granularity × scale type × range method.

A ``Format`` is a frozen value with a short stable name (``int8``, ``uint4/b32``, ``fp8e4m3/ch``,
``mxfp4/32``, ``nvfp4/16``, ``bf16``) used in tables, JSON and on the command line; ``Format.name``
and ``parse_name`` are inverse to each other. The axis a format is applied along is not part of it:
it belongs to the op the tensor feeds (a Conv weight's output channels, a MatMul's reduction axis),
so every operation takes it as an argument.

Integer naming: ``intN`` is the symmetric signed grid (zero point 0, scale max|x|/(2^(N−1)−1),
what TensorRT, QNN weights and ONNX Runtime's symmetric mode use); ``uintN`` is the asymmetric
min/max grid with an integer zero point (the paper's noise model, fitonnx's historical grid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import ml_dtypes
import numpy as np

from fitonnx.errors import FitonnxError

INT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


class ElementKind(str, Enum):
    """How one element is stored."""

    INT = "int"
    FP8_E4M3FN = "fp8e4m3"
    FP8_E5M2 = "fp8e5m2"
    FP4_E2M1 = "fp4e2m1"
    FP16 = "fp16"
    BF16 = "bf16"


# Floating element kinds → the ml_dtypes/numpy dtype that defines their values and rounding.
FLOAT_DTYPES: dict[ElementKind, np.dtype] = {
    ElementKind.FP8_E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
    ElementKind.FP8_E5M2: np.dtype(ml_dtypes.float8_e5m2),
    ElementKind.FP4_E2M1: np.dtype(ml_dtypes.float4_e2m1fn),
    ElementKind.FP16: np.dtype(np.float16),
    ElementKind.BF16: np.dtype(ml_dtypes.bfloat16),
}


class Granularity(str, Enum):
    """Which elements share one scale (and zero point)."""

    TENSOR = "tensor"
    CHANNEL = "channel"  # one group per index along the axis
    BLOCK = "block"  # runs of block_size consecutive elements along the axis


class ScaleType(str, Enum):
    """How each group's scale is stored."""

    NONE = "none"  # fp16/bf16: a plain cast, no scale
    FLOAT32 = "float32"
    E8M0 = "e8m0"  # a power of two (OCP MX)
    E4M3 = "e4m3"  # fp8 e4m3fn per block times one float32 per tensor (NVIDIA NVFP4)


class RangeMethod(str, Enum):
    """How a group's scale follows from its values."""

    MINMAX = "minmax"  # asymmetric [min, max] widened to hold 0, integer zero point
    SYMMETRIC = "symmetric"  # max|x| maps to the largest positive level, zero point 0


@dataclass(frozen=True)
class Format:
    """One quantization format; invalid combinations fail at construction."""

    element: ElementKind
    bits: int
    granularity: Granularity = Granularity.TENSOR
    block_size: int | None = None
    scale: ScaleType = ScaleType.FLOAT32
    range_method: RangeMethod = RangeMethod.SYMMETRIC

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise FitonnxError(f"invalid quantization format: {problem}")

    @property
    def is_int(self) -> bool:
        return self.element is ElementKind.INT

    @property
    def asymmetric(self) -> bool:
        return self.range_method is RangeMethod.MINMAX

    @property
    def dtype(self) -> np.dtype:
        """The float dtype of a floating element (FitonnxError for integers)."""
        if self.is_int:
            raise FitonnxError(f"{self.name} is an integer format; it has no float dtype")
        return FLOAT_DTYPES[self.element]

    @property
    def name(self) -> str:
        return format_name(self)

    def __str__(self) -> str:
        return self.name


def _float_bits(kind: ElementKind) -> int:
    return FLOAT_DTYPES[kind].itemsize * 8 if kind is not ElementKind.FP4_E2M1 else 4


def _problem(f: Format) -> str | None:
    """What is wrong with a format's combination of fields, or None."""
    if f.is_int and f.bits not in INT_BITS:
        return f"integer widths are {list(INT_BITS)}; found {f.bits}"
    if not f.is_int and f.bits != _float_bits(f.element):
        return f"{f.element.value} has {_float_bits(f.element)} bits; found {f.bits}"
    if not f.is_int and f.range_method is RangeMethod.MINMAX:
        return "floating formats scale symmetrically (max|x|); min/max ranges need an integer element"
    if (f.granularity is Granularity.BLOCK) != (f.block_size is not None):
        return "a block size goes with, and only with, per-block granularity"
    if f.block_size is not None and f.block_size < 1:
        return f"block size must be positive; found {f.block_size}"
    plain = f.element in (ElementKind.FP16, ElementKind.BF16)
    if plain != (f.scale is ScaleType.NONE) or (plain and f.granularity is not Granularity.TENSOR):
        return "fp16/bf16, and only they, are plain per-tensor casts without a scale"
    if f.scale is ScaleType.E8M0 and (f.is_int or f.granularity is not Granularity.BLOCK):
        return "e8m0 (MX) scales need a floating element in blocks"
    if f.scale is ScaleType.E4M3 and (f.element is not ElementKind.FP4_E2M1 or f.granularity is not Granularity.BLOCK):
        return "fp8 e4m3 block scales (NVFP4) need fp4 e2m1 elements in blocks"
    return None


def _suffix(f: Format) -> str:
    if f.granularity is Granularity.CHANNEL:
        return "/ch"
    if f.granularity is Granularity.BLOCK:
        return f"/b{f.block_size}"
    return ""


def format_name(f: Format) -> str:
    """The short stable name of a format (inverse of ``parse_name``)."""
    if f.scale is ScaleType.E8M0:
        return f"mx{_MX_NAMES[f.element]}/{f.block_size}"
    if f.scale is ScaleType.E4M3:
        return f"nvfp4/{f.block_size}"
    if f.is_int:
        return f"{'uint' if f.asymmetric else 'int'}{f.bits}{_suffix(f)}"
    return f"{f.element.value}{_suffix(f)}"


_INT = re.compile(r"(u?)int(\d+)(/ch|/b(\d+))?")
_FLOAT = re.compile(r"(fp8e4m3|fp8e5m2|fp4e2m1|fp16|bf16)(/ch|/b(\d+))?")
_MX = re.compile(r"mx(fp4|fp8|fp8e5m2)/(\d+)")
_NV = re.compile(r"nvfp4/(\d+)")
_MX_ELEMENTS = {"fp4": ElementKind.FP4_E2M1, "fp8": ElementKind.FP8_E4M3FN, "fp8e5m2": ElementKind.FP8_E5M2}
_MX_NAMES = {kind: short for short, kind in _MX_ELEMENTS.items()}


def _granularity(suffix: str | None, block: str | None) -> tuple[Granularity, int | None]:
    if not suffix:
        return Granularity.TENSOR, None
    if suffix == "/ch":
        return Granularity.CHANNEL, None
    return Granularity.BLOCK, int(block or 0)


def parse_name(name: str) -> Format | None:
    """The format a name spells by the naming grammar, or None when it spells none."""
    if m := _INT.fullmatch(name):
        gran, block = _granularity(m.group(3), m.group(4))
        method = RangeMethod.MINMAX if m.group(1) else RangeMethod.SYMMETRIC
        return Format(ElementKind.INT, int(m.group(2)), gran, block, ScaleType.FLOAT32, method)
    if m := _FLOAT.fullmatch(name):
        kind = ElementKind(m.group(1))
        gran, block = _granularity(m.group(2), m.group(3))
        plain = kind in (ElementKind.FP16, ElementKind.BF16)
        return Format(kind, _float_bits(kind), gran, block, ScaleType.NONE if plain else ScaleType.FLOAT32)
    if m := _MX.fullmatch(name):
        kind = _MX_ELEMENTS[m.group(1)]
        return Format(kind, _float_bits(kind), Granularity.BLOCK, int(m.group(2)), ScaleType.E8M0)
    if m := _NV.fullmatch(name):
        return Format(ElementKind.FP4_E2M1, 4, Granularity.BLOCK, int(m.group(1)), ScaleType.E4M3)
    return None
