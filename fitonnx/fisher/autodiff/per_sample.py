"""Per-sample squared gradient norms from one batched backward pass.

With a loss summed over the batch (ℓ = Σ_n ℓ_n, samples independent), the gradient of a layer's
output is per-sample already, and the weight gradient of sample n is built from that sample's
input and output gradient alone — never from the batch gradient:
- Gemm/MatMul with 2-D input: ∂ℓ_n/∂W = x_n g_nᵀ, so ‖·‖² = ‖x_n‖²·‖g_n‖².
- MatMul on sequences [N, T, K]: ‖X_nᵀ G_n‖², either directly ([N, K, M] per-sample gradients) or
  as the ghost norm Σ_ts (X_n X_nᵀ)_ts (G_n G_nᵀ)_ts when T² < K·M.
- Conv: the batch-1 weight-gradient Conv with one group per sample (and conv group), each
  sample's gradient its own output block; where the input shape is not static, the unfolded input
  U_n (an identity-kernel Conv gives every patch) against G_n, ‖U_n G_nᵀ‖² per group. Biases: the
  output gradient summed over everything but the channel.
- Gather (an embedding table, axis 0, indices [N, T...]): rows t and s of G_n add up where their
  indices are equal, so ‖·‖² = Σ_ts [i_t = i_s]·(G_n G_nᵀ)_ts, with no table-sized tensor.
A weight may reach its reader through ops that only rearrange it (Transpose, Reshape, ...): they
keep the norm. The gradient of any other tensor with the batch axis first (an activation, a graph
input) is per-sample as it is. Every norm is summed in float64: squares in float32 over blocks of
16–32 elements, the block sums in float64 (a float32 sum over a 2.4 M-element per-sample Conv
gradient drifted by 2e-4 from the batch-1 engine's blocked sum).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.errors import UnsupportedError
from fitonnx.fisher.autodiff.builder import Builder, TensorInfo, attr, describe
from fitonnx.fisher.autodiff.engine import gradients, infer_types, prune
from fitonnx.fisher.autodiff.rules_nn import _conv_attrs

MIN_BLOCK, MAX_BLOCK = 16, 32
# Ops that only rearrange a weight: its gradient's norm is the norm of theirs.
REARRANGING = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"})


def _per_sample_numel(shape: Sequence[int | str | None] | None) -> int | None:
    """Elements per sample of a tensor whose axis 0 is the batch, when the rest is static."""
    if shape is None or len(shape) < 1 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    return int(np.prod([int(d) for d in shape[1:]], dtype=np.int64))


def _sumsq(b: Builder, t: str, numel: int | None) -> str:
    """Σ over every axis but the batch axis 0 of t², as float64 [N]: float32 squares summed over
    blocks of k elements (k in 16..32 dividing ``numel``), the block sums summed in float64; the
    whole tensor cast to float64 where no such k exists."""
    k = None if numel is None else next((k for k in range(MAX_BLOCK, MIN_BLOCK - 1, -1) if numel % k == 0), None)
    if k is None:
        flat = b.op("Reshape", b.op("Cast", t, to=TensorProto.DOUBLE), b.ints([0, -1]))
        return b.reduce("ReduceSumSquare", flat, [1], keepdims=0)
    blocks = b.reduce("ReduceSumSquare", b.op("Reshape", t, b.ints([0, -1, k])), [2], keepdims=0)
    return b.reduce("ReduceSum", b.op("Cast", blocks, to=TensorProto.DOUBLE), [1], keepdims=0)


def _sum64(b: Builder, t: str, axes: list[int]) -> str:
    """Σ over ``axes`` of t in float64."""
    return b.reduce("ReduceSum", b.op("Cast", t, to=TensorProto.DOUBLE), axes, keepdims=0)


def _rows(b: Builder, t: str, last: int) -> str:
    """[N, ..., last] → [N, T, last] (T = product of the middle dims, 1 for a 2-D tensor)."""
    return b.op("Reshape", t, b.ints([0, -1, last]))


def _matmul_norm(b: Builder, x: str, g: str, k: int, m: int) -> str:
    """‖X_nᵀ G_n‖² for X [N, ..., K] and G [N, ..., M]: rank-1, ghost or direct."""
    xs = b.static_shape(x)
    if xs is not None and len(xs) == 2:
        return b.op("Mul", _sumsq(b, x, k), _sumsq(b, g, m))
    x3, g3 = _rows(b, x, k), _rows(b, g, m)
    t = None if xs is None else int(np.prod([d if isinstance(d, int) else -1 for d in xs[1:-1]]))
    if t is not None and t > 0 and t * t < k * m:
        gram_x = b.op("MatMul", x3, b.op("Transpose", x3, perm=[0, 2, 1]))
        gram_g = b.op("MatMul", g3, b.op("Transpose", g3, perm=[0, 2, 1]))
        return _sum64(b, b.op("Mul", gram_x, gram_g), [1, 2])
    per_sample = b.op("MatMul", b.op("Transpose", x3, perm=[0, 2, 1]), g3)
    return _sumsq(b, per_sample, k * m)


def _conv_norm(b: Builder, node: onnx.NodeProto, g: str) -> str:
    """Per-sample ‖∂ℓ_n/∂W‖² of a Conv. Ungrouped with static shapes: patch products
    (``_patch_conv_norm``); grouped: the batch-1 weight-gradient Conv (input with batch and channels
    swapped, the output gradient as its kernel, strides and dilations exchanged) with one group per
    sample and conv group, so each sample's gradient is its own output block; a dynamic input
    shape: the unfolded form."""
    x, w = node.input[0], node.input[1]
    ws, xs = b.static_shape(w), b.static_shape(x)
    if ws is None or not all(isinstance(d, int) for d in ws):
        raise UnsupportedError(f"expected a static weight shape at {describe(node)}")
    if xs is None or not all(isinstance(d, int) for d in xs):
        return _unfolded_conv_norm(b, node, g)
    n, cout, cig, kernel = int(xs[0]), int(ws[0]), int(ws[1]), [int(k) for k in ws[2:]]
    group, nsp = int(attr(node, "group", 1)), len(kernel)
    strides, dilations, pads = _conv_attrs(b, node, nsp)
    spatial = [int(d) for d in xs[2:]]
    ys = b.static_shape(node.output[0])
    if group == 1 and ys is not None and all(isinstance(d, int) for d in ys):
        return _patch_conv_norm(b, node, g, [int(d) for d in ys[2:]])
    split = b.op("Reshape", x, b.ints([n, group, cig, *spatial]))
    swapped = b.op("Transpose", split, perm=[2, 0, 1, *range(3, 3 + nsp)])
    inputs = b.op("Reshape", swapped, b.ints([cig, n * group, *spatial]))
    kernels = b.op("Reshape", g, b.op("Concat", b.ints([-1, 1]), b.dims(g, 2), axis=0))
    grads = b.op("Conv", inputs, kernels, strides=dilations, dilations=strides, pads=pads, group=n * group)
    grads = b.op("Slice", grads, b.ints([0] * nsp), b.ints(kernel), b.ints(list(range(2, 2 + nsp))))
    rows = b.op("Reshape", grads, b.ints([cig, n, cout, int(np.prod(kernel))]))
    per_out = b.reduce("ReduceSumSquare", rows, [3], keepdims=0)
    return b.reduce("ReduceSum", b.op("Cast", per_out, to=TensorProto.DOUBLE), [0, 2], keepdims=0)


def _patch_conv_norm(b: Builder, node: onnx.NodeProto, g: str, out_spatial: list[int]) -> str:
    """‖G_n U_nᵀ‖² for an ungrouped Conv: U_n [P, L] the patches of x, from one depthwise Conv
    whose kernel picks each offset of each channel (cost C·K²·L, against C²·K²·L for the
    full identity kernel of ``_unfolded_conv_norm``), then the direct or ghost ``_patch_norm``."""
    ws = b.static_shape(node.input[1])
    assert ws is not None
    positions = int(np.prod(out_spatial))
    u, p = _patches(b, node, [int(d) for d in ws], positions)
    gg = b.op("Reshape", g, b.ints([0, int(ws[0]), positions]))
    return _patch_norm(b, u, gg, p, int(ws[0]), positions)


def _patches(b: Builder, node: onnx.NodeProto, ws: list[int], positions: int) -> tuple[str, int]:
    """U [N, P, L]: the patches of an ungrouped Conv's input x, P = C_in·K rows in the weight's
    (channel, kernel offset) order, from one depthwise Conv whose kernel picks each offset."""
    x, cin, kernel = node.input[0], ws[1], ws[2:]
    k = int(np.prod(kernel))
    strides, dilations, pads = _conv_attrs(b, node, len(kernel))
    p = cin * k
    if k == 1 and not any(pads) and all(s == 1 for s in strides):
        return b.op("Reshape", x, b.ints([0, cin, positions])), p
    eye = np.tile(np.eye(k, dtype=helper.tensor_dtype_to_np_dtype(b.dtype(x))), [cin, 1])
    picks = b.const(eye.reshape([p, 1, *kernel]), "picks")
    patches = b.op("Conv", x, picks, strides=strides, dilations=dilations, pads=pads, group=cin)
    return b.op("Reshape", patches, b.ints([0, p, positions])), p


def _patch_norm(b: Builder, u: str, g: str, p: int, m: int, positions: int) -> str:
    """‖G_n U_nᵀ‖² for U [N, P, L] and G [N, M, L]: ghost Σ (U_nᵀU_n)⊙(G_nᵀG_n) when L² < P·M,
    else the per-sample gradients [N, M, P] themselves."""
    if positions * positions < p * m:
        gram_u = b.op("MatMul", b.op("Transpose", u, perm=[0, 2, 1]), u)
        gram_g = b.op("MatMul", b.op("Transpose", g, perm=[0, 2, 1]), g)
        return _sum64(b, b.op("Mul", gram_u, gram_g), [1, 2])
    return _sumsq(b, b.op("MatMul", g, b.op("Transpose", u, perm=[0, 2, 1])), p * m)


def _unfolded_conv_norm(b: Builder, node: onnx.NodeProto, g: str) -> str:
    """‖U_n G_nᵀ‖² per group, U the identity-kernel Conv (patches) of x (any input shape)."""
    x, w = node.input[0], node.input[1]
    ws = b.static_shape(w)
    assert ws is not None
    cout, cig, kernel = int(ws[0]), int(ws[1]), [int(k) for k in ws[2:]]
    group, nsp, patch = int(attr(node, "group", 1)), len(kernel), cig * int(np.prod(kernel))
    eye = np.eye(patch, dtype=helper.tensor_dtype_to_np_dtype(b.dtype(x))).reshape([patch, cig, *kernel])
    strides, dilations, pads = _conv_attrs(b, node, nsp)
    kw = {"strides": strides, "dilations": dilations, "pads": pads, "group": group}
    patches = b.op("Conv", x, b.const(np.tile(eye, [group] + [1] * (nsp + 1)), "eye"), **kw)
    u = b.op("Reshape", patches, b.ints([0, group, patch, -1]))
    gg = b.op("Reshape", g, b.ints([0, group, cout // group, -1]))
    per_sample = b.op("MatMul", u, b.op("Transpose", gg, perm=[0, 1, 3, 2]))
    return _sumsq(b, per_sample, int(np.prod(ws)))


def _embedding_norm(b: Builder, node: onnx.NodeProto, g: str) -> str:
    """Σ_ts [i_t = i_s]·g_t·g_s per sample for an axis-0 Gather with batched indices."""
    indices = b.op("Reshape", node.input[1], b.ints([0, -1]))
    same = b.op("Equal", b.unsqueeze(indices, [2]), b.unsqueeze(indices, [1]))
    rows = b.op("Reshape", g, b.op("Concat", b.dims(indices, 0, 2), b.ints([-1]), axis=0))
    gram = b.op("MatMul", rows, b.op("Transpose", rows, perm=[0, 2, 1]))
    return _sum64(b, b.op("Mul", gram, b.op("Cast", same, to=b.dtype(node.input[0]))), [1, 2])


def _scaled(b: Builder, norm: str, factor: float) -> str:
    return norm if factor == 1.0 else b.op("Mul", norm, b.const(np.asarray(factor * factor, np.float64), "s"))


def _weight_norm(b: Builder, node: onnx.NodeProto, slot: int, g: str) -> str:
    """The per-sample squared gradient norm [N] (float64) of ``node``'s input ``slot`` (a weight)."""
    op, w = node.op_type, node.input[slot]
    ws = b.static_shape(w)
    numel_g = _per_sample_numel(b.static_shape(node.output[0]))
    if op == "Conv" and slot == 1:
        return _conv_norm(b, node, g)
    if op == "Conv" and slot == 2:
        per_channel = b.reduce("ReduceSum", g, list(range(2, b.rank(node.output[0], node))), 0)
        return _sumsq(b, per_channel, None if ws is None else _per_sample_numel((0, *ws)))
    if op == "Gemm" and slot == 1 and not int(attr(node, "transA", 0)) and ws is not None:
        x_numel = _per_sample_numel(b.static_shape(node.input[0]))
        return _scaled(
            b, b.op("Mul", _sumsq(b, node.input[0], x_numel), _sumsq(b, g, numel_g)), attr(node, "alpha", 1.0)
        )
    if op == "Gemm" and slot == 2:
        return _scaled(b, _sumsq(b, g, numel_g), float(attr(node, "beta", 1.0)))
    if op == "Gather" and slot == 0 and int(attr(node, "axis", 0)) == 0:
        return _embedding_norm(b, node, g)
    if op == "MatMul" and slot == 1 and ws is not None and len(ws) == 2 and all(isinstance(d, int) for d in ws):
        return _matmul_norm(b, node.input[0], g, int(ws[0]), int(ws[1]))
    raise UnsupportedError(
        f"expected a MatMul/Gemm/Conv/Gather weight for per-sample norms; {w!r} is input {slot} of {describe(node)}"
    )


