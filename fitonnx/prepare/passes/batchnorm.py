"""Fold inference-form BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

onnxruntime-training has no gradient for inference BatchNormalization, and a deployment toolchain
folds it anyway: the folded weight is the one that gets quantized, so it is the one to score.
ONNX Runtime's own ConvBNFusion would do the arithmetic but names the result
``ConvBnFusion_W_<weight>`` without saying which BN went in, and it does not cover ConvTranspose
or Gemm; so the fold is written here (a few lines of numpy per op).

Naming: the folded weight is ``<weight>+<bn>`` and the folded bias ``<bias>+<bn>`` (``<weight>.bias``
when the op had no bias), where ``<bn>`` is the common prefix of the BN's parameter names
(``bn1`` for ``bn1.weight``, ``bn1.bias``...), else the BN node's name. ``Change.origins`` lists the
weight first, then the BN parameters.

A BN is folded only when its input comes from exactly such an op whose weight (and bias) are
initializers and whose output no other node or graph output reads; the remaining BNs are turned
into Mul+Add by the rewrite registry (``rewrites.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fitonnx.model import external, graph
from fitonnx.prepare.shapes import tensor_types
from fitonnx.prepare.types import Change, ChangeKind

FOLDABLE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _attr(node: onnx.NodeProto, name: str, default: float | int | str) -> float | int | str:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def bn_affine(bn: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (scale, shift) of an inference BN in float64, or None when its parameters are not constant."""
    if len(bn.input) < 5 or any(name not in inits for name in bn.input[1:5]):
        return None
    gamma, beta, mean, var = (inits[name].astype(np.float64) for name in bn.input[1:5])
    eps = float(_attr(bn, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def is_inference_bn(bn: onnx.NodeProto) -> bool:
    outputs = [o for o in bn.output if o]
    return bn.op_type == "BatchNormalization" and int(_attr(bn, "training_mode", 0)) == 0 and len(outputs) == 1


def bn_tag(bn: onnx.NodeProto) -> str:
    """Short name of a BN for folded-tensor names: its parameters' common dotted prefix, else the node name."""
    parts = [n.split(".") for n in bn.input[1:5] if n]
    common: list[str] = []
    for tokens in zip(*parts, strict=False):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    if common and all(len(p) > len(common) for p in parts):
        return ".".join(common)
    return bn.name or bn.output[0]


def _folded(
    op: onnx.NodeProto, w: np.ndarray, b: np.ndarray | None, scale: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Weight and bias of ``op`` with y -> scale·y + shift absorbed, or None if the shapes do not fit."""
    c = scale.shape[0]
    if op.op_type == "Conv":
        if w.shape[0] != c:
            return None
        w2 = w * scale.reshape((c,) + (1,) * (w.ndim - 1))
    elif op.op_type == "ConvTranspose":
        group = int(_attr(op, "group", 1))
        if w.shape[1] * group != c or w.shape[0] % group:
            return None
        # W is (C_in, C_out/group, k...); output channel g·(C_out/group) + j uses W[g·C_in/group + i, j].
        view = w.reshape((group, w.shape[0] // group, w.shape[1], *w.shape[2:]))
        w2 = (view * scale.reshape((group, 1, w.shape[1], *(1,) * (w.ndim - 2)))).reshape(w.shape)
    elif op.op_type == "Gemm":
        if w.ndim != 2:
            return None
        trans_b = int(_attr(op, "transB", 0))
        if (w.shape[0] if trans_b else w.shape[1]) != c:
            return None
        w2 = w * (scale[:, None] if trans_b else scale[None, :])
        beta = float(_attr(op, "beta", 1.0))
        if b is not None and beta != 0.0:
            return w2, scale * (b * beta) + shift  # caller sets beta to 1
        return w2, np.broadcast_to(shift, (c,)).copy()
    else:  # MatMul with a 2-D weight, output [N, C]
        if w.ndim != 2 or w.shape[1] != c:
            return None
        w2 = w * scale[None, :]
    bias = shift if b is None else scale * b + shift
    return w2, bias


@dataclass
class _Folding:
    """What ``fold_batchnorm`` reads of the graph and what it has changed so far."""

    out: onnx.ModelProto
    inits: dict[str, np.ndarray]
    producers: dict[str, onnx.NodeProto]
    readers: Counter[str]
    outputs: set[str]
    taken: set[str]
    ranks: dict[str, int] | None = None
    folded_bns: set[int] = field(default_factory=set)
    after: dict[int, onnx.NodeProto] = field(default_factory=dict)  # id(op) -> node to insert after it
    new_inits: list[onnx.TensorProto] = field(default_factory=list)

    @classmethod
    def of(cls, out: onnx.ModelProto) -> _Folding:
        g = out.graph
        inits = external.LazyArrays(g.initializer)
        return cls(
            out=out,
            inits=inits,
            producers=graph.producers(g.node),
            readers=Counter(name for node in g.node for name in node.input),
            outputs={o.name for o in g.output},
            taken=graph.tensor_names(g),
        )


@dataclass(frozen=True)
class _Fold:
    """One BN to fold: the op before it, that op's weight and bias names, and the folded values."""

    bn: onnx.NodeProto
    op: onnx.NodeProto
    w_src: str
    b_src: str | None
    weight: np.ndarray
    bias: np.ndarray


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    state = _Folding.of(out)
    changes: list[Change] = []
    for bn in out.graph.node:
        fold = _foldable(state, bn)
        if fold is not None:
            changes.append(_apply(state, fold))
    if not changes:
        return out, []
    g = out.graph
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if id(node) in state.folded_bns:
            continue
        nodes.append(node)
        if id(node) in state.after:
            nodes.append(state.after[id(node)])
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(state.new_inits)
    drop_unused_initializers(g)
    return out, changes


def _foldable(state: _Folding, bn: onnx.NodeProto) -> _Fold | None:
    """The fold of ``bn`` into the op before it, or None when it is not an inference BN after such an op."""
    if not is_inference_bn(bn):
        return None
    op = state.producers.get(bn.input[0])
    affine = bn_affine(bn, state.inits)
    if op is None or affine is None or op.op_type not in FOLDABLE or op.domain not in ("", "ai.onnx"):
        return None
    if state.readers.get(bn.input[0], 0) != 1 or bn.input[0] in state.outputs or len(op.input) < 2:
        return None
    w_src = op.input[1]
    b_src = op.input[2] if op.op_type != "MatMul" and len(op.input) > 2 and op.input[2] else None
    if w_src not in state.inits or (b_src is not None and b_src not in state.inits):
        return None
    if op.op_type == "MatMul":
        state.ranks = _ranks(state.out) if state.ranks is None else state.ranks
        if state.ranks.get(bn.input[0]) != 2:
            return None
    w = state.inits[w_src].astype(np.float64)
    b = state.inits[b_src].astype(np.float64) if b_src is not None else None
    if b is not None and op.op_type != "Gemm" and b.shape != affine[0].shape:
        return None
    result = _folded(op, w, b, *affine)
    return None if result is None else _Fold(bn, op, w_src, b_src, *result)


def _apply(state: _Folding, fold: _Fold) -> Change:
    """Write the folded weight and bias into ``fold.op`` (MatMul: a bias Add after it) and drop the BN."""
    bn, op, w_src, b_src, taken = fold.bn, fold.op, fold.w_src, fold.b_src, state.taken
    tag = bn_tag(bn)
    w_name = _unique(f"{w_src}+{tag}", taken)
    b_base = b_src if b_src is not None else f"{w_src.removesuffix('.weight')}.bias"
    b_name = _unique(f"{b_base}+{tag}", taken)
    dtype = state.inits[w_src].dtype
    state.new_inits.append(numpy_helper.from_array(fold.weight.astype(dtype), w_name))
    state.new_inits.append(numpy_helper.from_array(fold.bias.astype(dtype), b_name))
    op.input[1] = w_name
    if op.op_type == "MatMul":
        op.output[0] = _unique(f"{bn.output[0]}__matmul", taken)
        state.after[id(op)] = helper.make_node(
            "Add", [op.output[0], b_name], [bn.output[0]], name=_unique(f"{bn.name or tag}/bias", taken)
        )
    else:
        while len(op.input) < 3:
            op.input.append("")
        op.input[2] = b_name
        op.output[0] = bn.output[0]
        if op.op_type == "Gemm":
            kept = [a for a in op.attribute if a.name != "beta"]
            del op.attribute[:]
            op.attribute.extend([*kept, helper.make_attribute("beta", 1.0)])
    state.folded_bns.add(id(bn))
    params = tuple(n for n in bn.input[1:5] if n)
    return Change(
        ChangeKind.FOLD,
        op.name or op.output[0],
        f"BatchNormalization {bn.name or bn.output[0]!r} folded into {op.op_type} weight {w_src!r} -> {w_name!r}",
        origins=((w_name, (w_src, *params)), (b_name, (*((b_src,) if b_src else ()), *params))),
    )


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}#{k}"
    taken.add(candidate)
    return candidate


def _ranks(model: onnx.ModelProto) -> dict[str, int]:

    return {name: len(t.shape) for name, t in tensor_types(model).items() if t.shape is not None}


def drop_unused_initializers(g: onnx.GraphProto) -> None:
    """Remove initializers (and their graph-input entries) that no node or graph output reads."""
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in g.node:  # names read inside subgraphs (If/Loop bodies) count as used
        for a in n.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                used |= {i for m in sub.node for i in m.input}
    kept = [t for t in g.initializer if t.name in used]
    dropped = {t.name for t in g.initializer} - {t.name for t in kept}
    if not dropped:
        return
    del g.initializer[:]
    g.initializer.extend(kept)
    inputs = [v for v in g.input if v.name not in dropped]
    del g.input[:]
    g.input.extend(inputs)
