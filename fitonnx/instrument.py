"""Augment the model for Fisher estimation: loss head, activation taps, gradient graph, reductions.

Like ONNX Runtime's calibrator, this stage only builds models; ``engine`` runs them.

- Activation gradients: onnxruntime's GradientGraphBuilder differentiates only initializers and
  graph inputs, so each activation ``a`` is rewired as ``a + d_a`` with ``d_a`` a new graph input
  fed with zeros; ∂ℓ/∂d_a = ∂ℓ/∂a. All consumers read the tapped tensor, since a toolchain's
  Q/DQ pair on ``a`` is shared by every reader.
- Per-sample squared norms (and activation min/max) are reduced inside the gradient graph, so the
  engine fetches scalars instead of copying every gradient out of the session.
- A probe model (the original plus the activations and the loss tap as outputs) gives the shapes
  of the zero and noise inputs for each distinct input-shape signature.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from fitonnx.errors import InternalError, UnsupportedError
from fitonnx.graph import Kind, QuantTensor
from fitonnx.losses import LABELS, LOSS, NOISE, PREFIX, LossHead


@dataclass(frozen=True)
class GradientModel:
    """The serialized gradient model and the names the engine feeds and fetches."""

    model_bytes: bytes
    probe_bytes: bytes
    tensors: tuple[QuantTensor, ...]
    perturbations: tuple[tuple[str, str], ...]  # (activation, zero-input name)
    sqnorm_outputs: tuple[str, ...]  # one per tensor, same order as ``tensors``
    grad_outputs: tuple[str, ...]  # full gradients, only when ``keep_gradients``
    range_outputs: tuple[tuple[str, str], ...]  # (min, max) per activation, order of activations
    head: LossHead
    probe_outputs: tuple[str, ...]  # activations..., then the loss tap

    @property
    def activations(self) -> tuple[QuantTensor, ...]:
        return tuple(t for t in self.tensors if t.kind is Kind.ACTIVATION)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for the duration.

    The builder logs each graph transformer at INFO level through a logger that ignores
    ``onnxruntime.set_default_logger_severity``; only the file descriptor can be quieted.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _safe(index: int, kind: str) -> str:
    return f"{PREFIX}{kind}{index}"


def _float_input(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _same_rank_input(name: str, rank: int) -> onnx.ValueInfoProto:
    """A float input of known rank and symbolic dims.

    onnxruntime-training 1.19 crashes (segfault) building the gradient of an Add whose input has
    unknown rank, so the rank, measured by the probe, is always declared.
    """
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_dim{k}" for k in range(rank)])


def _tap_activations(
    graph: onnx.GraphProto, activations: Sequence[QuantTensor], ranks: Mapping[str, int]
) -> list[tuple[str, str]]:
    """Rewire every consumer of each activation ``a`` to read ``a + d_a``; return (a, d_a) pairs."""
    pairs: list[tuple[str, str]] = []
    renames: dict[str, str] = {}
    tap_nodes: list[onnx.NodeProto] = []
    for i, act in enumerate(activations):
        zero, tapped = _safe(i, "d"), _safe(i, "tap")
        renames[act.name] = tapped
        tap_nodes.append(helper.make_node("Add", [act.name, zero], [tapped], name=_safe(i, "tap_add")))
        graph.input.append(_same_rank_input(zero, ranks[act.name]))
        pairs.append((act.name, zero))
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in renames:
                node.input[slot] = renames[name]
    # Topological order: put each tap right after the producer of its activation.
    position = {o: i for i, n in enumerate(graph.node) for o in n.output}
    nodes = list(graph.node)
    for tap in sorted(tap_nodes, key=lambda t: position.get(t.input[0], -1), reverse=True):
        nodes.insert(position.get(tap.input[0], -1) + 1, tap)
    del graph.node[:]
    graph.node.extend(nodes)
    return pairs


def build_probe(
    model: onnx.ModelProto, activations: Sequence[QuantTensor], tap: str | None
) -> tuple[bytes, tuple[str, ...]]:
    """The model with every activation (and the loss tap, if given) exposed as outputs (for shapes)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [a.name for a in activations]
    if tap is not None and tap not in names:
        names.append(tap)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return probe.SerializeToString(), tuple(names)


