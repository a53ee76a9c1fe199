"""Loop and Scan unrolled over a static trip count: the body's nodes copied once per step.

Neither engine differentiates a subgraph (onnxruntime-training 1.19 has no gradient for Loop or
Scan; fitonnx's engine has no rule), and no library pass unrolls them. Unrolling computes the same
function: step t runs the body's own nodes on the values step t − 1 left (loop-carried values,
Scan states), Scan inputs are sliced with Gather at t (or T − 1 − t in reverse), and per-step
outputs are stacked with Unsqueeze/Concat along their axis. Weights the body reads from the outer
graph stay one tensor read at every step, so they are scored once with the gradient summed over
the steps; a constant inside the body becomes one initializer. A quantizer inside a body is one
tensor over every step, which FIT's per-tensor activations do not model: the body's
MatMul/Conv/Gemm are marked weights-only (their activations are not scored, and the change says so).

Covered: Scan from opset 9 with a static scan-axis length, any axes and directions; Loop with a
trip count known before running (a constant, or computed from static sizes: TorchScript's
``for t in range(x.size(1))`` is ``Gather(Shape(x), 1)``, evaluated by onnx's reference evaluator)
whose condition stays true (absent or constant true, and the body's condition
output its condition input or a constant true); bodies without nested subgraphs, at most
``MAX_STEPS`` steps and ``MAX_NODES`` unrolled nodes. Anything else raises ``NoRewrite`` saying
which assumption fails, and the node is reported as a blocker.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fitonnx.model.graph import PREPARE_WEIGHTS_ONLY, WEIGHT_INPUTS, bodies, walk_upstream
from fitonnx.prepare.rewrites.base import Builder, NoRewrite, rewrite

MAX_STEPS = 1024
MAX_NODES = 100_000


class _Inliner:
    """Copies a body's nodes into the builder once per step, with fresh tensor names."""

    def __init__(self, b: Builder, body: onnx.GraphProto, steps: int) -> None:
        if any(bodies(node) for node in body.node):
            raise NoRewrite("expected a body without nested subgraphs (If, Loop or Scan inside it)")
        if not 1 <= steps <= MAX_STEPS or steps * len(body.node) > MAX_NODES:
            raise NoRewrite(
                f"expected 1 to {MAX_STEPS} steps and at most {MAX_NODES} unrolled nodes; found {steps} steps "
                f"of {len(body.node)} nodes"
            )
        self.b, self.body = b, body
        self.hoisted: dict[str, str] = {}
        for tensor in body.initializer:
            value = numpy_helper.to_array(tensor)
            self.hoisted[tensor.name] = b.const(value, f"body_{tensor.name}", value.dtype)
        self.nodes = []
        for node in body.node:
            value = _constant_value(node)
            if value is None:
                self.nodes.append(node)
            else:
                self.hoisted[node.output[0]] = b.const(value, f"body_{node.output[0]}", value.dtype)

    def step(self, t: int, bound: dict[str, str]) -> dict[str, str]:
        """Append step ``t`` with body inputs ``bound``; the outer name of every body tensor."""
        env = {**self.hoisted, **bound}
        for index, node in enumerate(self.nodes):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [env.get(x, x) if x else "" for x in node.input]
            for k, out in enumerate(node.output):
                if out:
                    env[out] = self.b.fresh(f"t{t}_{out}")
                    copy.output[k] = env[out]
            copy.name = f"{self.b.base}/t{t}/{node.name or f'{node.op_type}_{index}'}"
            if copy.op_type in WEIGHT_INPUTS and copy.domain in ("", "ai.onnx"):
                copy.doc_string = PREPARE_WEIGHTS_ONLY
            self.b.nodes.append(copy)
        return env


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The tensor a numeric Constant node holds (None for any other node)."""
    if node.op_type != "Constant" or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    value = helper.get_attribute_value(attr)
    if attr.name == "value":
        return numpy_helper.to_array(value)
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    return np.asarray(value, kinds[attr.name]) if attr.name in kinds else None


def _stack(b: Builder, parts: list[str], axis: int, reverse: bool) -> str:
    """The per-step values stacked along a new ``axis`` (last step first when ``reverse``)."""
    ordered = parts[::-1] if reverse else parts
    return b.op("Concat", [b.unsqueeze(p, [axis]) for p in ordered], "stacked", axis=axis)


def _emit(b: Builder, values: list[str], first: int) -> None:
    """Identity of each value into the node's outputs ``first``, ``first + 1``, ... (unused ones skipped)."""
    for k, value in enumerate(values):
        target = b.output(first + k) if first + k < len(b.node.output) else ""
        if target:
            b.nodes.append(helper.make_node("Identity", [value], [target], name=f"{b.base}/out{first + k}"))


def _ints(b: Builder, name: str, count: int, default: int) -> list[int]:
    values = b.attr(name)
    return [default] * count if values is None else [int(v) for v in values]


