"""Specialize If nodes on the calibration data: inline the branch every sample takes.

onnxruntime-training cannot differentiate through If, and the ops that matter (Conv, LSTM, ...)
often live inside the branches (e.g. a model that switches on its sample-rate input). When the
condition is the same for every calibration sample, the If computes exactly its taken branch on
that data, so inlining it gives a twin that ``verify`` can check like any other pass. Written here
because no library pass specializes control flow on data. Constants only the untaken branch reads
cannot be scored; the Change says so. A condition that differs across samples is an error: the
user can split the data and score each part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from fitonnx.errors import UnsupportedError
from fitonnx.model import external
from fitonnx.model.graph import FLOAT_TYPES
from fitonnx.model.runtime import make_session
from fitonnx.prepare.types import Change, ChangeKind

MAX_ROUNDS = 16  # nested Ifs are inlined one level per round


def specialize_if(
    model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]
) -> tuple[onnx.ModelProto, list[Change]]:
    """Inline every main-graph If whose condition is constant over ``feeds`` (repeatedly, for nesting)."""
    current = onnx.ModelProto()
    current.CopyFrom(model)
    changes: list[Change] = []
    for _ in range(MAX_ROUNDS):
        ifs = [n for n in current.graph.node if n.op_type == "If"]
        if not ifs or not feeds:
            break
        conds = _evaluate(current, [n.input[0] for n in ifs], feeds)
        for node, values in zip(ifs, conds, strict=True):
            taken = {bool(np.asarray(v).reshape(-1)[0]) for v in values}
            if len(taken) != 1:
                raise UnsupportedError(
                    f"expected the If node {node.name or node.output[0]!r} to take one branch on all calibration "
                    f"samples; its condition {node.input[0]!r} is true on some and false on others",
                    hint="split the calibration data by that condition and score each part",
                )
        current, done = _inline(current, ifs, [bool(np.asarray(v[0]).reshape(-1)[0]) for v in conds], len(feeds))
        changes.extend(done)
    return current, changes


def _evaluate(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """The values of ``names`` on every feed (the model with those tensors exposed as outputs)."""

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    initial = external.LazyArrays(probe.graph.initializer)
    session = make_session(probe.SerializeToString())
    inputs = {i.name for i in session.get_inputs()}
    wanted = [n for n in names if n not in initial]
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        out = session.run(wanted, {k: np.asarray(v) for k, v in feed.items() if k in inputs}) if wanted else []
        for name, value in zip(wanted, out, strict=True):
            values[name].append(np.asarray(value))
        for name in names:
            if name in initial:
                values[name].append(initial[name])
    return [values[n] for n in names]


def _inline(
    model: onnx.ModelProto, ifs: Sequence[onnx.NodeProto], taken: Sequence[bool], samples: int
) -> tuple[onnx.ModelProto, list[Change]]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_output = {n.output[0]: branch for n, branch in zip(ifs, taken, strict=True)}
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    defined |= {o for n in graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    changes: list[Change] = []
    for node in graph.node:
        if node.op_type != "If" or node.output[0] not in by_output:
            nodes.append(node)
            continue
        cond = by_output[node.output[0]]
        attrs = {a.name: a.g for a in node.attribute}
        branch, dropped = (
            (attrs["then_branch"], attrs["else_branch"]) if cond else (attrs["else_branch"], attrs["then_branch"])
        )
        renames = _renames(branch, defined, node.name or node.output[0])
        defined |= set(renames.values()) | _defined(branch)
        for inner in branch.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(inner)
            _rename_node(copy, renames)
            nodes.append(copy)
        for tensor in branch.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = renames.get(copy.name, copy.name)
            graph.initializer.append(copy)
        for src, dst in zip(branch.output, node.output, strict=True):
            nodes.append(helper.make_node("Identity", [renames.get(src.name, src.name)], [dst]))
        lost = _count_weights(dropped)
        changes.append(
            Change(
                ChangeKind.SPECIALIZE,
                node.name or node.output[0],
                f"If on {node.input[0]!r} is {cond} on all {samples} calibration samples: "
                f"{'then' if cond else 'else'} branch inlined"
                + (f"; the other branch's {lost} weight-like constants are not scored" if lost else ""),
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    return out, changes


def _defined(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output if o}


def _renames(branch: onnx.GraphProto, taken: set[str], tag: str) -> dict[str, str]:
    """New names for branch definitions that clash with names already defined outside it."""
    safe = "".join(c if c.isalnum() else "_" for c in tag)
    return {name: f"{name}__{safe}" for name in _defined(branch) if name in taken}


def _rename_node(node: onnx.NodeProto, renames: Mapping[str, str]) -> None:
    for i, name in enumerate(node.input):
        node.input[i] = renames.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = renames.get(name, name)
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subgraphs:
            local = _defined(sub) | {i.name for i in sub.input}
            outer = {k: v for k, v in renames.items() if k not in local}
            for inner in sub.node:
                _rename_node(inner, outer)
            for value in sub.output:
                value.name = outer.get(value.name, value.name)


def _count_weights(graph: onnx.GraphProto) -> int:
    """Float constants of rank >= 2 in ``graph`` and its subgraphs: the weight-like tensors a branch holds."""
    tensors = list(graph.initializer) + [
        a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    count = sum(1 for t in tensors if t.data_type in FLOAT_TYPES and len(t.dims) >= 2)
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                count += _count_weights(sub)
    return count
