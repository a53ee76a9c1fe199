"""ConvTranspose as zero insertion, padding and a Conv with the flipped kernel.

onnxruntime-training 1.19 builds a ConvTranspose gradient but has no CPU kernel for it
(ConvTransposeGrad: NOT_IMPLEMENTED, measured), so the op is rewritten. Written here because no
library pass does it. For strides s, pads (b, e), dilations d, output_padding o and kernel K:

    y = Conv(pad(insert_zeros(x, s), d·(K−1) − b, d·(K−1) − e + o), W', dilations=d, group=g)

with W'[g·Co/g + j, i, k] = W[g·Ci/g + i, j, K−1−k]. W' holds W's values permuted, so it keeps W's
name when nothing else reads W (its Fisher trace and range are W's). The zero insertion and padding
nodes are marked pass-through, so the quantizable activation stays ``x``.
"""

from __future__ import annotations

import numpy as np

from fitonnx.prepare.rewrites.base import Builder, NoRewrite, rewrite


def _ints(b: Builder, name: str, default: list[int]) -> list[int]:
    value = b.attr(name)
    return [int(v) for v in value] if value is not None else default


def _pads(
    b: Builder, spatial: int, kernel: list[int], strides: list[int], dil: list[int], out_pad: list[int]
) -> list[int]:
    auto = b.attr("auto_pad", "NOTSET")
    output_shape = b.attr("output_shape")
    if auto in ("NOTSET", "VALID") and output_shape is None:
        return _ints(b, "pads", [0] * (2 * spatial)) if auto == "NOTSET" else [0] * (2 * spatial)
    x = b.input(0)
    sizes = [b.static_dim(x, 2 + k, f"auto_pad={auto}/output_shape needs static input sizes") for k in range(spatial)]
    targets = (
        [int(v) for v in output_shape][-spatial:]
        if output_shape is not None
        else [n * s for n, s in zip(sizes, strides, strict=True)]
    )
    begin, end = [], []
    for n, s, o, k, d, t in zip(sizes, strides, out_pad, kernel, dil, targets, strict=True):
        total = s * (n - 1) + o + (k - 1) * d + 1 - t
        if auto == "SAME_UPPER":
            begin.append(total // 2)
            end.append(total - total // 2)
        else:
            begin.append(total - total // 2)
            end.append(total // 2)
    return begin + end


@rewrite("ConvTranspose")
def rewrite_conv_transpose(b: Builder) -> str:
    x, w_name = b.input(0), b.input(1)
    w = b.require_constant(w_name, "ConvTranspose's weight")
    spatial = w.ndim - 2
    if spatial < 1:
        raise NoRewrite(f"expected a weight of rank >= 3; found rank {w.ndim}")
    rank = b.rank()
    if rank != w.ndim:
        raise NoRewrite(f"expected an input of rank {w.ndim}; found rank {rank}")
    group = int(b.attr("group", 1))
    kernel = [int(k) for k in w.shape[2:]]
    strides = _ints(b, "strides", [1] * spatial)
    dil = _ints(b, "dilations", [1] * spatial)
    out_pad = _ints(b, "output_padding", [0] * spatial)
    pads = _pads(b, spatial, kernel, strides, dil, out_pad)

    # W [Ci, Co/g, K...] -> W' [Co, Ci/g, K...], flipped spatially.
    ci, co_g = w.shape[0], w.shape[1]
    if ci % group:
        raise NoRewrite(f"expected input channels divisible by group {group}; found {ci}")
    grouped = w.reshape((group, ci // group, co_g, *w.shape[2:]))
    swapped = np.swapaxes(grouped, 1, 2).reshape((group * co_g, ci // group, *w.shape[2:]))
    flipped = np.ascontiguousarray(swapped[(slice(None), slice(None)) + (slice(None, None, -1),) * spatial])
    if b.ctx.readers.get(w_name, 0) == 1:
        w2 = b.replace_constant(w_name, flipped)
    else:
        w2 = b.const(flipped, "weight", flipped.dtype)
        b.origins.append((w2, (w_name,)))

    z = x
    if any(s > 1 for s in strides):
        # [N, C, D1, D2, ...] -> [N, C, D1, 1, D2, 1, ...] -> pad the 1s to s -> [N, C, D1·s, D2·s, ...]
        inserted = [2 + 2 * k + 1 for k in range(spatial)]
        z = b.passthrough(b.unsqueeze(z, inserted))
        grow = [0] * (rank + spatial) + [0] * (rank + spatial)
        for k, s in enumerate(strides):
            grow[rank + spatial + inserted[k]] = s - 1
        z = b.passthrough(b.op("Pad", [z, b.ints(grow, "zeros")], mode="constant"))
        dims = b.dims(x)
        target = dims[:2] + [b.int_op("Mul", dims[2 + k], s) for k, s in enumerate(strides)]
        z = b.passthrough(b.op("Reshape", [z, b.shape_of(target)]))
    # Pads around the (zero-inserted) input; the s−1 trailing zeros from the insertion count as end padding.
    begin = [d * (k - 1) - p for d, k, p in zip(dil, kernel, pads[:spatial], strict=True)]
    end = [
        d * (k - 1) - p + o - (s - 1)
        for d, k, p, o, s in zip(dil, kernel, pads[spatial:], out_pad, strides, strict=True)
    ]
    if any(v > 0 for v in begin + end):
        grow = [0, 0] + [max(v, 0) for v in begin] + [0, 0] + [max(v, 0) for v in end]
        z = b.passthrough(b.op("Pad", [z, b.ints(grow, "pads")], mode="constant"))
    if any(v < 0 for v in begin + end):
        axes = list(range(2, rank))
        starts = [max(-v, 0) for v in begin]
        ends = [v if v < 0 else np.iinfo(np.int64).max for v in end]
        z = b.passthrough(b.op("Slice", [z, b.ints(starts, "starts"), b.ints(ends, "ends"), b.ints(axes, "axes")]))
    inputs = [z, w2] + ([b.input(2)] if b.input(2) else [])
    b.finish(b.op("Conv", inputs, "conv", dilations=dil, group=group, kernel_shape=kernel, strides=[1] * spatial))
    return "zero insertion + Pad + Conv with the flipped kernel (no CPU kernel for ConvTransposeGrad)"
