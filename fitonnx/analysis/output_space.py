"""Output-space sensitivity, as NVIDIA ModelOpt's AutoQuantize scores a quantized layer.

For each quantized tensor t (a weight or an activation) and each op n reading it, the op's output y
moves by Δy = n(…, Q(t), …) − n(…, t, …) when t alone is quantized; the score is the gradient of the
loss at y weighting that move, squared and summed over the output's elements and the op's outputs:

    S_t(c) = (1/N) · Σ_i Σ_n Σ_j (∂ℓ_i/∂y_nj · Δy_nj)²

(ModelOpt sums Σ(∂L/∂y ⊙ (Q(y) − y))² over its calibration batches; here per sample, with the same
loss as the Fisher). It needs the gradient at every reader's outputs, so the pass runs on a gradient
model whose activation taps include those outputs (``extra_taps``); Δy is computed in the graph by a
copy of the reader fed the quantized tensor (a weight: its quantized values; an activation: the
simulation's own fake quantizer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.analysis import simulate
from fitonnx.analysis.choices import Choice, FloatGrid
from fitonnx.analysis.error_model import fake_quantized
from fitonnx.fisher import engine
from fitonnx.fisher import session as api
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import PREFIX
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.graph import Kind, QuantTensor

RunPass = Callable[[GradientModel, Sequence[str]], engine.FisherTraces]


def reader_outputs(model: onnx.ModelProto, tensors: Sequence[QuantTensor]) -> dict[str, list[str]]:
    """Per node reading a scored tensor, its outputs that something reads (or the graph outputs)."""
    readers = {n for t in tensors for n in t.nodes}
    used = {i for node in model.graph.node for i in node.input} | {o.name for o in model.graph.output}
    return {node.name: [o for o in node.output if o and o in used] for node in model.graph.node if node.name in readers}


SUFFIX = "__osens"


def extra_taps(s: api.Session) -> api.Session:
    """The session whose model gives every reader output ``o`` of a scored tensor a tappable twin:
    the reader writes ``o + SUFFIX`` and an Identity copies it to ``o`` (so an output that is the
    loss's own tap, or an activation already, still gets a gradient of its own), with the twins
    added as activations to tap. A new model; the session's is untouched."""
    model = onnx.ModelProto()
    model.CopyFrom(s.prepared.model)
    readers = reader_outputs(model, s.tensors)
    identities = []
    extra: list[QuantTensor] = []
    for node in model.graph.node:
        for k, name in enumerate(node.output):
            if name and name in readers.get(node.name, ()):
                node.output[k] = name + SUFFIX
                identities.append(
                    (node.name, helper.make_node("Identity", [name + SUFFIX], [name], name=name + SUFFIX))
                )
                extra.append(QuantTensor(name + SUFFIX, Kind.ACTIVATION, (), (), None))
    nodes = list(model.graph.node)
    position = {n.name: k for k, n in enumerate(nodes)}
    for producer, identity in sorted(identities, key=lambda pair: position[pair[0]], reverse=True):
        nodes.insert(position[producer] + 1, identity)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    prepared = dataclasses.replace(s.prepared, model=model)
    return dataclasses.replace(s, prepared=prepared, tensors=(*s.tensors, *extra))


def _copy_reader(g: onnx.GraphProto, node: onnx.NodeProto, mapping: Mapping[str, str], p: str) -> list[tuple[str, str]]:
    """A copy of ``node`` reading the quantized names of ``mapping``; returns (original, copy) output pairs."""
    outputs = [f"{p}{k}" if o else "" for k, o in enumerate(node.output)]
    copy = helper.make_node(
        node.op_type,
        [mapping.get(i, i) for i in node.input],
        outputs,
        name=p + "copy",
        domain=node.domain,
    )
    copy.attribute.extend(node.attribute)
    g.node.append(copy)
    return [(o, c) for o, c in zip(node.output, outputs, strict=True) if o]


def _derived_copies(g: onnx.GraphProto, tensor: str, replacement: str, readers: set[str], p: str) -> dict[str, str]:
    """Copies of the constant-only nodes between ``tensor`` and its readers (the Transpose/Slice/
    Unsqueeze chains through which an unrolled LSTM's weight reaches its MatMuls), fed
    ``replacement``; returns {original name: copy's name}, ``tensor`` included."""
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    mapping = {tensor: replacement}
    for k, node in enumerate(list(g.node)):
        if node.name in readers or not any(i in mapping for i in node.input):
            continue
        if not all(not i or i in mapping or i in constants for i in node.input):
            continue
        copy = helper.make_node(
            node.op_type,
            [mapping.get(i, i) for i in node.input],
            [f"{p}d{k}_{j}" if o else "" for j, o in enumerate(node.output)],
            name=f"{p}d{k}",
            domain=node.domain,
        )
        copy.attribute.extend(node.attribute)
        g.node.append(copy)
        mapping |= {o: c for o, c in zip(node.output, copy.output, strict=True) if o}
    return mapping


def _score_nodes(g: onnx.GraphProto, pairs: Sequence[tuple[str, str]], grads: Mapping[str, str], p: str) -> str:
    """Nodes summing Σ_j (g_y·Δy)² over the pairs whose original output has a gradient; returns the output."""
    n = helper.make_node
    terms = []
    for k, (orig, copy) in enumerate(pairs):
        if orig not in grads:
            continue
        q = f"{p}t{k}_"
        g.node.extend(
            [
                n("Sub", [copy, orig], [q + "dy"]),
                n("Cast", [q + "dy"], [q + "dy64"], to=TensorProto.DOUBLE),
                n("Cast", [grads[orig]], [q + "g64"], to=TensorProto.DOUBLE),
                n("Mul", [q + "dy64", q + "g64"], [q + "w"]),
                n("ReduceSumSquare", [q + "w"], [q + "s"], keepdims=0),
            ]
        )
        terms.append(q + "s")
    if not terms:
        g.initializer.append(numpy_helper.from_array(np.array(0.0, np.float64), p + "score"))
        return p + "score"
    g.node.append(n("Sum", terms, [p + "score"]))
    g.output.append(helper.make_tensor_value_info(p + "score", TensorProto.DOUBLE, []))
    return p + "score"


def output_space_model(
    gm: GradientModel,
    scored: Sequence[QuantTensor],
    readers: Mapping[str, list[str]],
    quantized: Callable[[onnx.GraphProto, QuantTensor, Choice, str], str],
    choices_of: Callable[[QuantTensor], Sequence[Choice]],
) -> tuple[GradientModel, dict[tuple[str, Choice], str]]:
    """The tapped gradient model plus one float64 scalar per (scored tensor, choice): S_t(c) per sample.
    ``quantized`` adds the nodes (or initializer) of Q(t) at a choice and returns its name."""
    model = onnx.load_from_string(gm.model_bytes)
    g = model.graph
    grads = {t.name: grad for t, grad in zip(gm.tensors, gm.grad_outputs, strict=True)}
    nodes = {node.name: node for node in g.node}
    outs: dict[tuple[str, Choice], str] = {}
    for i, t in enumerate(scored):
        for k, c in enumerate(choices_of(t)):
            p = f"{PREFIX}osens{i}_{k}_"
            q = quantized(g, t, c, p + "q_")
            mapping = _derived_copies(g, _read_as(g, t), q, set(t.nodes), p)
            pairs: list[tuple[str, str]] = []
            for r, name in enumerate(t.nodes):
                if name in nodes and name in readers:
                    pairs += _copy_reader(g, nodes[name], mapping, f"{p}r{r}_")
            outs[(t.name, c)] = _score_nodes(g, pairs, grads, p)
    return dataclasses.replace(gm, model_bytes=model.SerializeToString()), outs


def _read_as(g: onnx.GraphProto, t: QuantTensor) -> str:
    """The name under which readers see ``t`` in the gradient model (an activation is tapped)."""
    return t.name if t.kind is Kind.WEIGHT else _tap_name(g, t.name)


def measure_output_space(
    s: api.Session,
    opts: FisherOptions,
    simulator: simulate.Simulator,
    choices: tuple[Sequence[Choice], Sequence[Choice]],
    run: RunPass,
) -> dict[tuple[str, Choice], float]:
    """S_t(c) for every simulated tensor and candidate choice (``choices``: weights', activations'),
    from one more pass over the calibration data (``run``)."""
    tapped = extra_taps(s)
    gm, _, _ = api.gradient_model(tapped, opts, keep_gradients=True)
    scored = [t for t in gm.tensors if t.name in {x.name for x in s.tensors}]
    scored = [t for t in scored if t.name in simulator.sim.weights or t.name in simulator.act_ranges]
    readers = reader_outputs(tapped.prepared.model, scored)
    weight_choices, act_choices = choices

    def quantized(g: onnx.GraphProto, t: QuantTensor, c: Choice, p: str) -> str:
        if t.kind is Kind.WEIGHT:
            g.initializer.append(numpy_helper.from_array(simulator.quantized_weight(t.name, c), p + "w"))
            return p + "w"
        fg = simulator.activation_float(t.name, c)
        grid: simulate.Grid | FloatGrid = fg if fg is not None else simulator.activation_grid(t.name, c)
        dtype = next(a.dtype for a in simulator.sim.activations if a.name == t.name)
        return fake_quantized(g, _tap_name(g, t.name), p, grid, dtype)

    def choices_of(t: QuantTensor) -> Sequence[Choice]:
        return weight_choices if t.kind is Kind.WEIGHT else act_choices

    gm2, outs = output_space_model(gm, scored, readers, quantized, choices_of)
    second = run(gm2, list(dict.fromkeys(outs.values())))
    extra = second.extra or {}
    return {key: float(extra[name].mean()) if name in extra else 0.0 for key, name in outs.items()}


def _tap_name(g: onnx.GraphProto, activation: str) -> str:
    """The tapped name of an activation (``a + d_a``) in a gradient model, or the activation itself."""
    for node in g.node:
        if node.op_type == "Add" and node.input and node.input[0] == activation and "tap" in node.output[0]:
            return node.output[0]
    return activation
