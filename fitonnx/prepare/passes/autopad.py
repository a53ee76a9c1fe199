"""Replace ``auto_pad="SAME_*"`` on Conv by the explicit ``pads`` it stands for.

onnxruntime-training 1.19's ConvGrad ignores ``auto_pad``: a Conv exported with SAME padding
(jax2onnx, tf2onnx) runs correctly forward, but its weight gradient comes out wrong (measured:
traces of 1e+58 instead of 18 on a 3x3 Conv) and the gradient of its input is silently off.
No library pass rewrites auto_pad, so it is written here from the ONNX spec's formula:
output = ceil(in / stride), total = max(0, (output − 1)·stride + (k − 1)·dilation + 1 − in),
SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

from fitonnx.errors import UnsupportedError
from fitonnx.prepare.types import Change, ChangeKind

SAME = frozenset({"SAME_UPPER", "SAME_LOWER"})


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    attr = next((a for a in node.attribute if a.name == name), None)
    return None if attr is None else list(attr.ints)


def _spatial_in(shapes: dict[str, list[int | None]], name: str) -> list[int | None] | None:
    shape = shapes.get(name)
    return None if shape is None else shape[2:]


def _same_pads(mode: str, size: int | None, kernel: int, stride: int, dilation: int, where: str) -> tuple[int, int]:
    span = (kernel - 1) * dilation + 1
    if stride == 1:
        total = span - 1  # independent of the input size
    elif size is None:
        raise UnsupportedError(
            f"expected static spatial sizes for {where} (auto_pad={mode}, stride {stride}); found a symbolic size",
            hint="export with explicit pads or a fixed input size",
        )
    else:
        total = max(0, (math.ceil(size / stride) - 1) * stride + span - size)
    small, large = total // 2, total - total // 2
    return (small, large) if mode == "SAME_UPPER" else (large, small)


def explicit_conv_pads(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    targets = [
        n
        for n in out.graph.node
        if n.op_type == "Conv"
        and n.domain in ("", "ai.onnx")
        and any(a.name == "auto_pad" and a.s.decode() in SAME for a in n.attribute)
    ]
    if not targets:
        return out, []
    inferred = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    shapes: dict[str, list[int | None]] = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input]:
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    inits = {t.name: list(t.dims) for t in out.graph.initializer}
    changes: list[Change] = []
    for node in targets:
        where = f"Conv {node.name or node.output[0]!r}"
        mode = next(a.s.decode() for a in node.attribute if a.name == "auto_pad")
        kernel = _ints(node, "kernel_shape") or (inits.get(node.input[1]) or shapes.get(node.input[1]) or [])[2:]
        if not kernel or any(k is None for k in kernel):
            raise UnsupportedError(f"expected a known kernel shape for {where} (auto_pad={mode}); found none")
        rank = len(kernel)
        strides = _ints(node, "strides") or [1] * rank
        dilations = _ints(node, "dilations") or [1] * rank
        sizes = _spatial_in(shapes, node.input[0]) or [None] * rank
        begin_end = [
            _same_pads(mode, s, k, st, d, where) for s, k, st, d in zip(sizes, kernel, strides, dilations, strict=True)
        ]
        pads = [b for b, _ in begin_end] + [e for _, e in begin_end]
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("pads", pads)])
        changes.append(Change(ChangeKind.REWRITE, node.name or node.output[0], f"auto_pad={mode} -> pads={pads}"))
    return out, changes
