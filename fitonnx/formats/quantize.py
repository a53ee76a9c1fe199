"""Quantize-dequantize exactly as ONNX QuantizeLinear→DequantizeLinear computes it, and storage costs.

Arithmetic is float32, as ONNX Runtime's kernels do it on float32 tensors: ``q = saturate(rint(x /
scale) + zero_point)`` with round half to even, and ``y = (q − zero_point) · scale``. Floating
elements divide by the scale and cast with ONNX's saturate=True (finite values beyond the largest
magnitude become it), through ml_dtypes. fp16/bf16 are plain casts (overflow gives ±inf, as Cast).

Scales per group (``groups.group_shape``):
- integer symmetric (``intN``): max|x| / (2^(N−1) − 1), zero point 0, levels −2^(N−1)…2^(N−1) − 1;
- integer min/max (``uintN``): Δ = (max − min)/(2^N − 1) over the range widened to hold 0 and
  zero point −round(min/Δ) (``fitonnx.noise.step``/``zero_point``: 0 is a level), levels 0…2^N − 1;
- floating, float32 scale: max|x| / max_element (TensorRT FP8);
- MX (e8m0): 2^(floor(log2 max|x|) − emax_element), the OCP MX v1.0 rule;
- NVFP4: a float32 tensor scale s = max|x| / (6 · 448) and per block the e4m3 scale
  e4m3(max_block|x| / 6 / s); the effective scale is e4m3 · s (NVIDIA ModelOpt's two-level recipe).
An all-zero group gets scale 1 (any scale maps it to itself); an NVFP4 block scale that rounds to 0
in e4m3 becomes e4m3's smallest subnormal so that no division by zero reaches the kernel.
Inputs must be NaN-free and ranges finite; the result is float32. Beyond the range values saturate
as the ONNX spec says, however far: onnxruntime 1.19.2's blocked and int4 kernels instead wrap around
where |x/scale| ≥ 2^31 (1.32.0 saturates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from fitonnx.errors import FitonnxError
from fitonnx.formats import groups
from fitonnx.formats.types import Format, ScaleType

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
E8M0_EXPONENTS = (-127, 127)
NVFP4_GLOBAL = 6.0 * 448.0  # fp4 e2m1 max · fp8 e4m3 max


@dataclass(frozen=True)
class QParams:
    """A format's parameters over one tensor, each in the group shape.

    ``scale`` is the effective float32 scale per group (what DequantizeLinear multiplies by);
    ``zero_point`` the integer zero point (int64, 0 for symmetric and floating formats);
    ``stored_scale`` the scale as stored for two-level formats (e8m0 or e4m3 dtype) with
    ``global_scale`` the NVFP4 per-tensor float32 factor (1 otherwise).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    stored_scale: np.ndarray | None = None
    global_scale: float = 1.0


def int_limits(fmt: Format) -> tuple[int, int]:
    """The integer levels (qmin, qmax) of an integer format."""
    if fmt.asymmetric:
        return 0, 2**fmt.bits - 1
    return -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1


def element_max(fmt: Format) -> float:
    return float(ml_dtypes.finfo(fmt.dtype).max)


def _nonzero(scale: np.ndarray) -> np.ndarray:
    s = np.asarray(scale, np.float32)
    return np.where(s == 0, np.float32(1.0), s).astype(np.float32)


def _int_params(fmt: Format, lo: np.ndarray, hi: np.ndarray) -> QParams:
    if not fmt.asymmetric:
        step = np.maximum(np.abs(lo), np.abs(hi)) / (2.0 ** (fmt.bits - 1) - 1.0)
        return QParams(_nonzero(step), np.zeros(step.shape, np.int64))
    lo0, hi0 = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    step = (hi0 - lo0) / (2.0**fmt.bits - 1.0)
    zp = np.where(step == 0, 0.0, -np.round(lo0 / np.where(step == 0, 1.0, step)))
    return QParams(_nonzero(step), zp.astype(np.int64))