@rewrite("Scan")
def rewrite_scan(b: Builder) -> str:
    if b.ctx.opset < 9:
        raise NoRewrite("expected Scan from opset 9 (Scan-8 has a batch axis)")
    body: onnx.GraphProto = b.attr("body")
    m = int(b.attr("num_scan_inputs"))
    n = len(b.node.input) - m
    k = len(body.output) - n
    in_axes, in_dirs = _ints(b, "scan_input_axes", m, 0), _ints(b, "scan_input_directions", m, 0)
    out_axes, out_dirs = _ints(b, "scan_output_axes", k, 0), _ints(b, "scan_output_directions", k, 0)
    scans = list(b.node.input[n:])
    axes = [axis % b.rank(x) for x, axis in zip(scans, in_axes, strict=True)]
    lengths = {b.static_dim(x, axis, "the trip count of a Scan") for x, axis in zip(scans, axes, strict=True)}
    if len(lengths) != 1:
        raise NoRewrite(f"expected scan inputs of one length; found lengths {sorted(lengths)}")
    steps = lengths.pop()
    inline = _Inliner(b, body, steps)
    states = list(b.node.input[:n])
    outputs: list[list[str]] = [[] for _ in range(k)]
    for t in range(steps):
        bound = {body.input[i].name: states[i] for i in range(n)}
        for j, x in enumerate(scans):
            index = b.const(np.asarray(t if in_dirs[j] == 0 else steps - 1 - t), "step", np.dtype(np.int64))
            bound[body.input[n + j].name] = b.op("Gather", [x, index], f"t{t}_slice", axis=axes[j])
        env = inline.step(t, bound)
        states = [env.get(o.name, o.name) for o in body.output[:n]]
        for j in range(k):
            outputs[j].append(env.get(body.output[n + j].name, body.output[n + j].name))
    stacked = [_stack(b, outputs[j], out_axes[j], out_dirs[j] == 1) for j in range(k)]
    _emit(b, states, 0)
    _emit(b, stacked, n)
    return f"unrolled over {steps} steps (the body's activations are not scored)"


def _condition_stays_true(b: Builder, body: onnx.GraphProto) -> bool:
    """Whether the body's condition output is its condition input, an Identity of it, or constant true."""
    cond_in, cond_out = body.input[1].name, body.output[0].name
    if cond_out == cond_in:
        return True
    producer = next((node for node in body.node if cond_out in node.output), None)
    if producer is not None and producer.op_type == "Identity" and producer.input[0] == cond_in:
        return True
    value = _constant_value(producer) if producer is not None else None
    if value is None:
        init = next((t for t in body.initializer if t.name == cond_out), None)
        value = numpy_helper.to_array(init) if init is not None else None
    if value is None and producer is None:
        value = b.constant_value(cond_out)  # an outer-scope constant
    return value is not None and bool(np.all(value))


# Ops a trip count may be computed with from static sizes (TorchScript writes x.size(1) as
# Gather(Shape(x), 1)); the inputs are fixed to the data's shapes before the rewrites run.
SHAPE_ARITHMETIC = frozenset({"Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Cast", "Reshape", "Identity"})
SHAPE_ARITHMETIC |= {"Add", "Sub", "Mul", "Div", "ReduceProd", "Constant"}


def _static_value(b: Builder, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is computed from constants and static sizes alone (Shape of a
    tensor whose shape inference knows every size), by onnx's reference evaluator; else None."""
    nodes: list[onnx.NodeProto] = []
    constants: dict[str, np.ndarray] = {}

    def expand(current: str) -> Iterable[str] | None:
        value = b.constant_value(current)
        node = b.ctx.producers.get(current)
        if value is not None:
            constants[current] = value
            return ()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Shape":
            known = b.ctx.types.get(node.input[0])
            if known is None or known.static_shape is None:
                return None
            start, end = (next((a.i for a in node.attribute if a.name == k), None) for k in ("start", "end"))
            constants[current] = np.asarray(known.static_shape[start:end], np.int64)
            return ()
        if node.op_type in SHAPE_ARITHMETIC:
            nodes.append(node)
            return reversed(node.input)  # last input first, the order this walk always took
        return None

    if not walk_upstream(name, expand):
        return None
    graph = helper.make_graph(
        nodes[::-1],
        "trip_count",
        [],
        [helper.make_empty_tensor_value_info(name)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.ctx.opset)])
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


@rewrite("Loop")
def rewrite_loop(b: Builder) -> str:
    body: onnx.GraphProto = b.attr("body")
    trip = _static_value(b, b.input(0)) if b.input(0) else None
    if trip is None:
        raise NoRewrite(
            "expected a trip count M known before running (a constant, or sizes of static shapes); it is absent or computed from values"
        )
    if b.input(1):
        cond = b.constant_value(b.input(1))
        if cond is None or not bool(np.all(cond)):
            raise NoRewrite("expected the loop condition to be absent or constant true; it is computed at run time")
    if not _condition_stays_true(b, body):
        raise NoRewrite("expected the body to keep the loop condition true; it computes it (early exit)")
    steps = int(np.asarray(trip).reshape(-1)[0])
    n = len(b.node.input) - 2
    k = len(body.output) - 1 - n
    inline = _Inliner(b, body, steps)
    true = b.const(np.asarray(True), "cond", np.dtype(np.bool_))
    carried = list(b.node.input[2:])
    outputs: list[list[str]] = [[] for _ in range(k)]
    for t in range(steps):
        bound = {body.input[0].name: b.const(np.asarray(t), "iteration", np.dtype(np.int64)), body.input[1].name: true}
        bound.update({body.input[2 + i].name: carried[i] for i in range(n)})
        env = inline.step(t, bound)
        carried = [env.get(o.name, o.name) for o in body.output[1 : 1 + n]]
        for j in range(k):
            outputs[j].append(env.get(body.output[1 + n + j].name, body.output[1 + n + j].name))
    _emit(b, carried, 0)
    _emit(b, [_stack(b, parts, 0, False) for parts in outputs], n)
    return f"unrolled over {steps} steps (the body's activations are not scored)"
