"""VJP rules of the layer ops: MatMul, Gemm, Conv, pooling, LayerNormalization, the loss op."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from fitonnx.errors import UnsupportedError
from fitonnx.fisher.autodiff.builder import Builder, attr, describe
from fitonnx.fisher.autodiff.registry import Grads, rule


def _batch(ys: tuple[int | str | None, ...] | None, ra: int, rc: int) -> tuple[int | str | None, ...] | None:
    """The broadcast batch dims of a MatMul output of static shape ``ys``."""
    if ys is None:
        return None
    return ys[: len(ys) - (2 if ra >= 2 and rc >= 2 else 1 if max(ra, rc) >= 2 else 0)]


@rule("MatMul")
def matmul(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """1-D operands become matrices ([1, k] and [k, 1]); batch dims broadcast as in numpy."""
    a, c = node.input
    if b.static_shape(c) is not None and len(b.static_shape(c) or ()) == 2 and _rank_or_none(b, a) != 1:
        return _matmul_by_matrix(b, node, g)
    ra, rc = _rank_or_none(b, a), _rank_or_none(b, c)  # None: unknown, taken as ≥ 2
    g1 = b.unsqueeze(g[0], [-1]) if rc == 1 else g[0]
    g1 = b.unsqueeze(g1, [-2]) if ra == 1 else g1
    a2 = b.unsqueeze(a, [0]) if ra == 1 else a
    c2 = b.unsqueeze(c, [-1]) if rc == 1 else c
    batch = None if ra is None or rc is None else _batch(b.static_shape(node.output[0]), ra, rc)
    da = b.op("MatMul", g1, b.transpose_last2(c2, None if rc is None else max(rc, 2)))
    da = b.squeeze(da, [-2]) if ra == 1 else da
    dc = b.op("MatMul", b.transpose_last2(a2, None if ra is None else max(ra, 2)), g1)
    dc = b.squeeze(dc, [-1]) if rc == 1 else dc
    return [_unbatch(b, da, a, batch, min(ra or 2, 2)), _unbatch(b, dc, c, batch, min(rc or 2, 2))]


def _rank_or_none(b: Builder, x: str) -> int | None:
    shape = b.static_shape(x)
    return None if shape is None else len(shape)


def _matmul_by_matrix(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """A [..., K] @ W [K, M] (A of rank ≥ 2, or unknown rank taken as ≥ 2): dA = G·Wᵀ and
    dW = Aᵀ·G with A and G flattened to rows, each one Gemm over every batch and sequence position."""
    a, c = node.input
    k = b.op("Gather", b.shape(c), b.ints([0]))
    m = b.op("Gather", b.shape(c), b.ints([1]))
    rows_a = b.op("Reshape", a, b.op("Concat", b.ints([-1]), k, axis=0))
    rows_g = b.op("Reshape", g[0], b.op("Concat", b.ints([-1]), m, axis=0))
    # dA as a Gemm reading W transposed in place: a MatMul with Transpose(W) would have
    # onnxruntime fold the transpose into a copy of every weight when the session starts.
    da = b.op("Reshape", b.op("Gemm", rows_g, c, transB=1), b.shape(a))
    return [da, b.op("Gemm", rows_a, rows_g, transA=1)]


def _unbatch(b: Builder, grad: str, x: str, batch: tuple[int | str | None, ...] | None, core: int) -> str:
    xs = b.static_shape(x)
    shape = None if batch is None or xs is None else batch + xs[len(xs) - core :]
    return b.unbroadcast(grad, x, shape)


@rule("Gemm")
def gemm(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """Y = α·op(A)·op(B) + β·C: each gradient is itself one Gemm."""
    a, c = node.input[0], node.input[1]
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    if ta:
        da = b.op("Gemm", c, g[0], alpha=alpha, transA=tb, transB=1)
    else:
        da = b.op("Gemm", g[0], c, alpha=alpha, transB=1 - tb)
    if tb:
        dc = b.op("Gemm", g[0], a, alpha=alpha, transA=1, transB=ta)
    else:
        dc = b.op("Gemm", a, g[0], alpha=alpha, transA=1 - ta)
    grads: Grads = [da, dc]
    if len(node.input) > 2 and node.input[2]:
        scaled = g[0] if beta == 1.0 else b.op("Mul", g[0], b.scalar(beta, node.output[0]))
        grads.append(b.unbroadcast(scaled, node.input[2], node.output[0]))
    return grads


def _conv_attrs(b: Builder, node: onnx.NodeProto, nsp: int) -> tuple[list[int], list[int], list[int]]:
    """(strides, dilations, pads) with their defaults; auto_pad other than NOTSET/VALID is refused."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedError(f"expected explicit pads for {describe(node)}; found auto_pad={auto_pad}")
    strides = list(attr(node, "strides", [1] * nsp))
    dilations = list(attr(node, "dilations", [1] * nsp))
    pads = list(attr(node, "pads", [0] * 2 * nsp)) if auto_pad == "NOTSET" else [0] * 2 * nsp
    return strides, dilations, pads


