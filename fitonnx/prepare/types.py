"""What the prepare stage hands on: the prepared twin, the changes its passes made, the pass type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import onnx

from fitonnx.values import TextEnum


class ChangeKind(TextEnum):
    """What sort of change a prepare pass made; a str, so comparisons with "fold" and JSON keep working."""

    SHAPES = "shapes"
    OPSET = "opset"
    OPTIMIZER = "optimizer"
    CONSTANT = "constant"
    FOLD = "fold"
    REWRITE = "rewrite"
    SPECIALIZE = "specialize"
    UNROLL = "unroll"  # a Loop/Scan unrolled: its body's activations are not scored
    QUANTIZED = "quantized"  # an already-quantized model's activation Q/DQ kept fixed, with a straight-through gradient


@dataclass(frozen=True)
class Change:
    """One thing a prepare pass changed (shown by ``fitonnx inspect``).

    ``origins`` maps each tensor the pass created to the tensors of its input model it was made
    from (first the one it replaces, then any folded into it); the pipeline chains them back to
    the original model as ``PreparedModel.origins``.
    """

    kind: ChangeKind  # a plain string is taken if it names a kind
    where: str  # node or tensor name
    detail: str
    origins: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ChangeKind(self.kind))


@dataclass(frozen=True)
class PreparedModel:
    """The differentiable twin and what was changed to get it.

    ``reference`` is what ``verify`` compares the twin against: the original, or, when this
    onnxruntime cannot run the original (IR version or opset too new), the original after the
    opset conversion alone. ``origins`` maps every tensor of ``model`` that is not a tensor of
    the original under the same name (folded, promoted or renamed weights) to the names in the
    original it came from, the replaced tensor first.
    """

    original: onnx.ModelProto
    model: onnx.ModelProto
    changes: tuple[Change, ...]
    reference: onnx.ModelProto | None = None
    origins: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def origin_of(self, name: str) -> tuple[str, ...]:
        """The original tensors a prepared tensor comes from (itself when unchanged)."""
        return self.origins.get(name, (name,))


Pass = Callable[[onnx.ModelProto], tuple[onnx.ModelProto, list[Change]]]
