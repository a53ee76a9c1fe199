"""ONNX nodes that apply a format: QuantizeLinear/DequantizeLinear with the right types and attributes.

``activation_qdq`` puts a Q→DQ pair on a float tensor (its scales from a calibrated range);
``weight_qdq`` stores a weight already quantized (codes in the element type) behind a DequantizeLinear,
as ONNX Runtime's quantizer writes weights. Both return the pieces, never a model.

Minimum default-domain opsets: int8/uint8 per tensor 10, per channel (``axis``) 13, float8 19,
int4/uint4/int16/uint16 and ``block_size`` 21, float4 e2m1 23, a Cast from float8 e8m0 24,
int2/uint2 25. Two-level scales are written as two nodes feeding the value's Q/DQ: MX stores e8m0
exponents and Casts them to float32 (exact: they are powers of two); NVFP4 stores e4m3 block scales
and DequantizeLinear's them with the float32 tensor scale (the double-DQ pattern). Integer widths
without an ONNX type (3, 5, 6, 7 bits) cannot be written.

onnxruntime's CPU provider (checked on 1.19.2 and 1.32.0) has no FLOAT4E2M1 kernel for
QuantizeLinear, DequantizeLinear or Cast, so fp4 formats (mxfp4, nvfp4) raise UnsupportedError unless
``runnable=False`` asks for the nodes anyway (valid ONNX at opset 23/24, for other runtimes).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.errors import UnsupportedError
from fitonnx.formats import groups
from fitonnx.formats.quantize import QParams, encode, qparams
from fitonnx.formats.types import ElementKind, Format, Granularity, ScaleType

# (signed, bits) → (TensorProto type, numpy dtype of the codes, minimum opset)
INT_TYPES: dict[tuple[bool, int], tuple[int, np.dtype, int]] = {
    (True, 2): (TensorProto.INT2, np.dtype(ml_dtypes.int2), 25),
    (False, 2): (TensorProto.UINT2, np.dtype(ml_dtypes.uint2), 25),
    (True, 4): (TensorProto.INT4, np.dtype(ml_dtypes.int4), 21),
    (False, 4): (TensorProto.UINT4, np.dtype(ml_dtypes.uint4), 21),
    (True, 8): (TensorProto.INT8, np.dtype(np.int8), 10),
    (False, 8): (TensorProto.UINT8, np.dtype(np.uint8), 10),
    (True, 16): (TensorProto.INT16, np.dtype(np.int16), 21),
    (False, 16): (TensorProto.UINT16, np.dtype(np.uint16), 21),
}
FLOAT_TYPES: dict[ElementKind, tuple[int, int]] = {
    ElementKind.FP8_E4M3FN: (TensorProto.FLOAT8E4M3FN, 19),
    ElementKind.FP8_E5M2: (TensorProto.FLOAT8E5M2, 19),
    ElementKind.FP4_E2M1: (TensorProto.FLOAT4E2M1, 23),
    ElementKind.FP16: (TensorProto.FLOAT16, 6),
    ElementKind.BF16: (TensorProto.BFLOAT16, 13),
}
ORT_MISSING = {ElementKind.FP4_E2M1: "FLOAT4E2M1"}


@dataclass(frozen=True)
class QdqPieces:
    """Nodes and initializers to add to a graph; ``output`` is the float32 tensor they produce."""

    nodes: tuple[onnx.NodeProto, ...]
    initializers: tuple[onnx.TensorProto, ...]
    opset: int
    output: str


def element_type(fmt: Format) -> tuple[int, np.dtype, int]:
    """(TensorProto type, numpy code dtype, minimum opset) of a format's elements."""
    if fmt.is_int:
        key = (not fmt.asymmetric, fmt.bits)
        if key not in INT_TYPES:
            widths = sorted({b for _, b in INT_TYPES})
            raise UnsupportedError(f"ONNX has no {fmt.bits}-bit integer type for {fmt.name}; it has {widths} bits")
        return INT_TYPES[key]
    proto, opset = FLOAT_TYPES[fmt.element]
    return proto, fmt.dtype, opset


def min_opset(fmt: Format) -> int:
    """The lowest default-domain opset whose QuantizeLinear/DequantizeLinear (or Cast) expresses ``fmt``."""
    opset = element_type(fmt)[2]
    if fmt.granularity is Granularity.CHANNEL:
        opset = max(opset, 13)
    if fmt.granularity is Granularity.BLOCK:
        opset = max(opset, 21)
    if fmt.scale is ScaleType.E8M0:
        opset = max(opset, 24)
    return opset


def _check_runnable(fmt: Format, runnable: bool) -> None:
    if runnable and fmt.element in ORT_MISSING:
        raise UnsupportedError(
            f"{fmt.name} needs {ORT_MISSING[fmt.element]} QuantizeLinear/DequantizeLinear (ONNX opset {min_opset(fmt)}), "
            "which onnxruntime's CPU provider does not implement (checked up to 1.32.0)",
            hint="simulate it with fitonnx.formats.quantize_dequantize, or pass runnable=False for another runtime",
        )


