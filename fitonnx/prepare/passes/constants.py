"""Promote float Constant-node tensors to initializers, so the gradient engine can differentiate them.

Written here because no library pass does exactly this (ONNX Runtime's optimizer folds constants
but keeps them in Constant form in a saved model); it is a plain relabelling.
"""

from __future__ import annotations

import onnx

from fitonnx.prepare.types import Change, ChangeKind


def constants_to_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept: list[onnx.NodeProto] = []
    changes: list[Change] = []
    for node in out.graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if (
            attr is not None
            and attr.name == "value"
            and attr.t.data_type == onnx.TensorProto.FLOAT
            and len(attr.t.dims) >= 1
        ):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            out.graph.initializer.append(tensor)
            changes.append(
                Change(ChangeKind.CONSTANT, node.name or node.output[0], f"Constant {node.output[0]!r} -> initializer")
            )
        else:
            kept.append(node)
    if changes:
        del out.graph.node[:]
        out.graph.node.extend(kept)
    return out, changes
