"""The rewrite pass: every node with a registered rewrite replaced by its equivalent."""

from __future__ import annotations

import onnx

from fitonnx.model.graph import body_reads
from fitonnx.prepare.opset import opset_of
from fitonnx.prepare.passes.batchnorm import drop_unused_initializers
from fitonnx.prepare.rewrites.base import DEFAULT_DOMAINS, REWRITES, Builder, NoRewrite, RewriteContext
from fitonnx.prepare.shapes import tensor_types
from fitonnx.prepare.types import Change, ChangeKind


def context(model: onnx.ModelProto) -> RewriteContext:
    readers: dict[str, int] = {}
    for name in [i for n in model.graph.node for i in n.input] + [o.name for o in model.graph.output]:
        readers[name] = readers.get(name, 0) + 1
    return RewriteContext(
        opset=opset_of(model),
        types=tensor_types(model),
        initializers={t.name: t for t in model.graph.initializer},
        readers=readers,
        producers={o: n for n in model.graph.node for o in n.output if o},
    )


def _needs_rewrite(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    if node.domain not in DEFAULT_DOMAINS or node.op_type not in REWRITES:
        return False
    # A node of constants only is no gradient's business (the optimizer usually folds it); a Loop
    # or Scan body may read outer tensors without listing them as inputs.
    return any(name and name not in initializers for name in (*node.input, *body_reads(node)))


def try_rewrite(
    ctx: RewriteContext, node: onnx.NodeProto, taken: set[str], index: int
) -> tuple[Builder, str | None] | NoRewrite:
    """Run the node's rewrite: (builder, description or None if no rewrite is needed), or the reason it failed."""
    builder = Builder(ctx, node, taken, index)
    try:
        return builder, REWRITES[node.op_type](builder)
    except NoRewrite as reason:
        return reason


def explain(ctx: RewriteContext, node: onnx.NodeProto, index: int) -> str | None:
    """Why the registered rewrite of ``node`` does not apply; None if it applies, is not needed, or none exists."""
    if not _needs_rewrite(node, ctx.initializers):
        return None
    taken = set(ctx.types) | set(ctx.initializers) | {o for o in node.output}
    result = try_rewrite(ctx, node, taken, index)
    return str(result) if isinstance(result, NoRewrite) else None


# Rewrites whose output holds nodes that may need rewrites of their own (an unrolled body's ops):
# the pass runs again, up to this many rounds (nested loops).
UNROLLING = frozenset({"Loop", "Scan"})
MAX_ROUNDS = 4


def rewrite_ops(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    """Every node with a registered rewrite replaced by its equivalent; again over unrolled bodies."""
    out, last = _rewrite_round(model)
    changes = list(last)
    for _ in range(MAX_ROUNDS - 1):
        if not any(c.kind is ChangeKind.UNROLL for c in last):
            break
        out, last = _rewrite_round(out)
        changes.extend(last)
    return out, changes


def _rewrite_round(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if not any(_needs_rewrite(n, {t.name: t for t in g.initializer}) for n in g.node):
        return out, []
    ctx = context(out)
    taken = {o for n in g.node for o in n.output} | {i for n in g.node for i in n.input} | set(ctx.initializers)
    taken |= {v.name for v in g.input}
    nodes: list[onnx.NodeProto] = []
    changes: list[Change] = []
    replaced: set[str] = set()
    for index, node in enumerate(g.node):
        if not _needs_rewrite(node, ctx.initializers):
            nodes.append(node)
            continue
        result = try_rewrite(ctx, node, taken, index)
        if isinstance(result, NoRewrite) or result[1] is None:
            nodes.append(node)
            continue
        builder, description = result
        nodes.extend(builder.nodes)
        for tensor in builder.initializers:
            if tensor.name in replaced or tensor.name in ctx.initializers:
                replaced.add(tensor.name)  # a rewrite replacing a weight in place (same name)
            g.initializer.append(tensor)
        changes.append(
            Change(
                ChangeKind.UNROLL if node.op_type in UNROLLING else ChangeKind.REWRITE,
                builder.base,
                f"{node.op_type} -> {description}",
                origins=tuple(builder.origins),
            )
        )
    if replaced:
        kept = {}
        for tensor in g.initializer:
            kept[tensor.name] = tensor  # the last one with a name wins: the rewrite's
        del g.initializer[:]
        g.initializer.extend(kept.values())
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(g)
    return out, changes
