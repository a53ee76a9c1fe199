"""Which elements share a scale: the group geometry of a format over a tensor shape.

Contract (used by the quantizer, the noise statistics and the gradient graph alike):

- ``group_shape(fmt, shape, axis)`` is the shape of the per-group arrays (scales, zero points,
  Fisher sums), of the same rank as the tensor so that they broadcast: all 1s per tensor; the
  axis's length there and 1s elsewhere per channel; per block the tensor's shape with the axis's
  length D replaced by ceil(D / B) (ONNX's blocked QuantizeLinear scale shape, the last block
  may be short).
- ``group_index(fmt, shape, axis)`` maps every element to the flat (C-order) index of its group
  in that array, so ``np.bincount(group_index(...).ravel(), values.ravel())`` sums per group.
- ``group_sums(fmt, values, axis)`` is that sum in the group shape: per channel the ReduceSum over
  every other axis, per block the sum over each run of B elements along the axis. A gradient
  graph that wants per-group Fisher mass computes exactly this on the per-sample squared
  gradients g_ij² and averages over samples.
- ``expand(fmt, groups, shape, axis)`` broadcasts a per-group array back to the elements.
"""

from __future__ import annotations

import math

import numpy as np

from fitonnx.errors import FitonnxError
from fitonnx.formats.types import Format, Granularity


def normalize_axis(fmt: Format, shape: tuple[int, ...], axis: int | None) -> int | None:
    """The non-negative axis a per-channel/per-block format needs (None per tensor)."""
    if fmt.granularity is Granularity.TENSOR:
        return None
    if axis is None:
        raise FitonnxError(f"format {fmt.name} is applied along an axis; none was given for a tensor of shape {shape}")
    if not -len(shape) <= axis < len(shape):
        raise FitonnxError(f"axis {axis} is out of range for a tensor of shape {shape} (format {fmt.name})")
    return axis % len(shape)


def group_shape(fmt: Format, shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """The shape of per-group arrays, broadcastable against the tensor (see module docstring)."""
    shape = tuple(shape)
    ax = normalize_axis(fmt, shape, axis)
    if ax is None:
        return (1,) * len(shape)
    if fmt.granularity is Granularity.CHANNEL:
        return tuple(d if k == ax else 1 for k, d in enumerate(shape))
    assert fmt.block_size is not None
    return tuple(math.ceil(d / fmt.block_size) if k == ax else d for k, d in enumerate(shape))


def expand(fmt: Format, groups: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """A per-group array (in ``group_shape``) repeated onto the elements of a tensor of ``shape``."""
    shape = tuple(shape)
    ax = normalize_axis(fmt, shape, axis)
    if fmt.granularity is not Granularity.BLOCK or ax is None:
        return np.broadcast_to(groups, shape)
    assert fmt.block_size is not None
    rep = np.repeat(groups, fmt.block_size, axis=ax)
    return np.take(rep, np.arange(shape[ax]), axis=ax)


def group_index(fmt: Format, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """Per element, the flat index of its group in a ``group_shape`` array (int64, tensor's shape)."""
    gshape = group_shape(fmt, shape, axis)
    ids = np.arange(math.prod(gshape), dtype=np.int64).reshape(gshape)
    return np.ascontiguousarray(expand(fmt, ids, tuple(shape), axis))


def _reduce(fmt: Format, x: np.ndarray, axis: int | None, ufunc: np.ufunc) -> np.ndarray:
    ax = normalize_axis(fmt, x.shape, axis)
    if x.size == 0:
        raise FitonnxError(f"cannot quantize an empty tensor of shape {x.shape} with {fmt.name}")
    if ax is None:
        return ufunc.reduce(x, axis=None, keepdims=True)
    if fmt.granularity is Granularity.CHANNEL:
        others = tuple(k for k in range(x.ndim) if k != ax)
        return ufunc.reduce(x, axis=others, keepdims=True)
    assert fmt.block_size is not None
    return ufunc.reduceat(x, np.arange(0, x.shape[ax], fmt.block_size), axis=ax)


def group_sums(fmt: Format, values: np.ndarray, axis: int | None) -> np.ndarray:
    """Σ of ``values`` over each group, in float64 and the group shape."""
    return _reduce(fmt, np.asarray(values, np.float64), axis, np.add)


def group_min(fmt: Format, x: np.ndarray, axis: int | None) -> np.ndarray:
    return _reduce(fmt, np.asarray(x), axis, np.minimum)


def group_max(fmt: Format, x: np.ndarray, axis: int | None) -> np.ndarray:
    return _reduce(fmt, np.asarray(x), axis, np.maximum)
