"""The prepare pipeline and the equality check of the prepared twin."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from fitonnx.errors import ModelError


@dataclass(frozen=True)
class Change:
    """One thing a prepare pass changed (shown by ``fitonnx inspect``)."""

    kind: str  # "opset", "constant", "fold", "rewrite"
    where: str  # node or tensor name
    detail: str


@dataclass(frozen=True)
class PreparedModel:
    """The differentiable twin and what was changed to get it."""

    original: onnx.ModelProto
    model: onnx.ModelProto
    changes: tuple[Change, ...]


Pass = Callable[[onnx.ModelProto], tuple[onnx.ModelProto, list[Change]]]


def default_passes() -> list[Pass]:
    from fitonnx.prepare.constants import constants_to_initializers
    from fitonnx.prepare.opset import convert_opset

    return [convert_opset, constants_to_initializers]


def prepare(model: onnx.ModelProto, passes: Sequence[Pass] | None = None) -> PreparedModel:
    """Run the passes in order; the input model is never modified."""
    current = model
    changes: list[Change] = []
    for step in passes if passes is not None else default_passes():
        current, done = step(current)
        changes.extend(done)
    return PreparedModel(original=model, model=current, changes=tuple(changes))


def verify(
    prepared: PreparedModel,
    feeds: Sequence[Mapping[str, np.ndarray]],
    rtol: float = 1e-4,
) -> None:
    """Raise unless the twin gives the original's outputs (relative tolerance ``rtol``) on ``feeds``."""
    if not prepared.changes:
        return
    from fitonnx.engine import make_session

    a = make_session(prepared.original.SerializeToString())
    b = make_session(prepared.model.SerializeToString())
    names = [o.name for o in a.get_outputs()]
    for i, feed in enumerate(feeds):
        for name, x, y in zip(names, a.run(names, dict(feed)), b.run(names, dict(feed)), strict=True):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            scale = max(float(np.max(np.abs(x))), 1e-12)
            err = float(np.max(np.abs(x - y))) / scale if x.size else 0.0
            if x.shape != y.shape or err > rtol:
                raise ModelError(
                    f"the prepared model differs from the original on output {name!r} for sample {i} "
                    f"(relative error {err:.2e}, expected <= {rtol:.0e})",
                    hint="report this model to fitonnx; the prepare passes changed what it computes",
                )
