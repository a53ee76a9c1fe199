"""Dynamic block scales in ONNX arithmetic: an activation's MX / NVFP4 quantize-dequantize computed
inside a graph from each sample's own block maxima (what TensorRT's DynamicQuantize and the OCP MX
spec do at run time), for the gradient graph's statistics and for validate's simulation.

Geometry: blocks of B consecutive elements along one axis of the activation (the consumer's
reduction axis; ``score.formats_fit.activation_axis``). The tensor is viewed as [pre, D, post]
(``BlockLayout.view``: 0 copies a batch axis, −1 infers), zero-padded along D to a multiple of B,
then viewed as [pre, D/B, B, post]. Zero padding is ONNX's short last block (a blocked
QuantizeLinear's scale has ceil(D/B) entries) and ``formats.groups``' geometry: zeros change no
block maximum and quantize to zero.

Scales per block from amax = max|a| over the block (``formats.quantize``'s rules, same float32 ops):
- e8m0 (MX, OCP MX v1.0 §6.3): 2^(⌊log2 amax⌋ − emax_element), at least 2^−127 (amax 0 too);
- NVFP4 (NVIDIA ModelOpt's two-level recipe): a per-tensor float32 scale s = amax_calibrated/(6·448)
  (a graph input or constant) and per block e4m3(amax/6/s) (1 where amax is 0, at most 448, the
  smallest e4m3 subnormal where it rounds to 0), effective scale e4m3 · s.
Elements: v = a/scale saturated at ±max, rounded to nearest even on the element's grid: the spacing
is 2^(⌊log2|v|⌋ − m) floored at the subnormal spacing 2^(emin − m), so Round(v/spacing)·spacing is
exact float32 arithmetic and equals ml_dtypes' cast. ⌊log2⌋ comes from Veltkamp's split (five
elementwise ops; ``fisher.statistics.split_nodes`` is the same trick), for block maxima up to the
largest float32. Needs opset ≥ 11 (Round, Pad with input pads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import onnx
from onnx import TensorProto, helper

from fitonnx.errors import FitonnxError, UnsupportedError
from fitonnx.formats.types import ElementKind, Format, Granularity, ScaleType

MIN_OPSET = 11
AMAX_CUT = 2.0**100
SPLIT = float(2**23 + 1)
E8M0_MIN = 2.0**-127
Nodes = tuple[list[onnx.NodeProto], list[onnx.TensorProto]]


def is_dynamic_block(fmt: Format) -> bool:
    """Whether ``fmt`` is a block format whose scales an activation gets at run time (MX, NVFP4)."""
    return fmt.granularity is Granularity.BLOCK and fmt.scale in (ScaleType.E8M0, ScaleType.E4M3)


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor is cut into blocks: ``view`` the Reshape to [pre, D, post], D = ``length``."""

    view: tuple[int, int, int]
    length: int
    block: int

    @property
    def blocks(self) -> int:
        return math.ceil(self.length / self.block)

    @property
    def pad(self) -> int:
        return self.blocks * self.block - self.length


def block_layout(shape: tuple[int, ...], axis: int, block: int) -> BlockLayout:
    """The layout of blocks of ``block`` along ``axis`` of a tensor of ``shape`` (one sample's shape,
    axis 0 the batch axis when rank ≥ 2: other batch sizes fit the same view)."""
    shape = [int(d) for d in shape]
    if not -len(shape) <= axis < len(shape) or block < 1:
        raise FitonnxError(f"cannot cut blocks of {block} along axis {axis} of a tensor of shape {shape}")
    axis %= len(shape)
    length, post = shape[axis], math.prod(shape[axis + 1 :])
    if axis == 0:
        view = (1, length, -1)
    elif axis == 1:
        view = (0, length, -1)
    else:
        view = (-1, length, post)
    return BlockLayout(view, length, block)


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def pow2_floor_nodes(x: str, p: str) -> Nodes:
    """``p + "pow"`` = 2^⌊log2 x⌋ for finite 0 ≤ x < 2^104 (0 for 0; at most 2^−126 below 2^−126)."""
    mk = helper.make_node
    nodes = [
        mk("Mul", [x, p + "split"], [p + "xs"]),
        mk("Sub", [x, p + "xs"], [p + "d"]),
        mk("Add", [p + "d", p + "xs"], [p + "h"]),
        mk("Greater", [p + "h", x], [p + "high"]),
        mk("Mul", [p + "h", p + "half"], [p + "h2"]),
        mk("Where", [p + "high", p + "h2", p + "h"], [p + "pow"]),
    ]
    return nodes, [_scalar(p + "split", SPLIT), _scalar(p + "half", 0.5)]


