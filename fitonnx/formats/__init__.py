"""Quantization formats: what a toolchain stores per tensor, how it rounds, what it costs, its FIT noise.

A self-contained package (numpy, ml_dtypes, onnx): ``types`` (the vocabulary and names),
``registry`` (named presets), ``groups`` (which elements share a scale), ``quantize`` (ONNX
QuantizeLinear/DequantizeLinear semantics, storage cost), ``fit`` (noise statistics) and
``onnx_nodes`` (the Q/DQ nodes that apply a format in a graph).
"""

from __future__ import annotations

from fitonnx.formats.fit import fit_expected, fit_measured, group_delta_sq, group_fit, noise_power
from fitonnx.formats.groups import expand, group_index, group_shape, group_sums
from fitonnx.formats.onnx_nodes import QdqPieces, activation_qdq, element_type, min_opset, weight_qdq
from fitonnx.formats.quantize import (
    QParams,
    bits_per_element,
    decode,
    dynamic_qparams,
    encode,
    params_from_range,
    qparams,
    quantize_dequantize,
    storage_bits,
)
from fitonnx.formats.registry import FORMATS, get_format, parse_format, register
from fitonnx.formats.types import ElementKind, Format, Granularity, RangeMethod, ScaleType

__all__ = [
    "FORMATS",
    "ElementKind",
    "Format",
    "Granularity",
    "QParams",
    "QdqPieces",
    "RangeMethod",
    "ScaleType",
    "activation_qdq",
    "bits_per_element",
    "decode",
    "dynamic_qparams",
    "element_type",
    "encode",
    "expand",
    "fit_expected",
    "fit_measured",
    "get_format",
    "group_delta_sq",
    "group_fit",
    "group_index",
    "group_shape",
    "group_sums",
    "min_opset",
    "noise_power",
    "params_from_range",
    "parse_format",
    "qparams",
    "quantize_dequantize",
    "register",
    "storage_bits",
    "weight_qdq",
]