def _mx_params(fmt: Format, amax: np.ndarray) -> QParams:
    emax = math.floor(math.log2(element_max(fmt)))
    _, e = np.frexp(amax)  # amax = m · 2^e with m in [0.5, 1): floor(log2 amax) = e − 1
    shared = np.where(amax == 0, E8M0_EXPONENTS[0], e.astype(np.int64) - 1 - emax)
    shared = np.clip(shared, *E8M0_EXPONENTS)
    scale = np.ldexp(np.float32(1.0), shared.astype(np.int32)).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int64), stored_scale=scale.astype(E8M0))


def nvfp4_tensor_scale(tensor_max: float) -> np.float32:
    """NVFP4's float32 per-tensor scale for a tensor's max|x|: max/(6·448), 1 for an all-zero tensor."""
    top = np.float32(tensor_max)
    return np.float32(1.0) if top == 0 else np.float32(top / np.float32(NVFP4_GLOBAL))


def _nv_params(amax: np.ndarray, calibrated: float | None = None) -> QParams:
    s = nvfp4_tensor_scale(float(amax.max()) if calibrated is None else calibrated)
    block = (amax.astype(np.float32) / np.float32(6.0)) / s
    block = np.where(amax == 0, np.float32(1.0), np.minimum(block, np.float32(448.0))).astype(np.float32)
    stored = block.astype(E4M3)
    tiny = np.float32(ml_dtypes.finfo(E4M3).smallest_subnormal).astype(E4M3)
    stored = np.where(stored.astype(np.float32) == 0, tiny, stored).astype(E4M3)
    scale = (stored.astype(np.float32) * s).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int64), stored_scale=stored, global_scale=float(s))


def params_from_range(fmt: Format, lo: np.ndarray | float, hi: np.ndarray | float) -> QParams:
    """Parameters for groups spanning [lo, hi] (arrays in the group shape, or scalars per tensor),
    e.g. an activation's calibrated range; values outside saturate as the format defines."""
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if not (np.all(np.isfinite(lo64)) and np.all(np.isfinite(hi64))):
        raise FitonnxError(f"{fmt.name}: expected a finite range to scale from; found non-finite values")
    if fmt.is_int:
        return _int_params(fmt, lo64, hi64)
    amax = np.maximum(np.abs(lo64), np.abs(hi64))
    if fmt.scale is ScaleType.NONE:
        return QParams(np.ones(amax.shape, np.float32), np.zeros(amax.shape, np.int64))
    if fmt.scale is ScaleType.E8M0:
        return _mx_params(fmt, amax)
    if fmt.scale is ScaleType.E4M3:
        return _nv_params(amax)
    return QParams(_nonzero(amax / element_max(fmt)), np.zeros(amax.shape, np.int64))


def qparams(x: np.ndarray, fmt: Format, axis: int | None) -> QParams:
    """The parameters a toolchain derives from the tensor itself (a weight), per group."""
    x = np.asarray(x, np.float32)
    return params_from_range(fmt, groups.group_min(fmt, x, axis), groups.group_max(fmt, x, axis))


def dynamic_qparams(x: np.ndarray, fmt: Format, axis: int, tensor_amax: float | None = None) -> QParams:
    """The parameters a toolchain derives at run time for one sample's activation ``x`` under a block
    format with MX or NVFP4 scales: each block's scale from its own max|x|; NVFP4's float32 tensor
    scale from ``tensor_amax``, the max|a| calibrated beforehand (ModelOpt: amax/(6·448))."""
    if fmt.scale not in (ScaleType.E8M0, ScaleType.E4M3):
        raise FitonnxError(f"{fmt.name} has no dynamic block scales (expected an MX or NVFP4 format)")
    x = np.asarray(x, np.float32)
    if fmt.scale is ScaleType.E8M0:
        return qparams(x, fmt, axis)
    if tensor_amax is None or not math.isfinite(tensor_amax):
        raise FitonnxError(f"{fmt.name} on an activation needs its calibrated max|a|; found {tensor_amax}")
    lo, hi = groups.group_min(fmt, x, axis), groups.group_max(fmt, x, axis)
    amax = np.maximum(np.abs(lo.astype(np.float64)), np.abs(hi.astype(np.float64)))
    return _nv_params(amax, tensor_amax)