def wide_pow2_floor_nodes(x: str, p: str) -> Nodes:
    """``p + "pow"`` = 2^⌊log2 x⌋ for any finite x ≥ 0: values from 2^100 on are split after a
    scaling by 2^−64 (x·SPLIT would overflow), the others directly (clipped to 2^100 first)."""
    mk = helper.make_node
    small, small_inits = pow2_floor_nodes(p + "xlo", p + "lo_")
    big, big_inits = pow2_floor_nodes(p + "xhi", p + "hi_")
    nodes = [
        mk("Min", [x, p + "cut"], [p + "xlo"]),
        mk("Mul", [x, p + "down"], [p + "xhi"]),
        *small,
        *big,
        mk("Mul", [p + "hi_pow", p + "up"], [p + "big"]),
        mk("Less", [x, p + "cut"], [p + "is_small"]),
        mk("Where", [p + "is_small", p + "lo_pow", p + "big"], [p + "pow"]),
    ]
    consts = {"cut": AMAX_CUT, "down": 2.0**-64, "up": 2.0**64}
    return nodes, small_inits + big_inits + [_scalar(p + k, c) for k, c in consts.items()]


def element_constants(fmt: Format) -> tuple[int, int, float]:
    """(mantissa bits, lowest normal exponent, largest value) of ``fmt``'s floating element."""
    info = ml_dtypes.finfo(fmt.dtype)
    return int(info.nmant), int(info.minexp), float(info.max)


def round_nodes(v: str, p: str, mant: int, emin: int, top: float) -> Nodes:
    """Round ``v`` to the nearest float with ``mant`` mantissa bits and exponent ≥ ``emin``, saturated at
    ±``top``. Outputs: ``p + "q"`` (the rounded value), ``p + "x"`` (|v|), ``p + "pw"`` (2^e of the
    binade of min(|v|, top), floored at 2^emin: the spacing is pw·2^−mant)."""
    mk = helper.make_node
    nodes = [
        mk("Abs", [v], [p + "x"]),
        mk("Min", [p + "x", p + "top"], [p + "xc"]),
    ]
    more, inits = pow2_floor_nodes(p + "xc", p)
    nodes += [
        *more,
        mk("Max", [p + "pow", p + "tiny"], [p + "pw"]),
        mk("Mul", [p + "pw", p + "ulp_factor"], [p + "ulp"]),
        mk("Min", [v, p + "top"], [p + "vhi"]),
        mk("Max", [p + "vhi", p + "ntop"], [p + "vc"]),
        mk("Div", [p + "vc", p + "ulp"], [p + "t"]),
        mk("Round", [p + "t"], [p + "r"]),
        mk("Mul", [p + "r", p + "ulp"], [p + "q"]),
    ]
    consts = {"top": top, "ntop": -top, "tiny": 2.0**emin, "ulp_factor": 2.0**-mant}
    return nodes, inits + [_scalar(p + k, c) for k, c in consts.items()]


def _reduce_max(x: str, axis: int, out: str, opset: int) -> Nodes:
    if opset >= 18:
        axes = helper.make_tensor(out + "_axes", TensorProto.INT64, [1], [axis])
        return [helper.make_node("ReduceMax", [x, axes.name], [out], keepdims=1)], [axes]
    return [helper.make_node("ReduceMax", [x], [out], axes=[axis], keepdims=1)], []


