"""The prepare pipeline and the equality check of the prepared twin."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from fitonnx.errors import FitonnxError, ModelError, UnsupportedError
from fitonnx.model.graph import tensor_names
from fitonnx.model.runtime import make_session
from fitonnx.prepare.opset import convert_opset, runnable
from fitonnx.prepare.passes.autopad import explicit_conv_pads
from fitonnx.prepare.passes.batchnorm import fold_batchnorm
from fitonnx.prepare.passes.constants import constants_to_initializers
from fitonnx.prepare.passes.ort_optimizer import ort_basic_optimize
from fitonnx.prepare.passes.quantized import check_integer_ops, fold_weight_dequantize, strip_activation_qdq
from fitonnx.prepare.passes.specialize import specialize_if
from fitonnx.prepare.rewrites import rewrite_ops
from fitonnx.prepare.shapes import fix_input_shapes, infer_shapes
from fitonnx.prepare.types import Change, ChangeKind, Pass, PreparedModel


def default_passes() -> list[Pass]:
    """The passes ``prepare`` runs, in order (see README "Preparing a model")."""
    return [
        convert_opset,
        ort_basic_optimize,
        constants_to_initializers,
        fold_weight_dequantize,
        explicit_conv_pads,
        fold_batchnorm,
        rewrite_ops,
        infer_shapes,
    ]


def prepare(
    model: onnx.ModelProto,
    passes: Sequence[Pass] | None = None,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    feeds: Sequence[Mapping[str, np.ndarray]] = (),
) -> PreparedModel:
    """Run the passes in order; the input model is never modified.

    ``input_shapes`` (the shapes every calibration sample has) fixes the graph inputs to those
    static sizes, which some rewrites and onnxruntime-training's pooling gradients need. A model
    whose declared shapes contradict static ones (stale shapes inside an ``If`` branch, say) can
    then fail to load; it is prepared again with its inputs left as declared.

    ``feeds`` (calibration samples) let If nodes be specialized to the branch every sample takes,
    right after opset conversion (see ``specialize``).
    """
    check_precision(model)
    check_integer_ops(model)
    # Not a pass: the stripped model is the function the twin must compute (verify's reference).
    model, stripped = strip_activation_qdq(model)
    steps: list[Pass] = list(passes if passes is not None else default_passes())
    if feeds and any(node.op_type == "If" for node in model.graph.node):
        after = steps.index(convert_opset) + 1 if convert_opset in steps else 0
        steps.insert(after, lambda m: specialize_if(m, feeds))
    if not input_shapes:
        return _with_changes(_run(model, steps), stripped)
    # After onnxruntime's optimizer: folding with static sizes would turn size-derived lookups
    # (position ids into an embedding table) into constants, and the table would vanish.
    at = steps.index(ort_basic_optimize) + 1 if ort_basic_optimize in steps else 0
    fixed = [*steps[:at], lambda m: fix_input_shapes(m, input_shapes), *steps[at:]]
    try:
        return _with_changes(_run(model, fixed), stripped)
    except FitonnxError as exc:
        first = _run(model, steps)
        note = Change(
            ChangeKind.SHAPES, "model", f"inputs left as declared: with the data's static shapes, {exc.message}"
        )
        return dataclasses.replace(first, changes=(*stripped, note, *first.changes))


def _with_changes(prepared: PreparedModel, first: Sequence[Change]) -> PreparedModel:
    """``prepared`` with changes made before the passes listed first."""
    return dataclasses.replace(prepared, changes=(*first, *prepared.changes)) if first else prepared


_HALF = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def check_precision(model: onnx.ModelProto) -> None:
    """Refuse half-precision models up front: the loss heads and onnxruntime-training's CPU
    gradients work in float32, and the builder's own type error would not say what to do."""
    g = model.graph
    typed = [(v.name, v.type.tensor_type.elem_type) for v in [*g.input, *g.output]]
    typed += [(t.name, t.data_type) for t in g.initializer]
    half = [(name, _HALF[elem]) for name, elem in typed if elem in _HALF]
    if half:
        names = ", ".join(f"{n} ({t})" for n, t in half[:3]) + (" ..." if len(half) > 3 else "")
        raise UnsupportedError(
            f"expected a float32 model; found half-precision tensors: {names}",
            hint="convert the model and its data to float32 (e.g. with onnxconverter-common) and score that",
        )


def _run(model: onnx.ModelProto, steps: Sequence[Pass]) -> PreparedModel:
    current = model
    changes: list[Change] = []
    origins: dict[str, tuple[str, ...]] = {}
    reference: onnx.ModelProto | None = model if runnable(model) else None
    for step in steps:
        current, done = step(current)
        changes.extend(done)
        for change in done:
            for new, sources in change.origins:
                chained: list[str] = []
                for source in sources:
                    chained.extend(s for s in origins.get(source, (source,)) if s not in chained)
                origins[new] = tuple(chained)
        if reference is None and step is convert_opset:
            reference = current
    existing = tensor_names(model.graph)
    kept = tensor_names(current.graph)
    final = {name: src for name, src in origins.items() if name in kept and (name not in existing or src != (name,))}
    return PreparedModel(
        original=model,
        model=current,
        changes=tuple(changes),
        reference=reference if reference is not None else model,
        origins=final,
    )


def verify(
    prepared: PreparedModel,
    feeds: Sequence[Mapping[str, np.ndarray]],
    rtol: float = 1e-4,
) -> None:
    """Raise unless the twin gives the original's outputs (relative tolerance ``rtol``) on ``feeds``.

    The error is relative to the largest magnitude of each output; non-finite values must appear
    at the same places in both. A mismatch is a ``ModelError``, never a warning: no gradient of a
    twin that computes something else can be trusted.
    """
    if not prepared.changes:
        return
    reference = prepared.reference if prepared.reference is not None else prepared.original
    # One session at a time: each holds the model's weights (a large model's twice would not fit).
    a = make_session(reference.SerializeToString())
    names = [o.name for o in a.get_outputs()]
    feeds = [{k: np.asarray(v) for k, v in sample.items()} for sample in feeds]  # scalars may come as numpy scalars
    expected = [a.run(names, feed) for feed in feeds]
    del a
    b = make_session(prepared.model.SerializeToString())
    for i, (feed, want) in enumerate(zip(feeds, expected, strict=True)):
        for name, x, y in zip(names, want, b.run(names, feed), strict=True):
            err = relative_error(np.asarray(x), np.asarray(y))
            if err > rtol:
                raise ModelError(
                    f"expected the prepared model to give the original's outputs (relative error <= {rtol:.0e}); "
                    f"output {name!r} differs on sample {i} (relative error {err:.2e})",
                    hint="report this model to fitonnx; the prepare passes changed what it computes",
                )


def relative_error(x: np.ndarray, y: np.ndarray) -> float:
    """max|x − y| / max|x| over finite entries; inf when shapes or non-finite positions differ."""
    if x.shape != y.shape:
        return float("inf")
    x, y = x.astype(np.float64), y.astype(np.float64)
    fx, fy = np.isfinite(x), np.isfinite(y)
    if not np.array_equal(fx, fy) or not np.array_equal(x[~fx], y[~fy], equal_nan=True):
        return float("inf")
    if not fx.any():
        return 0.0
    scale = max(float(np.max(np.abs(x[fx]))), 1e-12)
    return float(np.max(np.abs(x[fx] - y[fx]))) / scale
