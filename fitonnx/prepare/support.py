"""Which ops the gradient engine can differentiate, and the nodes that block a gradient path.

The op lists were measured on onnxruntime-training 1.19.2 by scripts/probe_gradients.py: a
single-op graph per op, GradientGraphBuilder asked for d loss / d x, the gradient graph run on
the CPU and compared with central differences. An op not in either list (another domain, or one
never probed) is probed on the spot with the node's own attributes and input types.

Only nodes on a float path from a differentiated tensor to the loss need a gradient: a path
through an integer or boolean tensor (Shape, ArgMax, comparisons) carries none, and onnxruntime's
builder skips it too, as it skips BatchNormalization's mean and variance (``STOP_GRADIENT_INPUTS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from fitonnx.errors import UnsupportedError
from fitonnx.model.graph import FLOAT_TYPES, body_reads, gradient_inputs, node_name
from fitonnx.model.runtime import make_session, quiet_stderr
from fitonnx.prepare.rewrites import REWRITES, RewriteContext, context, explain
from fitonnx.prepare.shapes import TensorType, tensor_types

# Gradient builds, runs on the CPU and matches central differences (probe, opsets 17 and 21).
GRADIENT_OPS = frozenset(
    {
        "Abs", "Add", "AveragePool", "Cast", "Clip", "Concat", "Conv", "Cos", "Div", "Erf", "Exp", "Expand",
        "Flatten", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "Identity",
        "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg",
        "Pad", "Pow", "Reciprocal", "ReduceL2", "ReduceLogSumExp", "ReduceMean", "ReduceSum", "Relu", "Reshape",
        "ScatterElements", "ScatterND", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub",
        "Tanh", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Where",
    }
)  # fmt: skip
# No gradient registered (or one that is wrong or has no CPU kernel: ConvTranspose, Resize,
# Dropout, tanh-Gelu); the registry in rewrites.py covers most of them.
NO_GRADIENT_OPS = frozenset(
    {
        "Acos", "Asin", "Atan", "BatchNormalization", "Celu", "Ceil", "Compress", "ConvTranspose", "CumSum",
        "DepthToSpace", "Det", "Dropout", "Einsum", "Elu", "Floor", "GRU", "GlobalLpPool", "GlobalMaxPool",
        "GridSample", "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "InstanceNormalization",
        "LRN", "LSTM", "LpNormalization", "LpPool", "Mean", "MeanVarianceNormalization", "Mish", "Mod", "PRelu",
        "RNN", "ReduceL1", "ReduceLogSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "Resize",
        "ReverseSequence", "RoiAlign", "Round", "Selu", "Shrink", "Sign", "Sinh", "Cosh", "Softplus", "Softsign",
        "SpaceToDepth", "Sum", "Tan", "ThresholdedRelu", "Upsample",
    }
)  # fmt: skip
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
UNROLLED_OPS = frozenset({"Loop", "Scan"})  # prepare unrolls them where it can (rewrites/control_flow.py)
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Blocker:
    """A node on a gradient path that the engine cannot differentiate, and why."""

    op_type: str
    node: str
    domain: str
    reason: str
    outputs: tuple[str, ...] = ()  # the graph outputs whose loss it blocks (filled by ``find_blockers``)

    def describe(self) -> str:
        op = self.op_type if self.domain in DEFAULT_DOMAINS else f"{self.domain}.{self.op_type}"
        return f"{op} (node {self.node!r}): {self.reason}"


def _is_float(types: dict[str, TensorType], name: str) -> bool:
    t = types.get(name)
    return t is None or t.elem_type == 0 or t.elem_type in FLOAT_TYPES


def on_path(
    model: onnx.ModelProto, sources: Iterable[str], targets: Iterable[str], types: dict[str, TensorType] | None = None
) -> list[tuple[int, onnx.NodeProto]]:
    """Nodes on a float path from any of ``sources`` to any of ``targets`` (graph order)."""
    types = tensor_types(model) if types is None else types
    nodes = list(model.graph.node)
    reached = {s for s in sources if _is_float(types, s)}
    forward: set[int] = set()
    for i, node in enumerate(nodes):
        read = set(gradient_inputs(node)) | body_reads(node)
        if read & reached:
            forward.add(i)
            reached |= {o for o in node.output if o and _is_float(types, o)}
    needed = {t for t in targets if _is_float(types, t)}
    backward: set[int] = set()
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if any(o in needed for o in node.output):
            backward.add(i)
            needed |= {n for n in set(gradient_inputs(node)) | body_reads(node) if n and _is_float(types, n)}
    return [(i, nodes[i]) for i in sorted(forward & backward)]


def _reason(
    model: onnx.ModelProto,
    index: int,
    node: onnx.NodeProto,
    types: dict[str, TensorType],
    ctx: RewriteContext,
    gradient_ops: frozenset[str] | None = None,
) -> str | None:
    """Why ``node`` blocks a gradient, or None if it does not.

    ``gradient_ops``: the op types the chosen engine has a rule for (fitonnx's ``onnx`` engine);
    None means onnxruntime-training, whose measured lists and probes decide."""
    if gradient_ops is not None:
        return _reason_for_rules(index, node, ctx, gradient_ops)
    op = node.op_type
    default = node.domain in DEFAULT_DOMAINS
    if (default and op in CONTROL_FLOW_OPS and op not in REWRITES) or (
        any(a.HasField("g") or a.graphs for a in node.attribute) and not (default and op in REWRITES)
    ):
        return "control flow (a subgraph) is not differentiable by onnxruntime-training 1.19"
    if default and op in REWRITES:
        # A node the registry covers is still here only if its form is not covered (or prepare did
        # not run): say why. Ops with a gradient in their common form are rewritten only in bad forms.
        why = explain(ctx, node, index)
        if why is not None:
            return f"no usable gradient in onnxruntime-training 1.19 in this form, and fitonnx's rewrite does not apply: {why}"
        return None
    if default and op in GRADIENT_OPS:
        return None
    if default and op in NO_GRADIENT_OPS:
        return "no gradient in onnxruntime-training 1.19 and no rewrite in fitonnx"
    return _probe(model, node, types)


def _reason_for_rules(
    index: int, node: onnx.NodeProto, ctx: RewriteContext, gradient_ops: frozenset[str]
) -> str | None:
    """Why ``node`` blocks an engine that differentiates exactly the op types ``gradient_ops``."""
    op = node.op_type
    if node.domain not in DEFAULT_DOMAINS:
        return f"an op of domain {node.domain!r}: fitonnx's onnx engine differentiates only default-domain ops"
    why = explain(ctx, node, index) if op in REWRITES and op not in gradient_ops else None
    if why is not None:
        return f"no gradient in fitonnx's onnx engine in this form, and fitonnx's rewrite does not apply: {why}"
    if op in CONTROL_FLOW_OPS or any(a.HasField("g") or a.graphs for a in node.attribute):
        return "control flow (a subgraph) is not differentiable by fitonnx's onnx engine"
    if op in gradient_ops:
        return None
    return "no gradient in fitonnx's onnx engine and no rewrite in fitonnx"


def _probe(model: onnx.ModelProto, node: onnx.NodeProto, types: dict[str, TensorType]) -> str | None:
    """Build (and load) the gradient of ``node`` alone, with its attributes and input types."""
    # deferred: the onnxruntime-training binding is optional (only the training wheel has it)
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    inits = {t.name: t for t in model.graph.initializer}
    inputs: list[onnx.ValueInfoProto] = []
    constants: list[onnx.TensorProto] = []
    wrt: set[str] = set()
    for name in dict.fromkeys(i for i in node.input if i):
        if name in inits:
            constants.append(inits[name])
            continue
        t = types.get(name)
        if t is None or t.elem_type == 0:
            return "not known to have a gradient (its input types are unknown, so it could not be probed)"
        inputs.append(helper.make_tensor_value_info(name, t.elem_type, list(t.shape) if t.shape is not None else None))
        if t.elem_type in FLOAT_TYPES:
            wrt.add(name)
    outs = [o for o in node.output if o and _is_float(types, o)]
    if not wrt or not outs:
        return None
    nodes = [node]
    sums = []
    for k, o in enumerate(outs):
        cast = f"__probe_f{k}"
        nodes.append(helper.make_node("Cast", [o], [cast], to=TensorProto.FLOAT))
        sums.append(f"__probe_s{k}")
        nodes.append(helper.make_node("ReduceSum", [cast], [sums[-1]], keepdims=0))
    loss = sums[0]
    for k, s in enumerate(sums[1:]):
        loss_k = f"__probe_l{k}"
        nodes.append(helper.make_node("Add", [loss, s], [loss_k]))
        loss = loss_k
    graph = helper.make_graph(
        nodes, "probe", inputs, [helper.make_tensor_value_info(loss, TensorProto.FLOAT, [])], constants
    )
    probe = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=min(model.ir_version, 10))
    try:
        with quiet_stderr():
            builder = GradientGraphBuilder(probe.SerializeToString(), {loss}, wrt, loss)
            builder.build()
            make_session(builder.get_model())
    except Exception as exc:
        text = str(exc)
        if "has not been registered" in text:
            return "no gradient in onnxruntime-training 1.19 and no rewrite in fitonnx"
        first = text.split("] : ")[-1].strip().splitlines()[0] if text.strip() else type(exc).__name__
        return f"onnxruntime-training cannot differentiate it: {first[:200]}"
    return None


def find_blockers(
    model: onnx.ModelProto,
    sources: Sequence[str],
    targets: Sequence[str] | None = None,
    *,
    gradient_ops: frozenset[str] | None = None,
) -> list[Blocker]:
    """Nodes between ``sources`` and ``targets`` (default: every graph output) with no usable gradient
    (``gradient_ops``: as in ``_reason``, the chosen engine's rules; None for onnxruntime-training)."""

    ctx = context(model)
    types = ctx.types
    targets = [o.name for o in model.graph.output] if targets is None else list(targets)
    reasons: dict[int, tuple[onnx.NodeProto, str]] = {}
    affected: dict[int, list[str]] = {}
    for target in targets:
        for index, node in on_path(model, sources, [target], types):
            if index not in reasons:
                why = _reason(model, index, node, types, ctx, gradient_ops)
                if why is None:
                    continue
                reasons[index] = (node, why)
            if index in reasons:
                affected.setdefault(index, []).append(target)
    for target in targets:
        for index, node, why in _opaque_loops(model, target, ctx):
            reasons.setdefault(index, (node, why))
            affected.setdefault(index, []).append(target)
    return [
        Blocker(node.op_type, node_name(node, index), node.domain, why, tuple(affected.get(index, ())))
        for index, (node, why) in sorted(reasons.items())
    ]


def _opaque_loops(model: onnx.ModelProto, target: str, ctx: RewriteContext) -> list[tuple[int, onnx.NodeProto, str]]:
    """Loop/Scan nodes left in ``model`` that ``target`` depends on and whose body reads weights: those
    weights are found nowhere else, so they would go unscored without a word (prepare unrolls the
    Loop/Scan it can; this says why it could not)."""
    weights = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES and len(t.dims) >= 1}
    nodes = list(model.graph.node)
    needed, found = {target}, []
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if not needed & set(node.output):
            continue
        needed |= set(node.input) | body_reads(node)
        read = sorted(body_reads(node) & weights)
        if node.op_type in UNROLLED_OPS and node.domain in DEFAULT_DOMAINS and read:
            why = explain(ctx, node, i) or "fitonnx's rewrite does not apply"
            shown = ", ".join(read[:3]) + (" ..." if len(read) > 3 else "")
            found.append(
                (i, node, f"the weights its body reads ({shown}) cannot be scored without unrolling it: {why}")
            )
    return found[::-1]


def check_differentiable(
    model: onnx.ModelProto,
    sources: Sequence[str],
    targets: Sequence[str],
    gradient_ops: frozenset[str] | None = None,
) -> None:
    """Raise ``UnsupportedError`` naming each op and node between ``sources`` and ``targets`` with no gradient."""
    blockers = find_blockers(model, sources, targets, gradient_ops=gradient_ops)
    if not blockers:
        return
    shown = "; ".join(b.describe() for b in blockers[:3])
    more = f" (and {len(blockers) - 3} more)" if len(blockers) > 3 else ""
    raise UnsupportedError(
        f"expected only differentiable ops between the quantizable tensors and the loss; found {shown}{more}",
        hint="`fitonnx inspect MODEL` lists them all; if they only feed another output pick the output with "
        "--output, else re-export the model without them",
    )
