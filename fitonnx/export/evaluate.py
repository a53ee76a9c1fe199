"""Top-1 accuracy on labelled data, to report an exported model next to the float one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from fitonnx.errors import DataError, FitonnxError
from fitonnx.model import graph
from fitonnx.model.data import Dataset
from fitonnx.model.load import load_model
from fitonnx.model.runtime import make_session

BATCH = 256


@dataclass(frozen=True)
class Accuracy:
    """How many labels the argmax of the model's output got right."""

    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@dataclass(frozen=True)
class Comparison:
    """Held-out accuracy of the float model and of an exported one, on the same samples."""

    reference: Accuracy
    exported: Accuracy
    source: str


def _feeds(data: Dataset, specs: dict[str, graph.InputSpec]) -> Iterator[tuple[dict[str, np.ndarray], slice]]:
    batched = all(data.arrays[n].ndim == s.rank and s.rank > 0 and s.shape[0] is None for n, s in specs.items())
    step = BATCH if batched else 1
    for start in range(0, data.num_samples, step):
        stop = min(start + step, data.num_samples)
        if batched:
            yield {n: data.arrays[n][start:stop] for n in specs}, slice(start, stop)
        else:
            yield {n: v for n, v in data.sample(start, specs).items() if n in specs}, slice(start, stop)


def _check_labels(labels: np.ndarray, classes: int, source: str) -> None:
    """Labels outside ``[0, classes)`` can never match an argmax: refuse them instead of reporting 0%."""
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.size:
        raise DataError(
            f"expected labels in [0, {classes}) (the model's classes) in {source}; found {bad.size} outside, "
            f"e.g. {int(bad.flat[0])}"
        )


def accuracy(
    model: onnx.ModelProto | str | os.PathLike[str], data: Dataset, *, output: str | None = None, class_axis: int = 1
) -> Accuracy:
    """Fraction of ``data.labels`` equal to the argmax of ``output`` (default: the first) over ``class_axis``.

    ``class_axis`` counts the model output's axes (1 for ``[N, classes]``); an output without a
    batch axis is read along its last axis.
    """

    if data.labels is None or not np.issubdtype(data.labels.dtype, np.integer):
        raise DataError(f"expected integer 'labels' in {data.source} to measure accuracy; found none")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model).proto
    specs = graph.input_specs(proto)
    session = make_session(proto.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    name = output or names[0]
    if name not in names:
        raise FitonnxError(f"expected an output among {names}; found {name!r}")
    correct = total = 0
    for feed, rows in _feeds(data, specs):
        (logits,) = session.run([name], feed)
        axis = class_axis if logits.ndim >= 2 else -1
        _check_labels(data.labels[rows], logits.shape[axis], data.source)
        predicted = np.argmax(logits, axis=axis).reshape(data.labels[rows].shape)
        correct += int(np.count_nonzero(predicted == data.labels[rows]))
        total += int(data.labels[rows].size)
    return Accuracy(correct, total)


def compare(
    reference: onnx.ModelProto | str | os.PathLike[str],
    exported: onnx.ModelProto | str | os.PathLike[str],
    data: Dataset,
    *,
    output: str | None = None,
    class_axis: int = 1,
) -> Comparison:
    """Accuracy of ``reference`` (the float model) and ``exported`` on the same labelled samples."""
    return Comparison(
        reference=accuracy(reference, data, output=output, class_axis=class_axis),
        exported=accuracy(exported, data, output=output, class_axis=class_axis),
        source=data.source,
    )