def build_gradient_model(
    model: onnx.ModelProto,
    tensors: Sequence[QuantTensor],
    head: LossHead,
    labels_dtype: np.dtype | None,
    ranks: Mapping[str, int],
    keep_gradients: bool = False,
) -> GradientModel:
    """Attach the loss head and activation taps, build the gradient graph, add reductions.

    ``ranks`` gives the rank of every activation (from ``engine.probe_shapes``).
    """
    # Deferred: importing the training binding is slow and only this stage needs it.
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    if not tensors:
        raise UnsupportedError("expected at least one quantizable weight or activation; the model has none")
    activations = [t for t in tensors if t.kind is Kind.ACTIVATION]
    weights = [t for t in tensors if t.kind is Kind.WEIGHT]
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    initializer_names = {t.name for t in graph.initializer}
    missing = [w.name for w in weights if w.name not in initializer_names]
    if missing:
        raise InternalError(f"weights must be initializers after prepare; not found: {missing[:3]}")

    probe_bytes, probe_outputs = build_probe(model, activations, head.target.tap)
    pairs = _tap_activations(graph, activations, ranks)
    graph.node.extend(head.nodes)
    graph.initializer.extend(head.initializers)
    if head.needs_labels:
        if labels_dtype is None:
            raise InternalError("head needs labels but no dtype given")
        graph.input.append(
            helper.make_tensor_value_info(LABELS, helper.np_dtype_to_tensor_dtype(np.dtype(labels_dtype)), None)
        )
    if head.noise is not None:
        graph.input.append(_float_input(NOISE))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []))

    differentiate = [w.name for w in weights] + [zero for _, zero in pairs]
    try:
        with _quiet_stderr():
            builder = GradientGraphBuilder(work.SerializeToString(), {LOSS}, set(differentiate), LOSS)
            builder.build()
        grad_model = onnx.load_from_string(builder.get_model())
    except Exception as exc:  # the binding raises RuntimeError/Fail with a C++ message
        raise _explain_build_failure(exc, model) from None

    g = grad_model.graph
    produced = {o for n in g.node for o in n.output}
    sq_outputs: list[str] = []
    grad_outputs: list[str] = []
    by_tensor = {w.name: w.name for w in weights} | {a: zero for a, zero in pairs}
    for i, t in enumerate(tensors):
        grad = by_tensor[t.name] + "_grad"
        if grad not in produced:
            raise UnsupportedError(
                f"the loss does not depend on {t.kind.value} {t.name!r}; expected every quantizable tensor "
                "to reach the chosen output",
                hint="pick the output that depends on it with --output",
            )
        sq = _safe(i, "sq")
        # Cast to double before squaring: the per-sample norm of a large weight is a sum of
        # millions of terms; float32 accumulation would lose digits the standard error needs.
        g.node.append(helper.make_node("Cast", [grad], [sq + "_f64"], to=TensorProto.DOUBLE))
        g.node.append(helper.make_node("ReduceSumSquare", [sq + "_f64"], [sq], keepdims=0))
        sq_outputs.append(sq)
        grad_outputs.append(grad)
    ranges: list[tuple[str, str]] = []
    for i, act in enumerate(activations):
        lo, hi = _safe(i, "min"), _safe(i, "max")
        g.node.append(helper.make_node("ReduceMin", [act.name], [lo], keepdims=0))
        g.node.append(helper.make_node("ReduceMax", [act.name], [hi], keepdims=0))
        ranges.append((lo, hi))
    del g.output[:]
    for name in sq_outputs:
        g.output.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, []))
    for lo, hi in ranges:
        g.output.append(helper.make_tensor_value_info(lo, TensorProto.FLOAT, []))
        g.output.append(helper.make_tensor_value_info(hi, TensorProto.FLOAT, []))
    if keep_gradients:
        for name in grad_outputs:
            g.output.append(helper.make_empty_tensor_value_info(name))
    return GradientModel(
        model_bytes=grad_model.SerializeToString(),
        probe_bytes=probe_bytes,
        tensors=tuple(tensors),
        perturbations=tuple(pairs),
        sqnorm_outputs=tuple(sq_outputs),
        grad_outputs=tuple(grad_outputs) if keep_gradients else (),
        range_outputs=tuple(ranges),
        head=head,
        probe_outputs=probe_outputs,
    )


def _explain_build_failure(exc: Exception, model: onnx.ModelProto) -> UnsupportedError:
    text = str(exc)
    for node in model.graph.node:
        if f"op_type {node.op_type}" in text or f"'{node.op_type}'" in text or f" {node.op_type} " in text:
            return UnsupportedError(
                f"onnxruntime-training cannot differentiate op {node.op_type} (node {node.name or '?'}); "
                "expected only ops with registered gradients",
                hint="run `fitonnx inspect` to see which ops need a rewrite",
            )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return UnsupportedError(f"could not build the gradient graph: {first[:300]}")
