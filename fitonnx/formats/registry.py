"""The registry of named formats, preset with what deployment toolchains use.

Presets (see formats.md and issue 11 for the sources):
- ``intN``/``uintN`` for N = 2…8, 16, per tensor and per channel (``/ch``): the symmetric grids of
  TensorRT/QNN weights and ONNX Runtime's symmetric mode, and the asymmetric min/max grids of
  QNN/ORT activations and of FIT's paper;
- ``int4``/``uint4``/``int8``/``uint8`` in blocks of 32, 64, 128 (``/b32``…): ONNX Runtime's
  MatMulNBits and opset-21 blocked QuantizeLinear;
- ``fp8e4m3``/``fp8e5m2`` per tensor and per channel, float32 scale max|x|/max_fp8 (TensorRT FP8);
- ``mxfp4/32``, ``mxfp8/32``: OCP Microscaling, e8m0 power-of-two scale per 32 elements;
- ``nvfp4/16``: fp4 e2m1 values, fp8 e4m3 scale per 16 elements, one float32 scale per tensor;
- ``fp16``, ``bf16``: plain casts.
"""

from __future__ import annotations

from fitonnx.errors import FitonnxError
from fitonnx.formats.types import (
    INT_BITS,
    ElementKind,
    Format,
    Granularity,
    RangeMethod,
    ScaleType,
    parse_name,
)

FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add ``fmt`` under its name; a different format already under that name is a bug."""
    known = FORMATS.get(fmt.name)
    if known is not None and known != fmt:
        raise FitonnxError(f"format name {fmt.name!r} is already registered for a different format: {known!r}")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format ``name``; unknown names fail with the list of registered ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise FitonnxError(f"expected a format among {sorted(FORMATS)}; found {name!r}") from None


def parse_format(name: str) -> Format:
    """A registered format, or any valid one the naming grammar spells (``int5/b16``)."""
    if name in FORMATS:
        return FORMATS[name]
    fmt = parse_name(name.strip().lower())
    if fmt is None:
        raise FitonnxError(
            f"expected a format among {sorted(FORMATS)}; found {name!r}",
            hint="the grammar is [u]intN[/ch|/bB], fp8e4m3|fp8e5m2|fp4e2m1[/ch|/bB], mxfp4/B, mxfp8/B, nvfp4/B, fp16, bf16",
        )
    return fmt


def _presets() -> list[Format]:
    out: list[Format] = []
    for method in (RangeMethod.SYMMETRIC, RangeMethod.MINMAX):
        for bits in INT_BITS:
            for gran in (Granularity.TENSOR, Granularity.CHANNEL):
                out.append(Format(ElementKind.INT, bits, gran, None, ScaleType.FLOAT32, method))
        for bits in (4, 8):
            for block in (32, 64, 128):
                out.append(Format(ElementKind.INT, bits, Granularity.BLOCK, block, ScaleType.FLOAT32, method))
    for kind in (ElementKind.FP8_E4M3FN, ElementKind.FP8_E5M2):
        for gran in (Granularity.TENSOR, Granularity.CHANNEL):
            out.append(Format(kind, 8, gran))
    out.append(Format(ElementKind.FP4_E2M1, 4, Granularity.BLOCK, 32, ScaleType.E8M0))
    out.append(Format(ElementKind.FP8_E4M3FN, 8, Granularity.BLOCK, 32, ScaleType.E8M0))
    out.append(Format(ElementKind.FP4_E2M1, 4, Granularity.BLOCK, 16, ScaleType.E4M3))
    out.append(Format(ElementKind.FP16, 16, scale=ScaleType.NONE))
    out.append(Format(ElementKind.BF16, 16, scale=ScaleType.NONE))
    return out


for _fmt in _presets():
    register(_fmt)
