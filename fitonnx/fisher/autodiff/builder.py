"""The node emitter that VJP rules share: fresh names, constants and shape-agnostic helpers.

Every helper emits default-domain ONNX ops valid from opset 13 (the engine lifts older models),
picking the attribute or input form of an op's axes by the target opset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.errors import InternalError, UnsupportedError

PREFIX = "fitonnx__ad_"


@dataclass(frozen=True)
class TensorInfo:
    """What shape inference knows of a forward tensor: element type and (partial) static shape."""

    elem_type: int
    shape: tuple[int | str | None, ...] | None  # None: rank unknown; str: a named symbolic dim


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of ``node``'s attribute ``name``, or ``default``."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} (node {node.name or node.output[0]!r})"


class Builder:
    """Collects the backward nodes and constants of one gradient graph."""

    def __init__(self, types: dict[str, TensorInfo], opset: int, taken: set[str], needed: set[str]) -> None:
        self.types = types
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._taken = taken
        self._needed = needed
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self._shapes: dict[str, str] = {}

    # -- names and emission -------------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        while True:
            self._count += 1
            name = f"{PREFIX}{hint}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def ops(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: object) -> list[str]:
        """Emit one node; return its ``n_out`` fresh output names."""
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        return self.ops(op_type, inputs, 1, **attrs)[0]

    def replay(self, node: onnx.NodeProto, inputs: Sequence[str], n_out: int = 1) -> list[str]:
        """Emit ``node``'s op with its attributes on other inputs (the VJP of selection ops)."""
        outs = [self.fresh(node.op_type.lower()) for _ in range(n_out)]
        new = helper.make_node(node.op_type, list(inputs), outs, name=outs[0])
        new.attribute.extend(node.attribute)
        self.nodes.append(new)
        return outs

    def needs(self, name: str) -> bool:
        """Whether ``name`` is on a float path from a differentiated tensor (its gradient is wanted)."""
        return bool(name) and name in self._needed

    # -- types and constants ------------------------------------------------------------------------
    def dtype(self, name: str) -> int:
        info = self.types.get(name)
        return info.elem_type if info is not None and info.elem_type else TensorProto.FLOAT

    def static_shape(self, name: str) -> tuple[int | str | None, ...] | None:
        info = self.types.get(name)
        return None if info is None else info.shape

    def rank(self, name: str, node: onnx.NodeProto | None = None) -> int:
        """The static rank of ``name``; one line naming ``node`` when shape inference did not find it."""
        shape = self.static_shape(name)
        if shape is None:
            where = f" at {describe(node)}" if node is not None else ""
            raise UnsupportedError(f"expected a known rank for tensor {name!r}{where}; shape inference found none")
        return len(shape)

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(hint)
            self.inits.append(numpy_helper.from_array(array, name))
            self.types[name] = TensorInfo(helper.np_dtype_to_tensor_dtype(array.dtype), tuple(array.shape))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), np.int64), "i")

    def int_scalar(self, value: int) -> str:
        return self.const(np.asarray(value, np.int64), "i")

    def scalar(self, value: float, like: str) -> str:
        """A 0-d constant of ``like``'s float type."""
        return self.const(np.asarray(value, helper.tensor_dtype_to_np_dtype(self.dtype(like))), "s")

    # -- shapes -------------------------------------------------------------------------------------
    def shape(self, x: str) -> str:
        if x not in self._shapes:
            self._shapes[x] = self.op("Shape", x)
        return self._shapes[x]

    def dims(self, x: str, start: int, end: int | None = None) -> str:
        """Shape(x)[start:end] (Shape's own start/end need opset 15)."""
        stop = np.iinfo(np.int64).max if end is None else end
        return self.op("Slice", self.shape(x), self.ints([start]), self.ints([stop]), self.ints([0]))

    def size(self, x: str) -> str:
        return self.op("Size", x)

    def filled(self, shape: str, value: float, like: str) -> str:
        dtype = helper.tensor_dtype_to_np_dtype(self.dtype(like))
        return self.op("ConstantOfShape", shape, value=numpy_helper.from_array(np.asarray([value], dtype)))

    def zeros_like(self, x: str) -> str:
        return self.filled(self.shape(x), 0.0, x)

    def count_ratio(self, x: str, y: str, like: str) -> str:
        """Size(x) / Size(y) as a scalar of ``like``'s type (the element count a mean divides by)."""
        to = self.dtype(like)
        return self.op("Div", self.op("Cast", self.size(x), to=to), self.op("Cast", self.size(y), to=to))

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | str | None, keepdims: int = 1) -> str:
        """A Reduce* with static (list) or dynamic (tensor name) axes; None reduces every axis."""
        input_form = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.op(op_type, x, keepdims=keepdims)
        if isinstance(axes, str):
            if not input_form:
                raise UnsupportedError(f"{op_type} with dynamic axes needs opset 18; the model has {self.opset}")
            return self.op(op_type, x, axes, keepdims=keepdims, noop_with_empty_axes=1)
        if not axes:
            return x
        if input_form:
            return self.op(op_type, x, self.ints(axes), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int] | str) -> str:
        return self.op("Unsqueeze", x, axes if isinstance(axes, str) else self.ints(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", x, self.ints(axes))

    def reshape_like(self, g: str, x: str) -> str:
        return self.op("Reshape", g, self.shape(x))

    def transpose_last2(self, x: str, rank: int | None) -> str:
        """Swap the last two axes; of a tensor of unknown rank (≥ 2) through a 3-D reshape."""
        if rank is not None:
            return self.op("Transpose", x, perm=[*range(rank - 2), rank - 1, rank - 2])
        last2 = self.dims(x, -2)
        cube = self.op("Reshape", x, self.op("Concat", self.ints([-1]), last2, axis=0))
        swapped = self.op("Transpose", cube, perm=[0, 2, 1])
        lead = self.op("Slice", self.shape(x), self.ints([0]), self.ints([-2]), self.ints([0]))
        back = self.op("Concat", lead, self.op("Gather", last2, self.ints([1, 0])), axis=0)
        return self.op("Reshape", swapped, back)

    def unbroadcast(self, g: str, x: str, y: str | tuple[int | str | None, ...] | None) -> str:
        """Sum ``g`` (shaped like the forward tensor ``y``, or of static shape ``y``) down to the shape
        of ``x``, which was broadcast to it: static axes where shapes are known, else at run time."""
        xs = self.static_shape(x)
        ys = self.static_shape(y) if isinstance(y, str) else y
        axes = _broadcast_axes(xs, ys)
        if axes is None:
            return self._unbroadcast_dynamic(g, x)
        if not axes:
            return g
        summed = self.reduce("ReduceSum", g, axes, keepdims=1)
        return summed if len(xs or ()) == len(ys or ()) else self.reshape_like(summed, x)

    def _unbroadcast_dynamic(self, g: str, x: str) -> str:
        """Reduce every axis where x (left-padded with ones to g's rank) has size 1, then reshape."""
        gs, xs = self.shape(g), self.shape(x)
        missing = self.op("Sub", self.size(gs), self.size(xs))
        ones = self.op(
            "ConstantOfShape", self.unsqueeze(missing, [0]), value=numpy_helper.from_array(np.ones(1, np.int64))
        )
        padded = self.op("Concat", ones, xs, axis=0)
        positions = self.op("Range", self.int_scalar(0), self.size(gs), self.int_scalar(1))
        axes = self.op("Compress", positions, self.op("Equal", padded, self.ints([1])), axis=0)
        return self.op("Reshape", self.reduce("ReduceSum", g, axes, keepdims=1), xs)

    def one_hot(self, indices: str, depth: str, like: str, axis: int) -> str:
        """OneHot in ``like``'s type (onnxruntime's OneHot has int64-index kernels with float output)."""
        on_off = self.const(np.asarray([0, 1], np.float32), "onoff")
        hot = self.op("OneHot", self.op("Cast", indices, to=TensorProto.INT64), depth, on_off, axis=axis)
        return hot if self.dtype(like) == TensorProto.FLOAT else self.op("Cast", hot, to=self.dtype(like))

    # -- scatter ------------------------------------------------------------------------------------
    def iota(self, x: str) -> str:
        """An int64 tensor shaped like ``x`` holding each element's flat (row-major) position."""
        flat = self.op("Range", self.int_scalar(0), self.size(x), self.int_scalar(1))
        return self.reshape_like(flat, x)

    def scatter_add(self, x: str, positions: str, g: str, extra: int = 0) -> str:
        """dx shaped like ``x``: the elements of ``g`` summed into the flat ``positions`` of x.

        ``extra`` slots past the end of x take positions that are not in x (padding) and are dropped.
        """
        flat_pos, flat_g = self.op("Reshape", positions, self.ints([-1])), self.op("Reshape", g, self.ints([-1]))
        total = self.op("Add", self.size(x), self.int_scalar(extra)) if extra else self.size(x)
        zeros = self.filled(self.unsqueeze(total, [0]), 0.0, x)
        if self.opset < 16:
            raise InternalError("scatter-add needs opset 16; the engine lifts models whose path needs it")
        out = self.op("ScatterElements", zeros, flat_pos, flat_g, axis=0, reduction="add")
        if extra:
            out = self.op("Slice", out, self.ints([0]), self.unsqueeze(self.size(x), [0]), self.ints([0]))
        return self.reshape_like(out, x)


def _broadcast_axes(
    xs: tuple[int | str | None, ...] | None, ys: tuple[int | str | None, ...] | None
) -> list[int] | None:
    """Axes of y that x was broadcast along, or None when the static shapes cannot tell."""
    if xs is None or ys is None or len(xs) > len(ys):
        return None
    lead = len(ys) - len(xs)
    axes = list(range(lead))
    for i, (dx, dy) in enumerate(zip(xs, ys[lead:], strict=True)):
        if dx == 1 and dy != 1:
            axes.append(lead + i)
        elif dx is None or dx != dy:
            return None  # unknown or differently named dims: x's may be 1 at run time
    return axes
