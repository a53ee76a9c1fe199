"""The loss over several outputs: which outputs define it, how each is read, one head summing them.

By default (no ``--output``, no labels) every float output of the model enters the loss with the
likelihood its kind implies (``losses.resolve_output`` for each), and the per-sample losses are
summed: ℓ = Σ_o ℓ_o. The gradient of the sum is the sum of the heads' gradients, so every weight
that reaches any output is scored. Outputs fed back as inputs (a recurrent state, a KV cache) are
not predictions and stay out unless ``--output-kind`` names them. ``--output-kind NAME=KIND`` says
how to read an output whose reading would be a guess.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx
from onnx import helper

from fitonnx.errors import FitonnxError, ModelError
from fitonnx.fisher.losses import LABELS, LOSS, PREFIX, Likelihood, LossHead, OutputTarget, pick_output, resolve_output
from fitonnx.model.graph import FLOAT_TYPES


class OutputKind(str, Enum):
    LOGITS = "logits"  # class scores over an axis: categorical
    PROBABILITIES = "probabilities"  # with an axis: class probabilities; without: independent (Bernoulli)
    BOXES = "boxes"  # box coordinates or any regression: Gaussian
    HIDDEN = "hidden"  # hidden states / embeddings: Gaussian


@dataclass(frozen=True)
class KindSpec:
    """What the user says an output is (``--output-kind NAME=KIND[:AXIS]``)."""

    kind: OutputKind
    axis: int | None = None


def parse_output_kind(text: str) -> tuple[str, KindSpec]:
    """``NAME=logits:AXIS|probabilities[:AXIS]|boxes|hidden`` as (name, spec); a one-line error otherwise."""
    name, sep, rest = text.rpartition("=")
    kind_text, _, axis_text = rest.partition(":")
    choices = "logits:AXIS, probabilities[:AXIS], boxes, hidden"
    try:
        kind = OutputKind(kind_text)
        axis = int(axis_text) if axis_text else None
    except ValueError:
        raise FitonnxError(f"expected --output-kind NAME=KIND with KIND one of {choices}; found {text!r}") from None
    if not sep or not name:
        raise FitonnxError(f"expected --output-kind NAME=KIND with KIND one of {choices}; found {text!r}")
    if axis is not None and kind in (OutputKind.BOXES, OutputKind.HIDDEN):
        raise FitonnxError(f"expected no axis for --output-kind {kind.value}; found {text!r}")
    return name, KindSpec(kind, axis)


@dataclass(frozen=True)
class OutputRequest:
    """How the loss outputs are chosen: the Fisher options that matter here, and the measured shapes."""

    output: str | None
    likelihood: Likelihood | None
    class_axis: int | None
    kinds: Mapping[str, KindSpec]
    labels: np.ndarray | None  # the data's labels when the Fisher reads them (empirical), else None
    shapes: Mapping[str, tuple[int, ...]]  # runtime shapes of the outputs (and inputs)


def float_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]


def loss_outputs(model: onnx.ModelProto, r: OutputRequest) -> tuple[list[str], list[str]]:
    """(outputs in the loss, notes on the float outputs left out).

    One output when ``--output`` names it or the labels define the loss (they belong to one
    output: the first float one, as before); else every float output not fed back as an input."""
    floats = float_outputs(model)
    unknown = sorted(set(r.kinds) - {o.name for o in model.graph.output})
    if unknown:
        names = [o.name for o in model.graph.output]
        raise ModelError(f"expected --output-kind to name model outputs {names}; found {unknown}")
    if r.output is not None or r.labels is not None or r.likelihood is not None or r.class_axis is not None:
        return [pick_output(model, r.output)], []
    chosen, notes = [], []
    for name in floats:
        state = _state_input(model, name, r.shapes)
        if state is not None and name not in r.kinds:
            notes.append(
                f"output {name!r} is left out of the loss: it is shaped like input {state!r}, a state fed back "
                f"(say --output-kind {name}=hidden to include it)"
            )
            continue
        chosen.append(name)
    if not chosen:
        chosen = floats[:1]
    return chosen, notes


def _state_input(model: onnx.ModelProto, output: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The float graph input ``output`` is the next value of (same runtime shape, a related name), or None."""
    shape = shapes.get(output)
    if shape is None:
        return None
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        name = value.name
        if name in initializers or value.type.tensor_type.elem_type not in FLOAT_TYPES or shapes.get(name) != shape:
            continue
        stem = name.rstrip("0_").lower()
        out = output.lower()
        if out.startswith(stem) or ("present" in out and "past" in name.lower()):
            return name
    return None