def _onnx_shape(fmt: Format, array: np.ndarray) -> np.ndarray:
    """A group-shaped array in the layout ONNX wants: scalar per tensor, 1-D per channel."""
    if fmt.granularity is Granularity.TENSOR:
        return array.reshape(())
    if fmt.granularity is Granularity.CHANNEL:
        return array.reshape(-1)
    return array


def _attrs(fmt: Format, shape: tuple[int, ...], axis: int | None) -> dict[str, int]:
    ax = groups.normalize_axis(fmt, shape, axis)
    if ax is None:
        return {}
    if fmt.granularity is Granularity.CHANNEL:
        return {"axis": ax}
    assert fmt.block_size is not None
    return {"axis": ax, "block_size": fmt.block_size}


def _scale_pieces(fmt: Format, name: str, params: QParams) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The float32 scale tensor ``name_scale``, stored directly or through its second level."""
    scale = f"{name}_scale"
    if fmt.scale is ScaleType.FLOAT32:
        return [], [numpy_helper.from_array(_onnx_shape(fmt, np.asarray(params.scale, np.float32)), scale)], scale
    assert params.stored_scale is not None
    stored = numpy_helper.from_array(_onnx_shape(fmt, params.stored_scale), f"{scale}_{fmt.scale.value}")
    if fmt.scale is ScaleType.E8M0:
        return (
            [helper.make_node("Cast", [stored.name], [scale], name=f"{scale}_cast", to=TensorProto.FLOAT)],
            [stored],
            scale,
        )
    factor = numpy_helper.from_array(np.asarray(params.global_scale, np.float32).reshape(()), f"{scale}_global")
    node = helper.make_node("DequantizeLinear", [stored.name, factor.name], [scale], name=f"{scale}_dequantize")
    return [node], [stored, factor], scale


def _zero_point(fmt: Format, name: str, params: QParams) -> onnx.TensorProto:
    dtype = element_type(fmt)[1]
    zp = params.zero_point if fmt.is_int else np.zeros(np.shape(params.scale), np.float32)
    return numpy_helper.from_array(_onnx_shape(fmt, np.asarray(zp).astype(dtype)), f"{name}_zero_point")


def _plain(fmt: Format, name: str, output: str, weight: np.ndarray | None) -> QdqPieces:
    """fp16/bf16: a round trip through Cast (a weight stored in the narrow type, Cast back)."""
    proto, dtype, opset = element_type(fmt)
    down = f"{name}_{fmt.name}"
    back = helper.make_node("Cast", [down], [output], name=f"{output}_cast", to=TensorProto.FLOAT)
    if weight is not None:
        stored = numpy_helper.from_array(np.asarray(weight, np.float32).astype(dtype), down)
        return QdqPieces((back,), (stored,), opset, output)
    cast = helper.make_node("Cast", [name], [down], name=f"{down}_cast", to=proto)
    return QdqPieces((cast, back), (), opset, output)


def activation_qdq(
    fmt: Format,
    name: str,
    shape: tuple[int, ...],
    axis: int | None,
    params: QParams,
    output: str | None = None,
    runnable: bool = True,
) -> QdqPieces:
    """QuantizeLinear→DequantizeLinear on the float tensor ``name`` (of ``shape``) with ``params``
    (e.g. ``params_from_range`` of a calibrated range); the output is ``name_dequantized`` by default."""
    out = output or f"{name}_dequantized"
    _check_runnable(fmt, runnable)
    if fmt.scale is ScaleType.NONE:
        return _plain(fmt, name, out, None)
    nodes, inits, scale = _scale_pieces(fmt, name, params)
    zp = _zero_point(fmt, name, params)
    attrs = _attrs(fmt, tuple(shape), axis)
    quantized = f"{name}_quantized"
    nodes.append(
        helper.make_node("QuantizeLinear", [name, scale, zp.name], [quantized], name=f"{name}_quantize", **attrs)
    )
    nodes.append(
        helper.make_node("DequantizeLinear", [quantized, scale, zp.name], [out], name=f"{name}_dequantize", **attrs)
    )
    return QdqPieces(tuple(nodes), (*inits, zp), min_opset(fmt), out)


def weight_qdq(
    fmt: Format,
    name: str,
    weight: np.ndarray,
    axis: int | None,
    params: QParams | None = None,
    output: str | None = None,
    runnable: bool = True,
) -> QdqPieces:
    """The weight ``name`` stored quantized (``name_quantized`` in the element type) behind a
    DequantizeLinear producing ``output`` (``name_dequantized``); scales from the weight by default."""
    out = output or f"{name}_dequantized"
    _check_runnable(fmt, runnable)
    w = np.asarray(weight, np.float32)
    if fmt.scale is ScaleType.NONE:
        return _plain(fmt, name, out, w)
    p = qparams(w, fmt, axis) if params is None else params
    nodes, inits, scale = _scale_pieces(fmt, name, p)
    zp = _zero_point(fmt, name, p)
    codes = numpy_helper.from_array(encode(w, fmt, axis, p).astype(element_type(fmt)[1]), f"{name}_quantized")
    attrs = _attrs(fmt, w.shape, axis)
    nodes.append(
        helper.make_node("DequantizeLinear", [codes.name, scale, zp.name], [out], name=f"{name}_dequantize", **attrs)
    )
    return QdqPieces(tuple(nodes), (*inits, zp, codes), min_opset(fmt), out)