def _crop_to_input(b: Builder, full: str, x: str, pads: list[int], nsp: int) -> str:
    """``full`` (a transposed conv's output from the first padded position) padded at the end to
    the padded extent of x's spatial dims, then cropped to x (stride remainders get zeros)."""
    spatial = b.dims(x, 2)
    begin, end = b.ints(pads[:nsp]), b.ints(pads[nsp:])
    extra = b.op("Sub", b.op("Add", b.op("Add", spatial, begin), end), b.dims(full, 2))
    padded = b.op("Pad", full, b.op("Concat", b.ints([0] * (4 + nsp)), extra, axis=0))
    axes = b.ints(list(range(2, 2 + nsp)))
    return b.op("Slice", padded, begin, b.op("Add", begin, spatial), axes)


def conv_input_grad(b: Builder, g: str, w: str, x: str, node: onnx.NodeProto, nsp: int, group: int) -> str:
    """dL/dx of Conv(x, w) (or of a pool over [N·C, 1, ...]): a ConvTranspose of the output
    gradient, sized back to x; by its pads and output_padding where the spatial sizes are static."""
    strides, dilations, pads = _conv_attrs(b, node, nsp)
    kw = {"strides": strides, "dilations": dilations, "group": group}
    sizes = _static_spatial(b, x, nsp), _static_spatial(b, node.output[0], nsp)
    kernel = _static_spatial(b, w, nsp)
    flipped = _flipped_conv_input_grad(b, g, w, nsp, group, (strides, dilations, pads))
    if flipped is not None:
        return flipped
    if sizes[0] is not None and sizes[1] is not None and kernel is not None:
        extent = [
            s * (o - 1) + (k - 1) * d + 1 for s, o, k, d in zip(strides, sizes[1], kernel, dilations, strict=True)
        ]
        rest = [h + pads[i] + pads[nsp + i] - e for i, (h, e) in enumerate(zip(sizes[0], extent, strict=True))]
        if all(0 <= r < max(s, d) for r, s, d in zip(rest, strides, dilations, strict=True)):
            return b.op("ConvTranspose", g, w, pads=pads, output_padding=rest, **kw)
    return _crop_to_input(b, b.op("ConvTranspose", g, w, **kw), x, pads, nsp)


def _flipped_conv_input_grad(
    b: Builder, g: str, w: str, nsp: int, group: int, conv: tuple[list[int], list[int], list[int]]
) -> str | None:
    """dL/dx of a stride-1 Conv as a Conv of g with the weight transposed per group and flipped,
    padded by (k-1)·d - p on each side (onnxruntime's Conv kernels are much faster than its
    ConvTranspose); None where that form does not apply (strides, pads beyond the kernel)."""
    strides, dilations, pads = conv
    ws = b.static_shape(w)
    if ws is None or not all(isinstance(d, int) for d in ws) or any(s != 1 for s in strides):
        return None
    kernel = [int(k) for k in ws[2:]]
    reach = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
    new_pads = [r - p for r, p in zip(reach * 2, pads, strict=True)]
    if any(p < 0 for p in new_pads):
        return None
    out_g, cig = int(ws[0]) // group, int(ws[1])
    split = b.op("Reshape", w, b.ints([group, out_g, cig, *kernel]))
    swapped = b.op("Transpose", split, perm=[0, 2, 1, *range(3, 3 + nsp)])
    merged = b.op("Reshape", swapped, b.ints([group * cig, out_g, *kernel]))
    big = np.iinfo(np.int64).max
    axes = list(range(2, 2 + nsp))
    flipped = b.op("Slice", merged, b.ints([-1] * nsp), b.ints([-big] * nsp), b.ints(axes), b.ints([-1] * nsp))
    return b.op("Conv", g, flipped, dilations=dilations, pads=new_pads, group=group)


