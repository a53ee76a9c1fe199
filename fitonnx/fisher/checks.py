"""What the traces must be before anything is reported: not all zero, and saying why when they are.

A loss that cannot change with any tensor gives every trace exactly 0, and a report of zeros
(``nan%`` shares, a uniform ranking) looks like a result. The causes seen on real exports: a
softmax over an axis of size 1 (a stale declared shape read as the class axis), a softmax so
saturated that float32 rounds its top probability to 1, an output that does not depend on the
input. ``check_traces`` raises a ``ModelError`` naming the cause; tensors with a zero trace among
non-zero ones are legitimate (a Relu dead on every sample) and get a note.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from fitonnx.errors import ModelError
from fitonnx.fisher import engine
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import Likelihood, OutputTarget

# A top class probability this close to 1 leaves a float32 cross-entropy gradient of (about) zero.
SATURATED = 1.0 - 1e-6


def check_traces(
    traces: engine.FisherTraces, gm: GradientModel, feed: Mapping[str, np.ndarray], threads: int = 0
) -> engine.FisherTraces:
    """``traces`` with a note on tensors whose trace is exactly 0; a one-line error when all are."""
    trace = traces.trace()
    if traces.samples and not np.all(np.isfinite(trace)):
        bad = traces.tensors[int(np.argmin(np.isfinite(trace)))].name
        raise ModelError(f"expected finite Fisher traces; the trace of {bad!r} is not finite")
    if traces.samples and trace.size and not np.any(trace > 0):
        values = engine.probe_values(gm.probe_bytes, gm.probe_outputs, feed, threads)
        why = "; ".join(_why_zero(t, values.get(t.tap)) for t in gm.head.targets)
        raise ModelError(
            f"every Fisher trace is 0 over {traces.samples} sample(s): the loss does not change with any tensor ({why})",
            hint="say how to read the output with --output-kind NAME=logits:AXIS|boxes|hidden|probabilities, "
            "--likelihood or --class-axis",
        )
    zero = [t.name for t, v in zip(traces.tensors, trace, strict=True) if v == 0]
    if not zero:
        return traces
    shown = ", ".join(repr(n) for n in zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
    note = f"{len(zero)} tensor(s) have a trace of exactly 0 (a zero gradient on every sample): {shown}"
    return dataclasses.replace(traces, notes=(*traces.notes, note))


def _why_zero(target: OutputTarget, tap: np.ndarray | None) -> str:
    """The likely cause for one output of the loss, from its value on the first sample."""
    name = repr(target.output)
    if tap is None:
        return f"{name}: not measured"
    v = np.asarray(tap, np.float64)
    if target.likelihood is Likelihood.CATEGORICAL and target.class_axis is not None and v.ndim > target.class_axis:
        classes = v.shape[target.class_axis]
        if classes < 2:
            return f"{name}: its class axis {target.class_axis} has size 1, a softmax over it is constant"
        logp = v if target.probabilities else v - v.max(axis=target.class_axis, keepdims=True)
        p = (
            np.exp(logp)
            if target.probabilities
            else np.exp(logp) / np.exp(logp).sum(axis=target.class_axis, keepdims=True)
        )
        top = float(p.max(axis=target.class_axis).min())
        if top >= SATURATED:
            return f"{name}: a saturated softmax (its top class has probability {top:.7f} at every position)"
    if v.size and np.all(v == v.flat[0]):
        return f"{name}: a constant output ({float(v.flat[0]):g} everywhere)"
    return f"{name}: read as {target.likelihood.value}, its gradient is 0 on every sample"