def _conv_grad(b: Builder, node: onnx.NodeProto, g: str) -> str:
    """Per-sample gradients [N, *W] of an ungrouped Conv's weight with static shapes: G_n U_nᵀ, U_n
    the patches of ``_patches``."""
    x, w = node.input[0], node.input[1]
    ws, xs, ys = b.static_shape(w), b.static_shape(x), b.static_shape(node.output[0])
    static = all(s is not None and all(isinstance(d, int) for d in s) for s in (ws, xs, ys))
    if not static or int(attr(node, "group", 1)) != 1:
        raise UnsupportedError(
            f"expected an ungrouped Conv with static shapes for per-sample gradients at {describe(node)}"
        )
    assert ws is not None and ys is not None
    shape = [int(d) for d in ws]
    positions = int(np.prod([int(d) for d in ys[2:]]))
    u, _ = _patches(b, node, shape, positions)
    gg = b.op("Reshape", g, b.ints([0, shape[0], positions]))
    return b.op("Reshape", b.op("MatMul", gg, b.op("Transpose", u, perm=[0, 2, 1])), b.ints([0, *shape]))


def _scale(b: Builder, t: str, factor: float) -> str:
    return t if factor == 1.0 else b.op("Mul", t, b.const(np.asarray(factor, np.float32), "f"))