def _static_spatial(b: Builder, t: str, nsp: int) -> list[int] | None:
    shape = b.static_shape(t)
    if shape is None or len(shape) != nsp + 2 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return [int(d) for d in shape[2:]]


def _channels_to_groups(b: Builder, t: str, group: int, perm: list[int], nsp: int) -> str:
    """[N, G·c, S...] split into [N, G, c, S...], transposed by ``perm`` and merged back to rank
    2 + nsp: perm [2, 1, 0] gives [c, G·N, S...], perm [1, 2, 0] gives [G·c, N, S...]."""
    if group == 1:
        return b.op("Transpose", t, perm=[1, 0, *range(2, 2 + nsp)])
    split = b.op("Reshape", t, b.op("Concat", b.dims(t, 0, 1), b.ints([group, -1]), b.dims(t, 2), axis=0))
    moved = b.op("Transpose", split, perm=perm + list(range(3, 3 + nsp)))
    merged = b.ints([0, -1]) if perm[0] == 2 else b.ints([-1])
    return b.op("Reshape", moved, b.op("Concat", merged, b.dims(moved, 3 if perm[0] == 2 else 2), axis=0))


def conv_weight_grad(b: Builder, g: str, x: str, node: onnx.NodeProto, nsp: int, group: int, kernel: list[int]) -> str:
    """dL/dw: a Conv of x (batch and channels swapped, [C_in/G, G·N, S...]) with the output
    gradient as weights ([G·C_out/G, N, O...]), strides and dilations exchanged, group G."""
    strides, dilations, pads = _conv_attrs(b, node, nsp)
    xs = _channels_to_groups(b, x, group, [2, 1, 0], nsp)
    gs = _channels_to_groups(b, g, group, [1, 2, 0], nsp)
    out = b.op("Conv", xs, gs, strides=dilations, dilations=strides, pads=pads, group=group)
    axes = list(range(2, 2 + nsp))
    out = b.op("Slice", out, b.ints([0] * nsp), b.ints(kernel), b.ints(axes))
    return b.op("Transpose", out, perm=[1, 0, *axes])