def _check_params(fmt: Format, params: QParams, shape: tuple[int, ...], axis: int | None) -> None:
    expected = groups.group_shape(fmt, shape, axis)
    if np.shape(params.scale) != expected and math.prod(np.shape(params.scale)) != 1:
        raise FitonnxError(
            f"{fmt.name} over shape {shape}: expected scales of shape {expected}; found {params.scale.shape}"
        )


def encode(x: np.ndarray, fmt: Format, axis: int | None, params: QParams) -> np.ndarray:
    """QuantizeLinear: the stored codes (int64 levels for integers, the element dtype for floats)."""
    x = np.asarray(x, np.float32)
    _check_params(fmt, params, x.shape, axis)
    if np.isnan(x).any():
        raise FitonnxError(f"{fmt.name}: cannot quantize NaN (a tensor of shape {x.shape} holds some)")
    if fmt.scale is ScaleType.NONE:
        with np.errstate(over="ignore"):  # beyond the largest finite value Cast gives ±inf, so does numpy
            return x.astype(fmt.dtype)
    gshape = groups.group_shape(fmt, x.shape, axis)
    scale = groups.expand(fmt, np.asarray(params.scale, np.float32).reshape(gshape), x.shape, axis)
    with np.errstate(over="ignore"):
        v = x / scale
    if fmt.is_int:
        zp = groups.expand(fmt, params.zero_point.reshape(gshape), x.shape, axis)
        return np.clip(np.rint(v).astype(np.float64) + zp, *int_limits(fmt)).astype(np.int64)
    top = np.float32(element_max(fmt))
    return np.clip(v, -top, top).astype(fmt.dtype)


def decode(codes: np.ndarray, fmt: Format, axis: int | None, params: QParams) -> np.ndarray:
    """DequantizeLinear: float32 values of stored codes."""
    shape = np.shape(codes)
    if fmt.scale is ScaleType.NONE:
        return np.asarray(codes).astype(np.float32)
    gshape = groups.group_shape(fmt, shape, axis)
    scale = groups.expand(fmt, np.asarray(params.scale, np.float32).reshape(gshape), shape, axis)
    if fmt.is_int:
        zp = groups.expand(fmt, params.zero_point.reshape(gshape), shape, axis)
        return ((np.asarray(codes, np.int64) - zp).astype(np.float32) * scale).astype(np.float32)
    return (np.asarray(codes).astype(np.float32) * scale).astype(np.float32)


def quantize_dequantize(x: np.ndarray, fmt: Format, axis: int | None, params: QParams | None = None) -> np.ndarray:
    """x through QuantizeLinear→DequantizeLinear of ``fmt`` along ``axis`` (float32). Without
    ``params`` the scales come from x itself, as for a weight."""
    x = np.asarray(x, np.float32)
    p = qparams(x, fmt, axis) if params is None else params
    return decode(encode(x, fmt, axis, p), fmt, axis, p)


def _scale_bits(fmt: Format) -> int:
    return {ScaleType.NONE: 0, ScaleType.FLOAT32: 32, ScaleType.E8M0: 8, ScaleType.E4M3: 8}[fmt.scale]


def storage_bits(fmt: Format, shape: tuple[int, ...], axis: int | None) -> int:
    """Total bits to store a tensor of ``shape``: elements, one scale per group, one zero point
    per group for min/max integer grids (symmetric ones store none: it is 0), and NVFP4's one
    float32 tensor scale."""
    n = math.prod(shape)
    n_groups = 0 if fmt.scale is ScaleType.NONE else math.prod(groups.group_shape(fmt, tuple(shape), axis))
    per_group = _scale_bits(fmt) + (fmt.bits if fmt.is_int and fmt.asymmetric else 0)
    extra = 32 if fmt.scale is ScaleType.E4M3 else 0
    return n * fmt.bits + n_groups * per_group + extra


def bits_per_element(fmt: Format, shape: tuple[int, ...], axis: int | None) -> float:
    """Exact storage cost per element, scales and zero points included (``storage_bits`` / size)."""
    n = math.prod(shape)
    if n == 0:
        raise FitonnxError(f"a tensor of shape {tuple(shape)} has no elements to cost")
    return storage_bits(fmt, tuple(shape), axis) / n