def blocked_nodes(x: str, p: str, layout: BlockLayout, opset: int) -> Nodes:
    """``p + "b"``: ``x`` viewed as [pre, D/B, B, post], zero-padded along D to whole blocks."""
    if opset < MIN_OPSET:
        raise UnsupportedError(
            f"dynamic block scales are computed at opset {MIN_OPSET} or later; the model has {opset}"
        )
    mk = helper.make_node
    view = helper.make_tensor(p + "view", TensorProto.INT64, [3], list(layout.view))
    four = helper.make_tensor(p + "four", TensorProto.INT64, [4], [0, layout.blocks, layout.block, -1])
    nodes, inits = [mk("Reshape", [x, view.name], [p + "v3"])], [view, four]
    src = p + "v3"
    if layout.pad:
        pads = helper.make_tensor(p + "pads", TensorProto.INT64, [6], [0, 0, 0, 0, layout.pad, 0])
        nodes.append(mk("Pad", [src, pads.name], [p + "v3p"], mode="constant"))
        inits.append(pads)
        src = p + "v3p"
    nodes.append(mk("Reshape", [src, four.name], [p + "b"]))
    return nodes, inits


def unblocked_nodes(y: str, like: str, p: str, layout: BlockLayout) -> Nodes:
    """``p + "out"``: a blocked ``y`` back in the shape of ``like`` (the padding sliced off)."""
    mk = helper.make_node
    three = helper.make_tensor(p + "three", TensorProto.INT64, [3], [0, layout.blocks * layout.block, -1])
    nodes, inits = [mk("Reshape", [y, three.name], [p + "u3"])], [three]
    src = p + "u3"
    if layout.pad:
        bounds = [
            helper.make_tensor(p + k, TensorProto.INT64, [1], [v])
            for k, v in (("sl0", 0), ("sl1", layout.length), ("slax", 1))
        ]
        nodes.append(mk("Slice", [src, *(b.name for b in bounds)], [p + "u3s"]))
        inits += bounds
        src = p + "u3s"
    nodes += [mk("Shape", [like], [p + "shape"]), mk("Reshape", [src, p + "shape"], [p + "out"])]
    return nodes, inits


def scale_nodes(xb: str, p: str, fmt: Format, opset: int, tensor_scale: str | None) -> Nodes:
    """``p + "scale"``: the effective float32 scale of every block of the blocked ``xb`` ([pre, n, 1, post]).
    ``tensor_scale`` names NVFP4's float32 per-tensor scale s (None for MX)."""
    mk = helper.make_node
    nodes = [mk("Abs", [xb], [p + "abs"])]
    red, inits = _reduce_max(p + "abs", 2, p + "amax", opset)
    nodes += red
    if fmt.scale is ScaleType.E8M0:
        emax = math.floor(math.log2(element_constants(fmt)[2]))
        more, more_inits = wide_pow2_floor_nodes(p + "amax", p + "e8_")
        nodes += [*more, mk("Mul", [p + "e8_pow", p + "emax"], [p + "mxs"])]
        nodes.append(mk("Max", [p + "mxs", p + "smin"], [p + "scale"]))
        consts = {"emax": 2.0**-emax, "smin": E8M0_MIN}
        return nodes, inits + more_inits + [_scalar(p + k, c) for k, c in consts.items()]
    if fmt.scale is not ScaleType.E4M3 or tensor_scale is None:
        raise FitonnxError(f"{fmt.name} has no dynamic block scale (expected MX or NVFP4 with a tensor scale)")
    info = ml_dtypes.finfo(ml_dtypes.float8_e4m3fn)  # the grid of the stored block scales
    mant, emin, top = int(info.nmant), int(info.minexp), float(info.max)
    rnd, rnd_inits = round_nodes(p + "b2", p + "e4_", mant, emin, top)
    nodes += [
        mk("Div", [p + "amax", p + "six"], [p + "a6"]),
        mk("Div", [p + "a6", tensor_scale], [p + "b0"]),
        mk("Equal", [p + "amax", p + "zero"], [p + "empty"]),
        mk("Where", [p + "empty", p + "one", p + "b0"], [p + "b1"]),
        mk("Min", [p + "b1", p + "e4max"], [p + "b2"]),
        *rnd,
        mk("Equal", [p + "e4_q", p + "zero"], [p + "under"]),
        mk("Where", [p + "under", p + "e4tiny", p + "e4_q"], [p + "stored"]),
        mk("Mul", [p + "stored", tensor_scale], [p + "scale"]),
    ]
    consts = {"six": 6.0, "zero": 0.0, "one": 1.0, "e4max": top, "e4tiny": 2.0 ** (emin - mant)}
    return nodes, inits + rnd_inits + [_scalar(p + k, c) for k, c in consts.items()]


