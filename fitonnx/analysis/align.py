"""Pair the quantizable tensors of two ONNX models by graph structure, never by name.

Exporters rename everything, wrap NHWC graphs in Transposes, write Linear as Gemm or MatMul+Add
and store weights transposed, so the unit matched here is the quantizable op (Conv, Gemm,
MatMul, ...), described by what survives export:

- its family (Gemm and MatMul with a constant operand are both ``linear``),
- the shapes of its weights up to permutation of their axes (OIHW/HWIO, [out, in]/[in, out]),
- its depth: quantizable ops on the longest path from a graph input (layout ops do not count),
- what it feeds: the family and input slot of the next quantizable ops downstream.

Each model's ops are put in data-flow order (depth, then a canonical tie-break, so parallel
branches come in the same order whatever order the exporter wrote them) and the two sequences
are aligned by dynamic programming like an edit distance: ops of different family or weight
shape are never paired, so an extra layer is left unmatched instead of shifting every pair
after it. Tensors are then paired through their ops: weights slot by slot, activations through
the op that reads them (which sees through Transposes in front of a Conv: a permuted activation
has the same Fisher trace and range).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import onnx

from fitonnx.errors import InternalError
from fitonnx.model import graph
from fitonnx.model.graph import Kind, QuantTensor

# op type -> family; ops of one family compute the same kind of map and can be paired.
FAMILIES: dict[str, str] = {
    "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "Gemm": "linear",
    "MatMul": "linear",
    "Gather": "embedding",
    "LSTM": "lstm",
    "GRU": "gru",
    "RNN": "rnn",
}
# A Gemm or MatMul between two activations (attention scores) is a different kind of map.
ACTIVATION_PRODUCT = "matmul"
GRAPH_OUTPUT = "output"

# Match score: a base that outweighs every bonus, so the alignment first maximizes the number of
# paired ops and only then prefers pairs that also agree on depth and downstream use.
BASE_SCORE = 4
DEPTH_BONUS = 1
FEEDS_BONUS = 1
NUMEL_BONUS = 1


@dataclass(frozen=True)
class QuantOp:
    """A node reading quantizable tensors: the unit the alignment pairs."""

    node: str
    op_type: str
    family: str
    index: int  # position in the model's topological order (the last tie-break)
    depth: int  # quantizable ops on the longest path from a graph input, this one included
    weights: tuple[str, ...]  # quantizable weights, in input-slot order
    weight_shapes: tuple[tuple[int, ...], ...]  # each sorted: equal up to a permutation of axes
    activations: tuple[str, ...]  # quantizable activations, in input-slot order
    activation_numel: tuple[int | None, ...]  # elements per sample, None where a dim is unknown
    feeds: tuple[str, ...]  # sorted "family:slot" of the next quantizable ops, or "output"

    @property
    def signature(self) -> tuple[str, tuple[tuple[int, ...], ...]]:
        """What two ops must share to be paired."""
        return self.family, self.weight_shapes


@dataclass(frozen=True)
class TensorMatch:
    """Two tensors, one per model, that play the same role."""

    a: str
    b: str
    kind: Kind
    op_a: str
    op_b: str


@dataclass(frozen=True)
class Unpaired:
    """A tensor left without a partner, and why."""

    name: str
    kind: Kind
    op: str
    reason: str


@dataclass(frozen=True)
class Alignment:
    """The op and tensor pairs of model A against model B, and what is left over on each side."""

    ops_a: tuple[QuantOp, ...]
    ops_b: tuple[QuantOp, ...]
    op_pairs: tuple[tuple[int, int], ...]  # indices into ops_a, ops_b
    pairs: tuple[TensorMatch, ...]
    unpaired_a: tuple[Unpaired, ...]
    unpaired_b: tuple[Unpaired, ...]

    @property
    def complete(self) -> bool:
        return not self.unpaired_a and not self.unpaired_b


def family_of(op_type: str, has_weight: bool) -> str:
    if op_type not in FAMILIES:
        raise InternalError(f"graph.WEIGHT_INPUTS and align.FAMILIES disagree: no family for {op_type!r}")
    if op_type in ("Gemm", "MatMul") and not has_weight:
        return ACTIVATION_PRODUCT
    return FAMILIES[op_type]


def _numel(shape: tuple[int | None, ...] | None) -> int | None:
    """Elements per sample (the first axis is taken as the batch), or None if any dim is unknown."""
    if shape is None or any(d is None for d in shape[1:]):
        return None
    n = 1
    for d in shape[1:]:
        n *= int(d)  # type: ignore[arg-type]
    return n


def _resolve(
    name: str, wanted: Mapping[str, QuantTensor], producers: Mapping[str, onnx.NodeProto]
) -> QuantTensor | None:
    """The quantizable tensor an input slot reads, through layout-only ops (as graph.py does)."""
    for _ in range(17):
        if name in wanted:
            return wanted[name]
        node = producers.get(name)
        if node is None or node.op_type not in graph.LAYOUT_OPS:
            return None
        name = node.input[0]
    return None


def _depths(g: nx.MultiDiGraph, order: Sequence[tuple[str, str]], units: Container[str]) -> dict[tuple[str, str], int]:
    """Per graph key, how many quantizable ops (``units``) lie on the longest path up to it."""
    depth: dict[tuple[str, str], int] = {}
    for key in order:
        base = max((depth[p] for p in g.predecessors(key)), default=0)
        depth[key] = base + 1 if key[0] == "n" and key[1] in units else base
    return depth


def quant_ops(model: onnx.ModelProto, tensors: Sequence[QuantTensor]) -> tuple[QuantOp, ...]:
    """The quantizable ops of ``model`` (prepared, as scored) in canonical data-flow order."""
    g = graph.to_networkx(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    by_node: dict[str, list[QuantTensor]] = {}
    for t in tensors:
        for node in t.nodes:
            by_node.setdefault(node, []).append(t)
    order = list(nx.topological_sort(g))
    depth = _depths(g, order, by_node)
    position = {key[1]: i for i, key in enumerate(k for k in order if k[0] == "n")}
    outputs = {o.name for o in model.graph.output}

    raw: list[QuantOp] = []
    for name, owned in by_node.items():
        node: onnx.NodeProto = g.nodes[("n", name)]["op"]
        wanted = {t.name: t for t in owned}
        slots: list[QuantTensor] = []
        for slot_name in node.input:
            t = _resolve(slot_name, wanted, producers) if slot_name else None
            if t is not None and t not in slots:
                slots.append(t)
        weights = [t for t in slots if t.kind is Kind.WEIGHT]
        acts = [t for t in slots if t.kind is Kind.ACTIVATION]
        family = family_of(node.op_type, bool(weights))
        raw.append(
            QuantOp(
                node=name,
                op_type=node.op_type,
                family=family,
                index=position[name],
                depth=depth[("n", name)],
                weights=tuple(t.name for t in weights),
                weight_shapes=tuple(tuple(sorted(t.shape or ())) for t in weights),
                activations=tuple(t.name for t in acts),
                activation_numel=tuple(_numel(t.shape) for t in acts),
                feeds=_feeds(g, name, set(by_node), outputs),
            )
        )
    raw.sort(key=lambda op: (op.depth, op.family, op.weight_shapes, op.feeds, op.index))
    return tuple(raw)


def _feeds(g: nx.MultiDiGraph, start: str, units: set[str], outputs: set[str]) -> tuple[str, ...]:
    """Family and slot of the quantizable ops the output of ``start`` reaches first."""
    found: set[str] = set()
    seen: set[tuple[str, str]] = set()
    queue: deque[tuple[str, str]] = deque(g.successors(("n", start)))
    while queue:
        tensor = queue.popleft()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor[1] in outputs:
            found.add(GRAPH_OUTPUT)
        for _, consumer, data in g.out_edges(tensor, data=True):
            if consumer[1] in units:
                node: onnx.NodeProto = g.nodes[consumer]["op"]
                # the family without weight knowledge is enough here: linear and matmul both map to "linear"
                found.add(f"{FAMILIES.get(node.op_type, node.op_type)}:{data['slot']}")
            else:
                queue.extend(g.successors(consumer))
    return tuple(sorted(found))


def _score(a: QuantOp, b: QuantOp) -> int:
    """How well two ops match; 0 when they must not be paired."""
    if a.signature != b.signature:
        return 0
    score = BASE_SCORE
    score += DEPTH_BONUS if a.depth == b.depth else 0
    score += FEEDS_BONUS if a.feeds == b.feeds else 0
    known = [(x, y) for x, y in zip(a.activation_numel, b.activation_numel, strict=False) if x and y]
    score += NUMEL_BONUS if len(a.activations) == len(b.activations) and all(x == y for x, y in known) else 0
    return score


def align_ops(a: Sequence[QuantOp], b: Sequence[QuantOp]) -> list[tuple[int, int]]:
    """Order-preserving pairs of maximum total score (Needleman–Wunsch with free gaps).

    Written here because the score needs the ops' structure; difflib's SequenceMatcher only matches
    equal items and takes no scores, and networkx's graph matchers look for isomorphism, which
    any extra layer breaks.
    """
    n, m = len(a), len(b)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev = table[i], table[i - 1]
        for j in range(1, m + 1):
            s = _score(a[i - 1], b[j - 1])
            row[j] = max(prev[j], row[j - 1], prev[j - 1] + s if s else 0)
    pairs: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 and j > 0:
        s = _score(a[i - 1], b[j - 1])
        if s and table[i][j] == table[i - 1][j - 1] + s:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif table[i][j] == table[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def align(
    model_a: onnx.ModelProto,
    tensors_a: Sequence[QuantTensor],
    model_b: onnx.ModelProto,
    tensors_b: Sequence[QuantTensor],
) -> Alignment:
    """Pair the quantizable tensors of two models; a tensor without a clear partner stays unpaired."""
    ops_a, ops_b = quant_ops(model_a, tensors_a), quant_ops(model_b, tensors_b)
    op_pairs = align_ops(ops_a, ops_b)
    kinds = {t.name: t.kind for t in tensors_a}
    # Candidate tensor pairs, counted over every op pair that proposes them: a tensor read by
    # several ops (one activation feeding Q, K and V) gets one vote per op.
    votes: Counter[tuple[str, str]] = Counter()
    first: dict[tuple[str, str], tuple[str, str]] = {}
    for i, j in op_pairs:
        oa, ob = ops_a[i], ops_b[j]
        for pair in [*zip(oa.weights, ob.weights, strict=True), *zip(oa.activations, ob.activations, strict=False)]:
            votes[pair] += 1
            first.setdefault(pair, (oa.node, ob.node))
    rank = {pair: k for k, pair in enumerate(first)}
    used_a: dict[str, str] = {}
    used_b: dict[str, str] = {}
    matches: list[TensorMatch] = []
    for pair in sorted(votes, key=lambda p: (-votes[p], rank[p])):
        ta, tb = pair
        if ta in used_a or tb in used_b:
            continue
        used_a[ta], used_b[tb] = tb, ta
        matches.append(TensorMatch(a=ta, b=tb, kind=kinds[ta], op_a=first[pair][0], op_b=first[pair][1]))
    matches.sort(key=lambda m: rank[(m.a, m.b)])
    paired_ops_a = {ops_a[i].node: ops_b[j].node for i, j in op_pairs}
    paired_ops_b = {ops_b[j].node: ops_a[i].node for i, j in op_pairs}
    return Alignment(
        ops_a=ops_a,
        ops_b=ops_b,
        op_pairs=tuple(op_pairs),
        pairs=tuple(matches),
        unpaired_a=_leftovers(tensors_a, used_a, paired_ops_a, votes, 0),
        unpaired_b=_leftovers(tensors_b, used_b, paired_ops_b, votes, 1),
    )


def _leftovers(
    tensors: Sequence[QuantTensor],
    used: dict[str, str],
    paired_ops: dict[str, str],
    votes: Counter[tuple[str, str]],
    side: int,
) -> tuple[Unpaired, ...]:
    out: list[Unpaired] = []
    for t in tensors:
        if t.name in used:
            continue
        partners = [p[1 - side] for p in votes if p[side] == t.name]
        if partners:
            reason = f"its counterpart {partners[0]!r} is already paired with another tensor"
        elif any(n in paired_ops for n in t.nodes):
            reason = "its op has a counterpart that reads no matching tensor"
        else:
            ops = ", ".join(f"{n} ({op})" for n, op in zip(t.nodes, t.op_types, strict=True))
            reason = f"{ops} has no counterpart of the same family and weight shape in the other model"
        out.append(Unpaired(name=t.name, kind=t.kind, op=t.nodes[0] if t.nodes else "", reason=reason))
    return tuple(out)