def _weight_grad(b: Builder, node: onnx.NodeProto, slot: int, g: str) -> str:
    """The per-sample gradients [N, *W] (float32, the weight's own layout) of ``node``'s input
    ``slot``, a weight it reads directly: an ungrouped static Conv's kernel or bias, a Gemm's B
    (transA 0, 2-D input) or C of [M] or [1, M], a MatMul's 2-D right operand. Others are refused."""
    op, ws = node.op_type, b.static_shape(node.input[slot])
    if ws is None or not all(isinstance(d, int) for d in ws):
        raise UnsupportedError(f"expected a static weight shape for per-sample gradients at {describe(node)}")
    if op == "Conv" and slot == 1:
        return _conv_grad(b, node, g)
    if op == "Conv" and slot == 2:
        return b.reduce("ReduceSum", g, list(range(2, b.rank(node.output[0], node))), 0)
    xs = b.static_shape(node.input[0])
    if op == "Gemm" and slot == 1 and not int(attr(node, "transA", 0)) and xs is not None and len(xs) == 2:
        a = node.input[0]
        if int(attr(node, "transB", 0)):  # B [M, K]: g_n a_nᵀ
            outer = b.op("Mul", b.unsqueeze(g, [2]), b.unsqueeze(a, [1]))
        else:  # B [K, M]: a_n g_nᵀ
            outer = b.op("Mul", b.unsqueeze(a, [2]), b.unsqueeze(g, [1]))
        return _scale(b, outer, float(attr(node, "alpha", 1.0)))
    if op == "Gemm" and slot == 2 and len(ws) in (1, 2) and (len(ws) == 1 or ws[0] == 1):
        return b.op("Reshape", _scale(b, g, float(attr(node, "beta", 1.0))), b.ints([0, *[int(d) for d in ws]]))
    if op == "MatMul" and slot == 1 and len(ws) == 2:
        x3, g3 = _rows(b, node.input[0], int(ws[0])), _rows(b, g, int(ws[1]))
        return b.op("MatMul", b.op("Transpose", x3, perm=[0, 2, 1]), g3)
    raise UnsupportedError(f"expected a Conv/Gemm/MatMul weight for per-sample gradients at {describe(node)}")


