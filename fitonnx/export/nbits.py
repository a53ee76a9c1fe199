"""ONNX Runtime's MatMulNBits, written by onnxruntime.quantization's own MatMul n-bits quantizer.

The ``ort`` target stores a MatMul weight chosen in a blocked ``uintN/bB`` format as
``com.microsoft.MatMulNBits`` (N = 4 or 8 bits, blocks of B along the reduction axis K, a float
scale and an N-bit zero point per block: the asymmetric min/max grid, ``is_symmetric=False``).
``MatMulNBitsQuantizer`` quantizes every MatMul with a constant weight unless told otherwise, with
one bit width and block size per call: each (bits, block) group of the recommendation is one
call whose ``nodes_to_exclude`` names every other MatMul, so only the chosen MatMuls become
MatMulNBits, each with its own configuration. Its round-to-nearest result equals
``formats.quantize_dequantize`` of the same ``uintN/bB`` format (tested), so FIT and the
simulation describe the model it writes.

onnxruntime-training 1.19 has no such quantizer (its ``quantize_matmul_4bits`` kernel binding is
missing); there the export fails with a one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import onnx

from fitonnx.errors import InternalError, UnsupportedError
from fitonnx.formats import Format, Granularity

try:  # onnxruntime >= 1.20; 1.32 needs onnx-ir (an install requirement of fitonnx)
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
except ImportError as _exc:  # pragma: no cover - depends on the installed onnxruntime
    MatMulNBitsQuantizer = None
    DefaultWeightOnlyQuantConfig = None
    _MISSING = f"{type(_exc).__name__}: {_exc}"
else:
    _MISSING = ""

NBITS_BITS = (4, 8)
LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


def nbits_weights(model: onnx.ModelProto, weight_formats: Mapping[str, Format]) -> dict[str, Format]:
    """The weights MatMulNBits stores: blocked asymmetric 4/8-bit formats of 2-D weights read only by MatMul at input 1."""
    readers: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, slot))
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    return {
        name: fmt
        for name, fmt in weight_formats.items()
        if fmt.granularity is Granularity.BLOCK
        and fmt.is_int
        and fmt.asymmetric
        and fmt.bits in NBITS_BITS
        and ranks.get(name) == 2
        and readers.get(name) == {("MatMul", 1)}
    }


def _matmuls(model: onnx.ModelProto, weights: set[str]) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]


def apply_nbits(model: onnx.ModelProto, weights: Mapping[str, Format]) -> onnx.ModelProto:
    """A new model where the MatMuls reading ``weights`` are MatMulNBits (every node must be named)."""
    if not weights:
        return model
    if MatMulNBitsQuantizer is None:
        raise UnsupportedError(
            f"expected onnxruntime.quantization's MatMulNBitsQuantizer for MatMulNBits; this onnxruntime has none ({_MISSING})",
            hint="install onnxruntime >= 1.20 (and onnx-ir), or recommend MatMul weights in QDQ formats",
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    every = _matmuls(out, set(weights))
    groups: dict[tuple[int, int], set[str]] = {}
    for name, fmt in weights.items():
        groups.setdefault((fmt.bits, int(fmt.block_size or 0)), set()).add(name)
    logger = logging.getLogger(LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        for (bits, block), names in sorted(groups.items()):
            chosen = set(_matmuls(out, names))
            others = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.name not in chosen]
            config = DefaultWeightOnlyQuantConfig(
                block_size=block, is_symmetric=False, bits=bits, op_types_to_quantize=("MatMul",)
            )
            quantizer = MatMulNBitsQuantizer(
                out, bits=bits, block_size=block, is_symmetric=False, nodes_to_exclude=others, algo_config=config
            )
            quantizer.process()
            out = quantizer.model.model
    finally:
        logger.setLevel(level)
    made = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    if made != len(every):
        raise InternalError(
            f"onnxruntime's MatMulNBitsQuantizer made {made} MatMulNBits nodes; the plan has {len(every)}"
        )
    return out