@rule("Conv")
def conv(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x, w = node.input[0], node.input[1]
    nsp = b.rank(w, node) - 2
    group = int(attr(node, "group", 1))
    ws = b.static_shape(w)
    kernel = list(attr(node, "kernel_shape", ws[2:] if ws else []))
    if len(kernel) != nsp or not all(isinstance(k, int) for k in kernel):
        raise UnsupportedError(f"expected a static kernel shape at {describe(node)}")
    grads: Grads = [
        conv_input_grad(b, g[0], w, x, node, nsp, group) if b.needs(x) else None,
        conv_weight_grad(b, g[0], x, node, nsp, group, kernel) if b.needs(w) else None,
    ]
    if len(node.input) > 2 and node.input[2]:
        grads.append(b.reduce("ReduceSum", g[0], [0, *range(2, 2 + nsp)], keepdims=0))
    return grads


@rule("MaxPool")
def max_pool(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """The gradient goes to the element each window took (MaxPool's flat Indices output; one
    element per window on ties), summed where windows overlap."""
    if int(attr(node, "storage_order", 0)) != 0:
        raise UnsupportedError(f"expected storage_order 0 at {describe(node)}")
    x = node.input[0]
    if len(node.output) < 2 or not node.output[1]:
        # The forward node (of the engine's own copy of the model) also gives its Indices, so
        # the pooling does not run twice.
        del node.output[1:]
        node.output.append(b.fresh("maxpool_indices"))
    return [b.scatter_add(x, node.output[1], g[0])]


def _window_counts(b: Builder, node: onnx.NodeProto, nsp: int, kernel: list[int], ones_kernel: str) -> str:
    """[1, 1, O...]: the divisor of each AveragePool window (real elements, or real and padding
    elements with count_include_pad), counted by a Conv of ones; end room for ceil_mode windows."""
    strides, dilations, pads = _conv_attrs(b, node, nsp)
    x, y = node.input[0], node.output[0]
    ones = b.filled(b.op("Concat", b.ints([1, 1]), b.dims(x, 2), axis=0), 1.0, x)
    conv_pads = pads
    if int(attr(node, "count_include_pad", 0)):
        pad_ones = b.ints([0, 0, *pads[:nsp], 0, 0, *pads[nsp:]])
        ones = b.op("Pad", ones, pad_ones, b.scalar(1.0, x))
        conv_pads = [0] * 2 * nsp
    room = [(k - 1) * d + s for k, d, s in zip(kernel, dilations, strides, strict=True)]
    ones = b.op("Pad", ones, b.ints([0] * (2 + nsp) + [0, 0, *room]))
    counts = b.op("Conv", ones, ones_kernel, strides=strides, dilations=dilations, pads=conv_pads)
    axes = b.ints(list(range(2, 2 + nsp)))
    return b.op("Slice", counts, b.ints([0] * nsp), b.dims(y, 2), axes)


@rule("AveragePool")
def average_pool(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """Each window spreads its gradient / divisor over its elements: a ConvTranspose with a ones
    kernel on [N·C, 1, O...]."""
    x, y = node.input[0], node.output[0]
    kernel = [int(k) for k in attr(node, "kernel_shape")]
    nsp = len(kernel)
    dtype = helper.tensor_dtype_to_np_dtype(b.dtype(x))
    ones_kernel = b.const(np.ones([1, 1, *kernel], dtype), "ones_kernel")
    scaled = b.op("Div", g[0], _window_counts(b, node, nsp, kernel, ones_kernel))
    planes = b.op("Reshape", scaled, b.op("Concat", b.ints([-1, 1]), b.dims(y, 2), axis=0))
    dx = conv_input_grad(b, planes, ones_kernel, x, node, nsp, 1)
    return [b.reshape_like(dx, x)]


@rule("GlobalAveragePool")
def global_average_pool(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    x, y = node.input[0], node.output[0]
    return [b.op("Div", b.op("Expand", g[0], b.shape(x)), b.count_ratio(x, y, x))]


@rule("BatchNormalization")
def batch_norm(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """Inference form y = (x − μ)·s·r + B with r = 1/√(σ² + ε) per channel (axis 1)."""
    if int(attr(node, "training_mode", 0)) or any(gi is not None for gi in g[1:]):
        raise UnsupportedError(f"expected an inference-mode BatchNormalization at {describe(node)}")
    x, scale, _, mu, var = node.input[:5]
    rank = b.rank(x, node)
    axes = [0, *range(2, rank)]
    per_channel = lambda t: b.unsqueeze(t, axes)  # noqa: E731  [C] → [1, C, 1, ...]
    total = lambda t: b.reduce("ReduceSum", t, axes, keepdims=0)  # noqa: E731
    r = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.scalar(float(attr(node, "epsilon", 1e-5)), x))))
    sr = b.op("Mul", scale, r)
    centered = b.op("Sub", x, per_channel(mu))
    d_scale = total(b.op("Mul", b.op("Mul", g[0], centered), per_channel(r)))
    d_var = b.op("Mul", b.op("Mul", d_scale, scale), b.op("Mul", b.scalar(-0.5, x), b.op("Mul", r, r)))
    d_bias = total(g[0])
    return [b.op("Mul", g[0], per_channel(sr)), d_scale, d_bias, b.op("Neg", b.op("Mul", d_bias, sr)), d_var]


@rule("LayerNormalization")
def layer_norm(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """x̂ = (x − μ)·r with r = 1/√(σ² + ε) over axes [axis, rank): dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))."""
    if any(gi is not None for gi in g[1:]):
        raise UnsupportedError(f"expected only output 0 of {describe(node)} to reach the loss")
    x, scale = node.input[0], node.input[1]
    axis = int(attr(node, "axis", -1))
    axes = list(range(axis, 0)) if axis < 0 else list(range(axis, b.rank(x, node)))
    mean = lambda t: b.reduce("ReduceMean", t, axes, keepdims=1)  # noqa: E731
    centered = b.op("Sub", x, mean(x))
    var = mean(b.op("Mul", centered, centered))
    r = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.scalar(float(attr(node, "epsilon", 1e-5)), x))))
    xhat = b.op("Mul", centered, r)
    y = node.output[0]
    d_hat = b.op("Mul", g[0], scale)
    inner = b.op("Sub", b.op("Sub", d_hat, mean(d_hat)), b.op("Mul", xhat, mean(b.op("Mul", d_hat, xhat))))
    grads: Grads = [b.op("Mul", r, inner), b.unbroadcast(b.op("Mul", g[0], xhat), scale, y)]
    if len(node.input) > 2 and node.input[2]:
        grads.append(b.unbroadcast(g[0], node.input[2], y))
    return grads