def sample_grad_problem(model: onnx.ModelProto, weights: Sequence[str]) -> str | None:
    """Why ``_weight_grad`` cannot form the per-sample gradients of one of ``weights`` (from the ops
    alone, before a batched model is built), or None."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, k))
    for w in weights:
        found = readers.get(w, [])
        node, slot = found[0] if len(found) == 1 else (None, 0)
        op = node.op_type if node is not None else ""
        ok = node is not None and (
            (op == "Conv" and (slot == 2 or (slot == 1 and int(attr(node, "group", 1)) == 1)))
            or (op == "Gemm" and slot in (1, 2) and not int(attr(node, "transA", 0)))
            or (op == "MatMul" and slot == 1)
        )
        if not ok:
            where = f"input {slot} of {describe(node)}" if node is not None else f"read by {len(found)} nodes"
            return f"the per-sample gradients of weight {w!r} ({where}) are not formed in a batch"
    return None


def _reader(readers: dict[str, list[tuple[onnx.NodeProto, int]]], w: str) -> tuple[onnx.NodeProto, int]:
    """The node and input slot that uses weight ``w``, looking through ops that only rearrange it."""
    name = w
    for _ in range(16):
        found = readers.get(name, [])
        if len(found) != 1:
            raise UnsupportedError(
                f"expected weight {w!r} to be read by one node for per-sample norms; found {len(found)}"
            )
        node, slot = found[0]
        if node.op_type not in REARRANGING or slot != 0:
            return node, slot
        name = node.output[0]
    raise UnsupportedError(f"expected weight {w!r} to reach a MatMul/Gemm/Conv/Gather within 16 nodes")


BROADCASTING = frozenset({"Add", "Sub", "Mul"})


def _broadcast_only(
    model: onnx.ModelProto, out: str, rank: int, batch: int, types: dict[str, TensorInfo]
) -> str | None:
    """None if every reader of ``out`` is an Add/Sub/Mul with a per-sample tensor [batch, ...] of
    ``rank`` dims (so ``out`` expanded to the batch gives the same values); else what reads it."""
    for node in model.graph.node:
        if out not in node.input:
            continue
        others = [types.get(i) for i in node.input if i != out]
        ok = node.op_type in BROADCASTING and len(others) == 1 and others[0] is not None
        shape = others[0].shape if ok and others[0] is not None else None
        if not (shape and len(shape) == rank and shape[0] == batch):
            return describe(node)
    return None


def _per_sample_readers(model: onnx.ModelProto, slots: dict[str, int], batch: int) -> onnx.ModelProto:
    """A copy of ``model`` in which each weight reader (by output name, with the weight's slot) whose
    output is the same for every sample (a batch axis of 1 or none: position embeddings), broadcast
    into per-sample tensors by Add/Sub/Mul, reads its other inputs expanded to ``batch``: the same
    values, and an output gradient per sample. Any other output without the batch axis first is refused."""
    types = infer_types(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for node in work.graph.node:
        out = node.output[0] if node.output else ""
        shape = types[out].shape if out in types else None
        if out in slots and (not shape or shape[0] != batch):
            lacking = shape is not None and (node.op_type, slots[out]) in (("Gather", 0), ("MatMul", 1))
            new_axis = 0 if shape and shape[0] == 1 else 1 if lacking else None
            reader = None if new_axis is None else _broadcast_only(work, out, len(shape or ()) + new_axis, batch, types)
            if new_axis is None or reader is not None:
                raise UnsupportedError(
                    f"expected the output of {describe(node)} to have the batch axis first"
                    + (f" or to be broadcast into one; it is read by {reader}" if reader else f"; found shape {shape}")
                )
            for k, name in enumerate(node.input):
                info = types.get(name)
                if k == slots[out] or info is None or not info.shape or (new_axis == 0 and info.shape[0] != 1):
                    continue
                target = f"{name}__per_sample_{out}"
                dims = np.asarray([batch] + [1] * (len(info.shape) - 1 + new_axis), np.int64)
                work.graph.initializer.append(numpy_helper.from_array(dims, target + "_dims"))
                nodes.append(helper.make_node("Expand", [name, target + "_dims"], [target], name=target))
                node.input[k] = target
        nodes.append(node)
    del work.graph.node[:]
    work.graph.node.extend(nodes)
    return work


def weight_readers(
    model: onnx.ModelProto, weights: Sequence[str], batch: int | None
) -> tuple[dict[str, tuple[onnx.NodeProto, int]], list[str]]:
    """The reader (node, slot) of each weight, and at batch 1 the weights read by several nodes
    (tied embeddings), whose whole gradient is then the sample's: their norms do not add."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, k))
    used, whole = {}, []
    for w in weights:
        if batch == 1 and len(readers.get(w, [])) > 1:
            whole.append(w)
        else:
            used[w] = _reader(readers, w)
    return used, whole


def sample_grad_name(name: str) -> str:
    """The output of ``per_sample_sqnorms`` holding the per-sample gradients [N, ...] of ``name``."""
    return f"{name}_sample_grad"


def per_sample_sqnorms(
    model: onnx.ModelProto,
    loss: str,
    weights: Sequence[str],
    inputs: Sequence[str] = (),
    batch: int | None = None,
    sample_grads: Sequence[str] = (),
) -> onnx.ModelProto:
    """A new model with a float64 output ``<name>_sqnorm`` of shape [N] per weight and per name in
    ``inputs``: ‖∂ℓ_n/∂name‖² for every sample n of the batch, where ``loss`` = Σ_n ℓ_n (e.g.
    SoftmaxCrossEntropyLoss with reduction sum). Each weight must be read (through rearranging ops
    only) by exactly one MatMul (right operand), Gemm (B or C), Conv, or Gather (axis 0, indices
    with the batch axis first); each of ``inputs`` must have the batch axis first. With ``batch``
    (the static batch size), a reader whose output has a batch axis of 1 gets its other inputs
    expanded to the batch, and one with another first axis is refused; at ``batch`` 1 a weight read
    by several nodes is differentiated as it is (its gradient is the one sample's).

    ``sample_grads`` (weights read directly by their reader, and names in ``inputs``) also get an
    output ``sample_grad_name`` with the per-sample gradients themselves (``_weight_grad``)."""
    used, whole = weight_readers(model, weights, batch)
    if batch is not None and batch > 1:
        model = _per_sample_readers(model, {node.output[0]: slot for node, slot in used.values()}, batch)
        used, whole = weight_readers(model, weights, batch)
    outputs = list(dict.fromkeys(node.output[0] for node, _ in used.values()))
    work, grads, b = gradients(model, loss, [*outputs, *inputs, *whole])
    for name in [*weights, *inputs]:
        node, slot = used.get(name, (None, 0))
        g = grads[node.output[0]] if node is not None else grads[name]
        if g is None:
            raise UnsupportedError(f"expected the loss to depend on {name!r}")
        grad = None
        if name in sample_grads:
            if node is not None and node.input[slot] != name:
                raise UnsupportedError(f"expected weight {name!r} to be read directly for per-sample gradients")
            grad = _weight_grad(b, node, slot, g) if node is not None else g
            b.nodes.append(helper.make_node("Identity", [grad], [sample_grad_name(name)]))
            work.graph.output.append(helper.make_empty_tensor_value_info(sample_grad_name(name)))
        if node is not None and grad is not None:  # the norm of the gradients at hand (no second pass)
            norm = _sumsq(b, grad, int(np.prod([int(d) for d in b.static_shape(name) or ()])))
        elif node is not None:
            norm = _weight_norm(b, node, slot, g)
        elif name in whole:  # batch 1: the weight's own gradient is the sample's
            norm = _sumsq(b, b.unsqueeze(g, [0]), int(np.prod(b.static_shape(name) or [0])) or None)
        else:
            norm = _sumsq(b, g, _per_sample_numel(b.static_shape(name)))
        b.nodes.append(helper.make_node("Identity", [norm], [f"{name}_sqnorm"], name=f"{name}_sqnorm"))
        work.graph.output.append(helper.make_tensor_value_info(f"{name}_sqnorm", TensorProto.DOUBLE, [None]))
    nodes, inits = prune(b.nodes, b.inits, {o.name for o in work.graph.output})
    work.graph.node.extend(nodes)
    work.graph.initializer.extend(inits)
    return work
