"""Per-sample squared weight-gradient norms from one batched backward pass.

With a loss summed over the batch (ℓ = Σ_n ℓ_n, samples independent), the gradient of a layer's
output is per-sample already, and the weight gradient of sample n is built from that sample's
input and output gradient alone — never from the batch gradient:
- Gemm/MatMul with 2-D input: ∂ℓ_n/∂W = x_n g_nᵀ, so ‖·‖² = ‖x_n‖²·‖g_n‖².
- MatMul on sequences [N, T, K]: ‖X_nᵀ G_n‖², either directly ([N, K, M] per-sample gradients) or
  as the ghost norm Σ_ts (X_n X_nᵀ)_ts (G_n G_nᵀ)_ts when T² < K·M.
- Conv: the unfolded input U_n (a Conv with an identity kernel gives every patch) against G_n:
  ‖U_n G_nᵀ‖² per group. Biases: the output gradient summed over everything but the channel.
- Gather (an embedding table, axis 0, indices [N, T...]): rows t and s of G_n add up where their
  indices are equal, so ‖·‖² = Σ_ts [i_t = i_s]·(G_n G_nᵀ)_ts, with no table-sized tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from fitonnx.errors import UnsupportedError
from fitonnx.fisher.autodiff.builder import Builder, attr, describe
from fitonnx.fisher.autodiff.engine import gradients, prune
from fitonnx.fisher.autodiff.rules_nn import _conv_attrs


def _sumsq(b: Builder, t: str, rank: int) -> str:
    """Σ over every axis but the batch axis 0 of t² (rank-independent of the opset's form)."""
    return b.reduce("ReduceSum", b.op("Mul", t, t), list(range(1, rank)), keepdims=0)


def _rows(b: Builder, t: str, last: int) -> str:
    """[N, ..., last] → [N, T, last] (T = product of the middle dims, 1 for a 2-D tensor)."""
    return b.op("Reshape", t, b.ints([0, -1, last]))


def _matmul_norm(b: Builder, x: str, g: str, k: int, m: int) -> str:
    """‖X_nᵀ G_n‖² for X [N, ..., K] and G [N, ..., M]: rank-1, ghost or direct."""
    xs = b.static_shape(x)
    if xs is not None and len(xs) == 2:
        return b.op("Mul", _sumsq(b, x, 2), _sumsq(b, g, 2))
    x3, g3 = _rows(b, x, k), _rows(b, g, m)
    t = None if xs is None else int(np.prod([d if isinstance(d, int) else -1 for d in xs[1:-1]]))
    if t is not None and t > 0 and t * t < k * m:
        gram_x = b.op("MatMul", x3, b.op("Transpose", x3, perm=[0, 2, 1]))
        gram_g = b.op("MatMul", g3, b.op("Transpose", g3, perm=[0, 2, 1]))
        return b.reduce("ReduceSum", b.op("Mul", gram_x, gram_g), [1, 2], keepdims=0)
    per_sample = b.op("MatMul", b.op("Transpose", x3, perm=[0, 2, 1]), g3)
    return _sumsq(b, per_sample, 3)


def _conv_norm(b: Builder, node: onnx.NodeProto, g: str) -> str:
    """‖U_n G_nᵀ‖² per group, U the identity-kernel Conv (patches) of x."""
    x, w = node.input[0], node.input[1]
    ws = b.static_shape(w)
    if ws is None or not all(isinstance(d, int) for d in ws):
        raise UnsupportedError(f"expected a static weight shape at {describe(node)}")
    cout, cig, kernel = ws[0], ws[1], list(ws[2:])
    group, nsp, patch = int(attr(node, "group", 1)), len(kernel), cig * int(np.prod(kernel))
    eye = np.eye(patch, dtype=helper.tensor_dtype_to_np_dtype(b.dtype(x))).reshape([patch, cig, *kernel])
    strides, dilations, pads = _conv_attrs(b, node, nsp)
    kw = {"strides": strides, "dilations": dilations, "pads": pads, "group": group}
    patches = b.op("Conv", x, b.const(np.tile(eye, [group] + [1] * (nsp + 1)), "eye"), **kw)
    u = b.op("Reshape", patches, b.ints([0, group, patch, -1]))
    gg = b.op("Reshape", g, b.ints([0, group, cout // group, -1]))
    per_sample = b.op("MatMul", u, b.op("Transpose", gg, perm=[0, 1, 3, 2]))
    return _sumsq(b, per_sample, 4)


def _embedding_norm(b: Builder, node: onnx.NodeProto, g: str) -> str:
    """Σ_ts [i_t = i_s]·g_t·g_s per sample for an axis-0 Gather with batched indices."""
    indices = b.op("Reshape", node.input[1], b.ints([0, -1]))
    same = b.op("Equal", b.unsqueeze(indices, [2]), b.unsqueeze(indices, [1]))
    rows = b.op("Reshape", g, b.op("Concat", b.dims(indices, 0, 2), b.ints([-1]), axis=0))
    gram = b.op("MatMul", rows, b.op("Transpose", rows, perm=[0, 2, 1]))
    masked = b.op("Mul", gram, b.op("Cast", same, to=b.dtype(node.input[0])))
    return b.reduce("ReduceSum", masked, [1, 2], keepdims=0)


def _weight_norm(b: Builder, node: onnx.NodeProto, slot: int, g: str) -> str:
    """The per-sample squared gradient norm [N] of ``node``'s input ``slot`` (a weight)."""
    op, w = node.op_type, node.input[slot]
    ws = b.static_shape(w)
    if op == "Conv" and slot == 1:
        return _conv_norm(b, node, g)
    if op == "Conv" and slot == 2:
        return _sumsq(b, b.reduce("ReduceSum", g, list(range(2, b.rank(node.output[0], node))), 0), 2)
    if op == "Gemm" and slot == 1 and not int(attr(node, "transA", 0)) and ws is not None:
        alpha = float(attr(node, "alpha", 1.0))
        norm = b.op("Mul", _sumsq(b, node.input[0], 2), _sumsq(b, g, 2))
        return norm if alpha == 1.0 else b.op("Mul", norm, b.scalar(alpha * alpha, node.output[0]))
    if op == "Gemm" and slot == 2:
        beta = float(attr(node, "beta", 1.0))
        return b.op("Mul", _sumsq(b, g, 2), b.scalar(beta * beta, node.output[0]))
    if op == "Gather" and slot == 0 and int(attr(node, "axis", 0)) == 0:
        return _embedding_norm(b, node, g)
    if op == "MatMul" and slot == 1 and ws is not None and len(ws) == 2 and all(isinstance(d, int) for d in ws):
        return _matmul_norm(b, node.input[0], g, int(ws[0]), int(ws[1]))
    raise UnsupportedError(
        f"expected a MatMul/Gemm/Conv/Gather weight for per-sample norms; {w!r} is input {slot} of {describe(node)}"
    )


def per_sample_sqnorms(model: onnx.ModelProto, loss: str, weights: Sequence[str]) -> onnx.ModelProto:
    """A new model with an output ``<w>_sqnorm`` of shape [N] per weight: ‖∂ℓ_n/∂w‖² for every
    sample n of the batch, where ``loss`` = Σ_n ℓ_n (e.g. SoftmaxCrossEntropyLoss with reduction
    sum). Each weight must be read by exactly one MatMul (right operand), Gemm (B or C), Conv, or
    Gather (axis 0, indices with the batch axis first)."""
    readers = {w: [(node, k) for node in model.graph.node for k, i in enumerate(node.input) if i == w] for w in weights}
    for w, found in readers.items():
        if len(found) != 1:
            raise UnsupportedError(
                f"expected weight {w!r} to be read by one node for per-sample norms; found {len(found)}"
            )
    outputs = list(dict.fromkeys(found[0][0].output[0] for found in readers.values()))
    work, grads, b = gradients(model, loss, outputs)
    for w in weights:
        node, slot = readers[w][0]
        g = grads[node.output[0]]
        if g is None:
            raise UnsupportedError(f"expected the loss to depend on weight {w!r}")
        norm = _weight_norm(b, node, slot, g)
        b.nodes.append(helper.make_node("Cast", [norm], [f"{w}_sqnorm"], to=TensorProto.FLOAT, name=f"{w}_sqnorm"))
        work.graph.output.append(helper.make_tensor_value_info(f"{w}_sqnorm", TensorProto.FLOAT, [None]))
    nodes, inits = prune(b.nodes, b.inits, {o.name for o in work.graph.output})
    work.graph.node.extend(nodes)
    work.graph.initializer.extend(inits)
    return work
