"""Resize as one MatMul per resized axis with its interpolation matrix.

onnxruntime-training 1.19 builds a Resize gradient but has no CPU kernel for it (ResizeGrad:
NOT_IMPLEMENTED in every mode, measured), so the op is rewritten. Nearest, linear and cubic
resizing are separable: along each resized axis the output is M·x for a fixed [out, in] matrix.
Rather than re-deriving ONNX's coordinate-transformation and rounding rules, M is measured by
running onnxruntime's own Resize, with the node's attributes, on an identity basis; the rewrite
then matches the original kernel exactly (up to summation order). Needs static sizes on the
resized axes and constant scales/sizes.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from fitonnx.model.runtime import make_session
from fitonnx.prepare.rewrites.base import Builder, NoRewrite, rewrite


def _targets(b: Builder, sizes_in: list[int | None]) -> tuple[list[float] | None, list[int]]:
    """(per-axis scales as given or None, per-axis output sizes) for every axis of the input."""
    rank = len(sizes_in)
    axes = b.attr("axes")
    axes = [int(a) % rank for a in axes] if axes is not None else list(range(rank))
    scales_in = b.constant_value(b.input(2)) if b.input(2) else None
    sizes_given = b.constant_value(b.input(3)) if b.input(3) else None
    if (b.input(3) and sizes_given is None) or (b.input(2) and scales_in is None and not b.input(3)):
        # Computed at run time (from Shape ops): shape inference may still know the output size.
        inferred = b.ctx.types.get(b.output(0))
        if inferred is None or inferred.static_shape is None or any(n is None for n in sizes_in):
            raise NoRewrite("expected constant scales or sizes, or static input and output sizes")
        return None, list(inferred.static_shape)
    if scales_in is not None and scales_in.size:
        scales = [1.0] * rank
        for a, s in zip(axes, scales_in.tolist(), strict=True):
            scales[a] = float(s)
        out = []
        for k, (n, s) in enumerate(zip(sizes_in, scales, strict=True)):
            if s != 1.0 and n is None:
                raise NoRewrite(f"expected a static size of axis {k} to resize it; found a symbolic one")
            out.append(int(np.floor(n * s)) if s != 1.0 else (n if n is not None else -1))  # type: ignore[operator]
        return scales, out
    if sizes_given is None:
        raise NoRewrite("expected scales or sizes; found neither")
    if b.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NoRewrite("expected keep_aspect_ratio_policy 'stretch'")
    out = [n if n is not None else -1 for n in sizes_in]
    for a, s in zip(axes, sizes_given.tolist(), strict=True):
        if sizes_in[a] is None:
            raise NoRewrite(f"expected a static size of axis {a} to resize it; found a symbolic one")
        out[a] = int(s)
    return None, out


def _matrix(b: Builder, n_in: int, n_out: int, scale: float | None) -> np.ndarray:
    """The [n_out, n_in] matrix of this Resize along one axis, measured on an identity basis."""
    attrs = {
        a.name: helper.get_attribute_value(a)
        for a in b.node.attribute
        if a.name not in ("axes", "keep_aspect_ratio_policy")
    }
    basis = np.eye(n_in, dtype=np.float32).reshape(n_in, 1, n_in, 1)
    inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array([1, 1, scale, 1], np.float32), "scales"))
        inputs = ["x", "roi", "scales"]
    else:
        inits.append(numpy_helper.from_array(np.array([n_in, 1, n_out, 1], np.int64), "sizes"))
        inputs = ["x", "roi", "", "sizes"]
    graph = helper.make_graph(
        [helper.make_node("Resize", inputs, ["y"], **attrs)],
        "basis",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(basis.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(b.ctx.opset, 13))], ir_version=8)
    try:
        session = make_session(model.SerializeToString())
        y = session.run(["y"], {"x": basis})[0]
    except Exception as exc:
        raise NoRewrite(
            f"could not measure the interpolation matrix: {str(exc).strip().splitlines()[0][:160]}"
        ) from None
    if y.shape != (n_in, 1, n_out, 1):
        raise NoRewrite(f"expected an output of {n_out} along the axis; measured {y.shape[2]}")
    return y[:, 0, :, 0].T.astype(np.float64)  # column i is the response to e_i


@rewrite("Resize", "Upsample")
def rewrite_resize(b: Builder) -> str:
    x = b.input(0)
    if b.node.op_type != "Resize" or len(b.node.input) < 2:
        raise NoRewrite("expected Resize with roi/scales/sizes inputs (opset >= 11)")
    if b.attr("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        raise NoRewrite("expected a coordinate_transformation_mode other than tf_crop_and_resize")
    shape = b.shape(x)
    sizes_in = [d if isinstance(d, int) else None for d in shape]
    scales, sizes_out = _targets(b, sizes_in)
    rank = len(shape)
    resized = [k for k in range(rank) if sizes_out[k] != (sizes_in[k] if sizes_in[k] is not None else -1)]
    if scales is not None:
        resized = sorted(set(resized) | {k for k, s in enumerate(scales) if s != 1.0})
    y = x
    for axis in sorted(resized, reverse=True):
        n_in, n_out = sizes_in[axis], sizes_out[axis]
        if n_in is None:
            raise NoRewrite(f"expected a static size of axis {axis} to resize it; found a symbolic one")
        m = _matrix(b, n_in, n_out, scales[axis] if scales is not None else None).astype(b.dtype())
        if axis == rank - 1:
            y = b.internal(b.op("MatMul", [y, b.const(m.T, "interp")]))
        elif axis == rank - 2:
            y = b.internal(b.op("MatMul", [b.const(m, "interp"), y]))
        else:
            perm = list(range(rank))
            perm[axis], perm[rank - 2] = rank - 2, axis
            moved = b.op("Transpose", [y], perm=perm)
            y = b.op("Transpose", [b.internal(b.op("MatMul", [b.const(m, "interp"), moved]))], perm=perm)
    if y == x:
        b.finish(b.op("Identity", [x]))
        return "Identity (no axis changes size)"
    b.finish(y)
    mode = b.attr("mode", "nearest")
    return f"{mode} interpolation as MatMul along axes {sorted(resized)} (no CPU kernel for ResizeGrad)"
