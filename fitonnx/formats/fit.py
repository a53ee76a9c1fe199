"""FIT noise statistics for any format: FIT_t(f) = Σ_j F_jj · E[δ_j²](f).

- Integer grids: every element of group g is perturbed by rounding noise with E[δ²] = Δ_g²/12
  (Δ_g the group's float32 scale), so FIT = Σ_g (Σ_{j∈g} F_jj) · Δ_g²/12; per tensor this is the
  paper's Tr(F)·Δ²/12 (``fitonnx.noise.fit``). ``group_delta_sq`` gives Δ_g² in the group shape, and
  the gradient graph needs only the per-group Fisher mass ``groups.group_sums(fmt, g², axis)``
  averaged over samples: FIT = Σ (group mass · group_delta_sq / 12).
- Floating formats: an element v = x/scale in the binade [2^e, 2^(e+1)) of a format with m
  mantissa bits has spacing 2^(e−m) (the subnormal spacing below the normal range, 0 included),
  so E[δ²] = (scale · 2^(e−m))²/12 grows with |x|. Beyond the largest magnitude the error is the
  deterministic saturation error (|v| − max)·scale; fp16/bf16 do not saturate, so from the
  overflow threshold on it is infinite. For activations this depends on each sample's values:
  compute Σ_j g_ij² · ``noise_power(fmt, a_i, axis, params)`` per sample with the calibrated params.
- For weights also the deterministic measured error Σ_j F_jj (Q(w_j) − w_j)² (``fit_measured``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from fitonnx.errors import FitonnxError
from fitonnx.formats import groups
from fitonnx.formats.quantize import QParams, qparams, quantize_dequantize
from fitonnx.formats.types import Format, ScaleType


def _params(x: np.ndarray, fmt: Format, axis: int | None, params: QParams | None) -> QParams:
    return qparams(x, fmt, axis) if params is None else params


def group_delta_sq(fmt: Format, x: np.ndarray, axis: int | None, params: QParams | None = None) -> np.ndarray:
    """Δ_g² per group of an integer format (float64, group shape), Δ_g the scale the grid uses."""
    if not fmt.is_int:
        raise FitonnxError(f"{fmt.name} is a floating format: its step varies per element, use noise_power")
    x = np.asarray(x, np.float32)
    scale = np.asarray(_params(x, fmt, axis, params).scale, np.float64)
    return scale.reshape(groups.group_shape(fmt, x.shape, axis)) ** 2


def _float_noise(fmt: Format, v: np.ndarray) -> np.ndarray:
    """E[δ²] in units of the scale² for element values v (float64) of a floating format."""
    info = ml_dtypes.finfo(fmt.dtype)
    top, mant, emin = float(info.max), int(info.nmant), int(info.minexp)
    a = np.abs(v)
    _, binade = np.frexp(a)  # a = m · 2^e with m in [0.5, 1): the binade is e − 1
    binade -= 1
    np.maximum(binade, emin, out=binade)
    binade[a == 0] = emin  # frexp(0) has exponent 0
    power = np.ldexp(1.0 / 12.0, 2 * (binade - mant))  # (2^(e−m))²/12, exact: a power-of-two scaling
    over = a > top
    if over.any():
        power[over] = (a[over] - top) ** 2
    if fmt.scale is ScaleType.NONE:
        threshold = top + float(np.ldexp(1.0, int(np.floor(np.log2(top))) - mant)) / 2.0
        power[a >= threshold] = np.inf
    return power


def noise_power(fmt: Format, x: np.ndarray, axis: int | None, params: QParams | None = None) -> np.ndarray:
    """Per element E[δ²] (float64, x's shape): Δ_g²/12 for integers, the binade rule for floats."""
    x = np.asarray(x, np.float32)
    p = _params(x, fmt, axis, params)
    gshape = groups.group_shape(fmt, x.shape, axis)
    scale = groups.expand(fmt, np.asarray(p.scale, np.float64).reshape(gshape), x.shape, axis)
    if fmt.is_int:
        return np.array(scale**2 / 12.0)
    return _float_noise(fmt, x.astype(np.float64) / scale) * scale**2


def group_fit(
    fmt: Format, x: np.ndarray, fisher: np.ndarray, axis: int | None, params: QParams | None = None
) -> np.ndarray:
    """Σ_{j∈g} F_jj · E[δ_j²] per group (float64, group shape); integers: (Σ_g F) · Δ_g²/12."""
    x = np.asarray(x, np.float32)
    _check_fisher(x, fisher)
    if fmt.is_int:
        return groups.group_sums(fmt, fisher, axis) * group_delta_sq(fmt, x, axis, params) / 12.0
    return groups.group_sums(fmt, np.asarray(fisher, np.float64) * noise_power(fmt, x, axis, params), axis)


def fit_expected(
    fmt: Format, x: np.ndarray, fisher: np.ndarray, axis: int | None, params: QParams | None = None
) -> float:
    """FIT_t(f) = Σ_j F_jj · E[δ_j²](f) under the format's noise model."""
    return float(group_fit(fmt, x, fisher, axis, params).sum())


def fit_measured(
    fmt: Format, w: np.ndarray, fisher: np.ndarray, axis: int | None, params: QParams | None = None
) -> float:
    """Σ_j F_jj · (Q(w_j) − w_j)²: the weight's actual quantization error weighted by the Fisher diagonal."""
    w = np.asarray(w, np.float32)
    _check_fisher(w, fisher)
    err = quantize_dequantize(w, fmt, axis, params).astype(np.float64) - w.astype(np.float64)
    return float(np.sum(np.asarray(fisher, np.float64) * err**2))


def _check_fisher(x: np.ndarray, fisher: np.ndarray) -> None:
    if np.shape(fisher) != x.shape:
        raise FitonnxError(f"expected a Fisher diagonal of the tensor's shape {x.shape}; found {np.shape(fisher)}")