def resolve_one(model: onnx.ModelProto, ranks: dict[str, int], name: str, r: OutputRequest) -> OutputTarget:
    """How output ``name`` is read: the user's ``--output-kind`` if given, else ``resolve_output``'s reading."""
    spec = r.kinds.get(name)
    if spec is None:
        return resolve_output(model, ranks, name, r.likelihood, r.labels, r.class_axis, r.shapes)
    said = f"--output-kind {spec.kind.value}"
    if spec.kind is OutputKind.LOGITS or (spec.kind is OutputKind.PROBABILITIES and spec.axis is not None):
        target = resolve_output(model, ranks, name, Likelihood.CATEGORICAL, None, spec.axis, r.shapes)
        if spec.kind is OutputKind.PROBABILITIES:
            target = dataclasses.replace(target, tap=name, probabilities=True)
        return dataclasses.replace(target, reason=said, guessed=False)
    if spec.kind is OutputKind.PROBABILITIES:
        target = resolve_output(model, ranks, name, Likelihood.BERNOULLI, None, None, r.shapes)
        return dataclasses.replace(target, tap=name, probabilities=True, reason=said, guessed=False)
    target = resolve_output(model, ranks, name, Likelihood.GAUSSIAN, None, None, r.shapes)
    return dataclasses.replace(target, tap=name, reason=said, guessed=False)


def combine(heads: Sequence[LossHead]) -> LossHead:
    """One head whose loss is the sum of ``heads``' losses; each part's own names get a suffix.

    A single head is returned as it is (the one-output loss is unchanged). The combined head's
    ``target`` is its first part's; the engine feeds each part's noise (``LossHead.parts``)."""
    if len(heads) == 1:
        return heads[0]
    parts = [_renamed(h, f"_o{k}") for k, h in enumerate(heads)]
    nodes = [n for p in parts for n in p.nodes]
    # A chain of Adds (every engine differentiates Add; not every one Sum).
    total = _loss_name(parts[0])
    for k, part in enumerate(parts[1:], 1):
        out = LOSS if k == len(parts) - 1 else f"{LOSS}_partial{k}"
        nodes.append(helper.make_node("Add", [total, _loss_name(part)], [out]))
        total = out
    return LossHead(
        nodes=tuple(nodes),
        initializers=tuple(i for p in parts for i in p.initializers),
        target=heads[0].target,
        mode=heads[0].mode,
        noise=None,
        perm=None,
        needs_labels=False,
        parts=tuple(parts),
    )


def _loss_name(head: LossHead) -> str:
    return next(o for n in head.nodes for o in n.output if o.startswith(LOSS))


def _renamed(head: LossHead, suffix: str) -> LossHead:
    """``head`` with every name of its own (fitonnx's prefix; not the labels) suffixed, its noise input too."""

    def rename(name: str) -> str:
        return name + suffix if name.startswith(PREFIX) and name != LABELS else name

    nodes = []
    for node in head.nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename(x) for x in node.input]
        copy.output[:] = [rename(x) for x in node.output]
        nodes.append(copy)
    inits = []
    for init in head.initializers:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename(init.name)
        inits.append(copy)
    return dataclasses.replace(
        head, nodes=tuple(nodes), initializers=tuple(inits), noise_input=rename(head.noise_input)
    )


# Ops whose input the loss may read instead of their output (``losses.resolve_output``).
_TAPPED_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "Flatten"})


def candidate_taps(model: onnx.ModelProto) -> list[str]:
    """Tensors a loss may tap besides the outputs: the inputs of Softmax/Sigmoid/Flatten nodes."""
    constants = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    names = dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type in _TAPPED_OPS and n.input)
    return [name for name in names if name and name not in constants]


def ancestors(model: onnx.ModelProto, names: Sequence[str]) -> set[str]:
    """Every tensor ``names`` are computed from (themselves included), through subgraphs' outer-scope reads."""
    needed = set(names)
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    return needed


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    reads: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in g.node:
                reads.update(inner.input)
                reads.update(_subgraph_reads(inner))
    return reads