@rule("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy(b: Builder, node: onnx.NodeProto, g: Grads) -> Grads:
    """d scores = (softmax − onehot(label))·w_label·g per element (÷ Σw for mean), plus the
    LogSoftmax gradient of the log_prob output where that is used."""
    scores = node.input[0]
    log_prob = node.output[1] if len(node.output) > 1 and node.output[1] else b.op("LogSoftmax", scores, axis=1)
    p = b.op("Exp", log_prob)
    parts = []
    if g[0] is not None:
        parts.append(b.op("Mul", b.op("Sub", p, _one_hot(b, node, scores)), _loss_coefficient(b, node, g[0])))
    if len(g) > 1 and g[1] is not None:
        total = b.reduce("ReduceSum", g[1], [1], keepdims=1)
        parts.append(b.op("Sub", g[1], b.op("Mul", p, total)))
    return [parts[0] if len(parts) == 1 else b.op("Add", *parts), None, None]


def _safe_labels(b: Builder, node: onnx.NodeProto) -> tuple[str, str | None]:
    """Labels with ignored ones replaced by 0, and the keep mask (None without ignore_index)."""
    labels = node.input[1]
    ignore = attr(node, "ignore_index")
    if ignore is None:
        return labels, None
    dtype = helper.tensor_dtype_to_np_dtype(b.dtype(labels))
    keep = b.op("Not", b.op("Equal", labels, b.const(np.asarray(ignore, dtype))))
    return b.op("Where", keep, labels, b.const(np.asarray(0, dtype))), keep


def _one_hot(b: Builder, node: onnx.NodeProto, like: str) -> str:
    labels, _ = _safe_labels(b, node)
    depth = b.op("Gather", b.shape(node.input[0]), b.ints([1]))
    return b.one_hot(labels, depth, like, axis=1)


def _loss_coefficient(b: Builder, node: onnx.NodeProto, g: str) -> str:
    """The factor of (softmax − onehot): per element [N, 1, d...], or a scalar when uniform."""
    scores = node.input[0]
    labels, keep = _safe_labels(b, node)
    weights = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w = b.op("Gather", weights, labels) if weights else None
    if keep is not None:
        kept = b.op("Cast", keep, to=b.dtype(scores))
        w = kept if w is None else b.op("Mul", w, kept)
    reduction = attr(node, "reduction", "mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    coef = g
    if reduction == "mean":
        denom = b.op("Cast", b.size(labels), to=b.dtype(scores)) if w is None else b.reduce("ReduceSum", w, None, 0)
        coef = b.op("Div", g, denom)
    if w is not None:
        coef = b.op("Mul", coef, w)
    return b.unsqueeze(coef, [1]) if w is not None or reduction == "none" else coef
