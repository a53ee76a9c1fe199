"""Dynamic block formats (MX, NVFP4) on activations in validate's simulation (``simulate``).

An activation in a block format is its own mode of the pattern of activation modes that picks a
model variant and its session (``BlockMode``: format and block axis), beside kept, integer and
floating: its variant gets that format's block quantize-dequantize (``formats.block_nodes``: scales
from each sample's own block maxima) and nothing else on that activation. ``BlockInputs`` names what
a configuration sets: ``on`` (in the settings, it picks the mode) and NVFP4's float32 tensor scale
(a graph input of the variant; MX has none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from fitonnx.analysis.choices import BlockGrid
from fitonnx.errors import InternalError
from fitonnx.formats import Format, ScaleType, block_nodes, parse_format
from fitonnx.formats.block_nodes import BlockLayout, is_dynamic_block
from fitonnx.formats.quantize import nvfp4_tensor_scale
from fitonnx.model import graph
from fitonnx.model.graph import QuantTensor
from fitonnx.score.formats_fit import activation_axis


@dataclass(frozen=True)
class BlockMode:
    """An activation in dynamic block format ``format`` (blocks along ``axis``): a pattern's mode."""

    format: str
    axis: int


@dataclass(frozen=True)
class BlockInputs:
    """One dynamic block format an activation may take in the simulation: ``on`` selects it in the
    settings, ``tensor_scale`` is NVFP4's float32 tensor scale (a variant's input; unused by MX),
    ``shape`` the activation's per-sample shape, ``opset`` the graph's."""

    format: str
    axis: int
    on: str
    tensor_scale: str
    shape: tuple[int, ...]
    opset: int

    @property
    def layout(self) -> BlockLayout:
        return block_nodes.block_layout(self.shape, self.axis, parse_format(self.format).block_size or 1)

    @property
    def mode(self) -> BlockMode:
        return BlockMode(self.format, self.axis)

    @property
    def scaled(self) -> bool:
        """Whether the format has a tensor scale (NVFP4's two-level scales)."""
        return parse_format(self.format).scale is ScaleType.E4M3


@dataclass(frozen=True)
class BlockPlan:
    """The dynamic block formats the simulation offers activations, with what places them."""

    formats: tuple[Format, ...] = ()
    model: onnx.ModelProto | None = None
    opset: int = 0

    @staticmethod
    def of(model: onnx.ModelProto, formats: Sequence[Format]) -> BlockPlan:
        return BlockPlan(tuple(f for f in formats if is_dynamic_block(f)), model, graph.default_opset(model))


def block_inputs(prefix: str, act: QuantTensor, dtype: np.dtype, plan: BlockPlan) -> tuple[BlockInputs, ...]:
    """The block formats of ``plan`` activation ``act`` may take: all of them for a float32
    activation of fully known per-sample shape whose consumers agree on a reduction axis, at opset
    ≥ 11; none otherwise."""
    shape = act.shape or ()
    known = bool(shape) and all(isinstance(d, int) for d in shape)
    if not plan.formats or not known or plan.model is None:
        return ()
    axis = activation_axis(plan.model, act.name, len(shape))
    rank = len(shape)
    if axis is None or not -rank <= axis < rank or dtype != np.float32 or plan.opset < block_nodes.MIN_OPSET:
        return ()
    return tuple(
        BlockInputs(
            f.name,
            axis,
            f"{prefix}blk{k}_on",
            f"{prefix}blk{k}_ts",
            tuple(int(d) for d in shape),
            plan.opset,
        )
        for k, f in enumerate(plan.formats)
    )


def find(blocks: Sequence[BlockInputs], fmt_name: str) -> BlockInputs | None:
    """The block inputs of format ``fmt_name`` among an activation's, if it may take it."""
    return next((b for b in blocks if b.format == fmt_name), None)


def mode_inputs(blocks: Sequence[BlockInputs], mode: BlockMode) -> BlockInputs:
    """The block inputs of an activation for ``mode``."""
    found = next((b for b in blocks if b.mode == mode), None)
    if found is None:
        raise InternalError(f"the simulation has no {mode.format} block quantizer along axis {mode.axis} here")
    return found


def block_quantizer(g: onnx.GraphProto, name: str, prefix: str, bi: BlockInputs) -> list[onnx.NodeProto]:
    """The nodes of activation ``name``'s dynamic block quantize-dequantize (its constants and, for
    NVFP4, its tensor scale input declared in ``g``); the last node's output is the quantized value."""
    q = prefix + "blk_"
    scale = bi.tensor_scale if bi.scaled else None
    if scale is not None:
        g.input.append(helper.make_tensor_value_info(scale, TensorProto.FLOAT, []))
    fmt = parse_format(bi.format)
    nodes, inits = block_nodes.block_qdq_nodes(name, q, fmt, bi.layout, bi.opset, scale)
    g.initializer.extend(inits)
    return nodes


def block_grid(blocks: Sequence[BlockInputs], fmt: Format, act_range: tuple[float, float]) -> BlockGrid:
    """The dynamic block quantizer ``fmt`` of an activation with ``blocks`` (NVFP4: the tensor scale
    from the calibrated range)."""
    bi = find(blocks, fmt.name)
    if bi is None:
        raise InternalError(f"the simulation has no {fmt.name} block quantizer for this activation")
    lo, hi = act_range
    scale = float(nvfp4_tensor_scale(max(abs(lo), abs(hi)))) if fmt.scale is ScaleType.E4M3 else 1.0
    return BlockGrid(fmt, bi.shape, bi.axis, scale, bi.opset)


def block_settings(blocks: Sequence[BlockInputs], chosen: BlockGrid | None) -> dict[str, np.ndarray]:
    """The settings of an activation's block formats: ``chosen``'s on (with its tensor scale), the others off."""
    feed: dict[str, np.ndarray] = {}
    for b in blocks:
        on = chosen is not None and chosen.fmt.name == b.format
        feed[b.on] = np.array(on)
        feed[b.tensor_scale] = np.array(chosen.tensor_scale if on and chosen else 1.0, np.float32)
    return feed


def picked(blocks: Sequence[BlockInputs], settings: Mapping[str, np.ndarray]) -> BlockMode | None:
    """The block format ``settings`` pick for an activation, if any."""
    return next((b.mode for b in blocks if bool(settings[b.on])), None)


def graph_inputs(
    blocks: Sequence[BlockInputs], mode: BlockMode, settings: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The graph inputs of an activation's block quantizer in ``mode``: NVFP4's tensor scale, none for MX."""
    b = mode_inputs(blocks, mode)
    return {b.tensor_scale: settings[b.tensor_scale]} if b.scaled else {}