def block_qdq_nodes(
    x: str, p: str, fmt: Format, layout: BlockLayout, opset: int, tensor_scale: str | None = None
) -> Nodes:
    """``p + "out"``: ``x`` through ``fmt``'s dynamic block quantize-dequantize, in ``x``'s shape."""
    if not is_dynamic_block(fmt):
        raise FitonnxError(f"{fmt.name} is not a dynamic block format (MX or NVFP4)")
    nodes, inits = blocked_nodes(x, p, layout, opset)
    more, more_inits = scale_nodes(p + "b", p, fmt, opset, tensor_scale)
    nodes += [*more, helper.make_node("Div", [p + "b", p + "scale"], [p + "v"])]
    rnd, rnd_inits = round_nodes(p + "v", p + "el_", *element_constants(fmt))
    nodes += [*rnd, helper.make_node("Mul", [p + "el_q", p + "scale"], [p + "dq"])]
    back, back_inits = unblocked_nodes(p + "dq", x, p, layout)
    return nodes + back, inits + more_inits + rnd_inits + back_inits


QDQ_OPSET = 21  # QuantizeLinear's block_size and output_dtype
ELEMENT_TYPES = {
    ElementKind.FP8_E4M3FN: (TensorProto.FLOAT8E4M3FN, 21),
    ElementKind.FP8_E5M2: (TensorProto.FLOAT8E5M2, 21),
    ElementKind.FP4_E2M1: (TensorProto.FLOAT4E2M1, 23),
}


def dynamic_qdq_opset(fmt: Format) -> int:
    """The lowest opset whose QuantizeLinear writes ``fmt``'s blocks with a scale computed at run time."""
    if not is_dynamic_block(fmt):
        raise FitonnxError(f"{fmt.name} is not a dynamic block format (MX or NVFP4)")
    return ELEMENT_TYPES[fmt.element][1]


def dynamic_qdq_nodes(
    x: str, p: str, fmt: Format, layout: BlockLayout, opset: int, tensor_scale: str | None = None
) -> Nodes:
    """``p + "out"``: ``x`` through ``fmt``'s dynamic blocks as QuantizeLinear→DequantizeLinear: each
    block's scale computed from its own max|x| (``scale_nodes``), the elements quantized by a blocked
    QuantizeLinear (``block_size`` B along the blocked view's block axis, ``output_dtype`` the element
    type, saturating), the same numbers as ``block_qdq_nodes``' arithmetic."""
    need = dynamic_qdq_opset(fmt)
    if opset < need:
        raise UnsupportedError(f"{fmt.name} as blocked QuantizeLinear needs opset {need}; the model has {opset}")
    nodes, inits = blocked_nodes(x, p, layout, opset)
    more, more_inits = scale_nodes(p + "b", p, fmt, opset, tensor_scale)
    attrs = {"axis": 2, "block_size": layout.block}
    mk = helper.make_node
    nodes += [
        *more,
        mk("QuantizeLinear", [p + "b", p + "scale"], [p + "q"], output_dtype=ELEMENT_TYPES[fmt.element][0], **attrs),
        mk("DequantizeLinear", [p + "q", p + "scale"], [p + "dq"], **attrs),
    ]
    back, back_inits = unblocked_nodes(p + "dq", x, p, layout)
    return nodes + back, inits + more_inits + back_inits
