"""Augment the model for Fisher estimation: loss head, activation taps, gradient graph, reductions.

Like ONNX Runtime's calibrator, this stage only builds models; ``engine`` runs them.

- Activation gradients: onnxruntime's GradientGraphBuilder differentiates only initializers and
  graph inputs, so each activation ``a`` is rewired as ``a + d_a`` with ``d_a`` a new graph input
  fed with zeros; ∂ℓ/∂d_a = ∂ℓ/∂a. All consumers read the tapped tensor, since a toolchain's
  Q/DQ pair on ``a`` is shared by every reader.
- Per-sample squared norms (and activation min/max) are reduced inside the gradient graph, so the
  engine fetches scalars instead of copying every gradient out of the session.
- A probe model (the original plus the activations and the loss tap as outputs) gives the shapes
  of the zero and noise inputs for each distinct input-shape signature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from fitonnx.errors import FitonnxError, InternalError, UnsupportedError
from fitonnx.fisher.engines import AUTO, get_engine
from fitonnx.fisher.losses import LABELS, LOSS, PREFIX, LossHead
from fitonnx.fisher.statistics import NO_STATISTICS, Statistics, add_statistics
from fitonnx.model.graph import Kind, QuantTensor, default_opset, producer_positions


@dataclass(frozen=True)
class GradientModel:
    """The serialized gradient model and the names the engine feeds and fetches."""

    model_bytes: bytes
    probe_bytes: bytes
    tensors: tuple[QuantTensor, ...]
    perturbations: tuple[tuple[str, str], ...]  # (activation, zero-input name)
    sqnorm_outputs: tuple[str, ...]  # one per tensor, same order as ``tensors``
    grad_outputs: tuple[str, ...]  # full gradients, only when ``keep_gradients``
    range_outputs: tuple[tuple[str, str], ...]  # (min, max) per activation, order of activations
    head: LossHead
    probe_outputs: tuple[str, ...]  # activations..., then the loss tap
    # Per tensor (order of ``tensors``), float64 scalars ‖g ⊙ 1[t = v]‖² for v = 0, min(t), max(t)
    # (an activation's per-sample min/max): the grid noise model's trace of exactly represented
    # elements. Empty unless ``exact_points``.
    point_outputs: tuple[tuple[str, str, str], ...] = ()
    loss_output: str | None = None  # the per-sample loss, fetched when the engine enumerates labels
    # Per-sample shapes of inputs, activations and the loss tap measured when the model was built
    # (the engine probes again only for samples of other shapes).
    sample_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the report must say about the loss (outputs left out, tensors not scored)
    # (statistic key, output name) of the ``statistics`` requested (float64, summed over samples by the engine).
    sum_outputs: tuple[tuple[str, str], ...] = ()

    @property
    def activations(self) -> tuple[QuantTensor, ...]:
        return tuple(t for t in self.tensors if t.kind is Kind.ACTIVATION)


def _safe(index: int, kind: str) -> str:
    return f"{PREFIX}{kind}{index}"


def _float_input(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _same_rank_input(name: str, rank: int, shape: tuple[int, ...] | None = None) -> onnx.ValueInfoProto:
    """A float input of known rank: the concrete ``shape`` when given, else symbolic dims.

    onnxruntime-training 1.19 crashes (segfault) building the gradient of an Add whose input has
    unknown rank, so the rank, measured by the probe, is always declared.
    """
    dims = list(shape) if shape is not None else [f"{name}_dim{k}" for k in range(rank)]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _fix_input_shapes(graph: onnx.GraphProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Declare every graph input named in ``shapes`` with those concrete dims.

    onnxruntime-training's AveragePoolGrad and MaxPoolGrad take the shape of their output from the
    static shape known when the gradient graph is built, and a symbolic dimension reads as 0 there:
    AveragePool then gives an empty gradient or kills the process (SIGFPE), MaxPool with symbolic
    spatial dims writes out of bounds. Every sample of a Dataset has the same shapes, so declaring
    them loses nothing.
    """
    for value in graph.input:
        if value.name in shapes and value.type.HasField("tensor_type"):
            tensor_type = value.type.tensor_type
            tensor_type.ClearField("shape")
            for size in shapes[value.name]:
                tensor_type.shape.dim.add().dim_value = size


def _tap_activations(
    graph: onnx.GraphProto,
    activations: Sequence[QuantTensor],
    ranks: Mapping[str, int],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> list[tuple[str, str]]:
    """Rewire every consumer of each activation ``a`` to read ``a + d_a``; return (a, d_a) pairs."""
    pairs: list[tuple[str, str]] = []
    renames: dict[str, str] = {}
    tap_nodes: list[onnx.NodeProto] = []
    for i, act in enumerate(activations):
        zero, tapped = _safe(i, "d"), _safe(i, "tap")
        renames[act.name] = tapped
        tap_nodes.append(helper.make_node("Add", [act.name, zero], [tapped], name=_safe(i, "tap_add")))
        graph.input.append(_same_rank_input(zero, ranks[act.name], (shapes or {}).get(act.name)))
        pairs.append((act.name, zero))
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in renames:
                node.input[slot] = renames[name]
    # Topological order: put each tap right after the producer of its activation.
    position = producer_positions(graph.node)
    nodes = list(graph.node)
    for tap in sorted(tap_nodes, key=lambda t: position.get(t.input[0], -1), reverse=True):
        nodes.insert(position.get(tap.input[0], -1) + 1, tap)
    del graph.node[:]
    graph.node.extend(nodes)
    return pairs


# Ops whose gradient in onnxruntime-training names a gradient for every float input, needed or not
# (LayerNormalizationGrad outputs the scale's and bias's): two of them reading one initializer
# define ``<name>_grad`` twice ("Duplicate definition of name").
_ALL_INPUT_GRADS = frozenset(
    {
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "BatchNormalization",
    }
)


def _split_shared_parameters(graph: onnx.GraphProto) -> None:
    """Give each reader of an initializer shared by normalization nodes its own Identity copy.

    The value each reader sees is unchanged, and the gradient of the initializer (when needed) is
    the sum over its copies, as for any tensor with several readers; only the copies' gradients
    get distinct names. Exporters share one initializer between all LayerNormalization nodes of an
    untouched initialisation (cross-layer sharing does the same)."""
    floats = {t.name for t in graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in floats:
                readers.setdefault(name, []).append((node, slot))
    copies = []
    for name, reads in readers.items():
        if len(reads) < 2 or not any(node.op_type in _ALL_INPUT_GRADS for node, _ in reads):
            continue
        for k, (node, slot) in enumerate(reads):
            copy = f"{PREFIX}{name}__reader{k}"
            copies.append(helper.make_node("Identity", [name], [copy], name=copy))
            node.input[slot] = copy
    if copies:
        nodes = [*copies, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)


def build_probe(
    model: onnx.ModelProto, activations: Sequence[QuantTensor], taps: str | Sequence[str] | None
) -> tuple[bytes, tuple[str, ...]]:
    """The model with every activation (and the loss taps, if given) exposed as outputs (for shapes)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [a.name for a in activations]
    for tap in [taps] if isinstance(taps, str) else taps or ():
        if tap not in names:
            names.append(tap)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return probe.SerializeToString(), tuple(names)


@dataclass(frozen=True)
class AugmentedModel:
    """The model with its activation taps and loss head, whose only output is ``LOSS``.

    This is what GradientGraphBuilder differentiates; benchmarks run the raw gradient graph of it.
    """

    model: onnx.ModelProto
    perturbations: tuple[tuple[str, str], ...]  # (activation, zero-input name)
    differentiate: tuple[str, ...]  # weight initializers, then the zero inputs


def augment(
    model: onnx.ModelProto,
    tensors: Sequence[QuantTensor],
    head: LossHead,
    labels_dtype: np.dtype | None,
    ranks: Mapping[str, int],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> AugmentedModel:
    """Tap every quantizable activation and attach the loss head (a new model; ``model`` is untouched).

    ``shapes``: concrete per-sample shapes of graph inputs and activations, declared when given.
    """
    if not tensors:
        raise UnsupportedError("expected at least one quantizable weight or activation; the model has none")
    activations = [t for t in tensors if t.kind is Kind.ACTIVATION]
    weights = [t for t in tensors if t.kind is Kind.WEIGHT]
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    initializer_names = {t.name for t in graph.initializer}
    missing = [w.name for w in weights if w.name not in initializer_names]
    if missing:
        raise InternalError(f"weights must be initializers after prepare; not found: {missing[:3]}")

    if shapes:
        _fix_input_shapes(graph, shapes)
    _split_shared_parameters(graph)
    pairs = _tap_activations(graph, activations, ranks, shapes)
    graph.node.extend(head.nodes)
    graph.initializer.extend(head.initializers)
    if head.needs_labels or head.enumerate_labels:
        if labels_dtype is None:
            raise InternalError("head needs labels but no dtype given")
        graph.input.append(
            helper.make_tensor_value_info(LABELS, helper.np_dtype_to_tensor_dtype(np.dtype(labels_dtype)), None)
        )
    for part in head.heads:
        if part.noise is not None:
            graph.input.append(_float_input(part.noise_input))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []))
    differentiate = [w.name for w in weights] + [zero for _, zero in pairs]
    return AugmentedModel(model=work, perturbations=tuple(pairs), differentiate=tuple(differentiate))


def gradient_graph(aug: AugmentedModel, source: onnx.ModelProto, engine: str = AUTO) -> onnx.ModelProto:
    """The gradient ``engine``'s output for ``aug``: outputs ``<name>_grad`` per differentiated name.

    ``source`` is the model before augmentation, whose ops name the culprit if the build fails.
    """
    builder = get_engine(engine)
    try:
        return builder.build(aug.model, LOSS, aug.differentiate)
    except FitonnxError:
        raise
    except Exception as exc:  # a binding raises RuntimeError/Fail with a C++ message
        raise builder.explain(exc, source) from None


@dataclass(frozen=True)
class GradientRequest:
    """What ``build_gradient_model`` builds: the prepared model, the tensors to score, the loss head.

    ``ranks`` gives the rank of every activation (from ``engine.probe_shapes``); ``shapes``, the
    concrete per-sample shapes of the inputs and activations, makes pooling gradients correct.
    ``keep_gradients`` also outputs the full gradients; ``exact_norms`` casts every gradient to
    float64 before squaring (slower; see MIN_BLOCK); ``exact_points`` adds ``point_outputs`` (see
    GradientModel) for the grid noise model. ``engine``: the gradient engine (``fisher.engines``).
    ``statistics``: per-group and weighted Fisher statistics (``fisher.statistics``) for formats.
    """

    model: onnx.ModelProto
    tensors: Sequence[QuantTensor]
    head: LossHead
    labels_dtype: np.dtype | None
    ranks: Mapping[str, int]
    shapes: Mapping[str, tuple[int, ...]] | None = None
    keep_gradients: bool = False
    exact_norms: bool = False
    exact_points: bool = False
    engine: str = AUTO
    statistics: Statistics = NO_STATISTICS

    @property
    def activations(self) -> list[QuantTensor]:
        return [t for t in self.tensors if t.kind is Kind.ACTIVATION]


def build_gradient_model(request: GradientRequest) -> GradientModel:
    """Attach the loss head and activation taps, build the gradient graph, add reductions."""
    r = request
    aug = augment(r.model, r.tensors, r.head, r.labels_dtype, r.ranks, r.shapes)
    activations = r.activations
    probe_bytes, probe_outputs = build_probe(r.model, activations, [t.tap for t in r.head.targets])
    grad_model = gradient_graph(aug, r.model, r.engine)
    g = grad_model.graph
    weights = [t.name for t in r.tensors if t.kind is Kind.WEIGHT]
    by_tensor = {w: w for w in weights} | {a: zero for a, zero in aug.perturbations}
    grad_outputs = _gradient_names(g, r.tensors, by_tensor)
    sq_outputs = _add_sqnorms(g, r, grad_outputs, default_opset(grad_model))
    ranges = [_add_range(g, act.name, _safe(i, "min"), _safe(i, "max")) for i, act in enumerate(activations)]
    points = _add_points(g, r, ranges, by_tensor) if r.exact_points else []
    sums = _add_statistics(g, r, grad_outputs, default_opset(grad_model))
    loss_output = LOSS if r.head.enumerate_labels else None
    _set_outputs(g, sq_outputs, ranges, grad_outputs if r.keep_gradients else [], points, loss_output)
    g.output.extend(helper.make_empty_tensor_value_info(name) for _, name in sums)
    return GradientModel(
        model_bytes=grad_model.SerializeToString(),
        probe_bytes=probe_bytes,
        tensors=tuple(r.tensors),
        perturbations=aug.perturbations,
        sqnorm_outputs=tuple(sq_outputs),
        grad_outputs=tuple(grad_outputs) if r.keep_gradients else (),
        range_outputs=tuple(ranges),
        head=r.head,
        probe_outputs=probe_outputs,
        point_outputs=tuple(points),
        loss_output=loss_output,
        sample_shapes=dict(r.shapes or {}),
        sum_outputs=tuple(sums),
    )


def scored_statistics(statistics: Statistics, tensors: Sequence[QuantTensor]) -> Statistics:
    """The statistics of ``tensors``: a plan made over every quantizable tensor names some the loss
    does not reach, which are not scored."""
    scored = {t.name for t in tensors}
    return Statistics(
        tuple(x for x in statistics.groups if x.tensor in scored),
        tuple(x for x in statistics.weighted if x.tensor in scored),
        tuple(x for x in statistics.noise if x.tensor in scored),
        tuple(x for x in statistics.blocks if x.tensor in scored),
    )


def statistic_shapes(
    model: onnx.ModelProto, tensors: Sequence[QuantTensor], shapes: Mapping[str, tuple[int, ...]] | None
) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape for its statistics: a weight's own, an activation's per-sample one."""
    dims = {init.name: tuple(int(d) for d in init.dims) for init in model.graph.initializer}
    return {t.name: dims[t.name] if t.kind is Kind.WEIGHT else tuple((shapes or {})[t.name]) for t in tensors}


def _add_statistics(g: onnx.GraphProto, r: GradientRequest, grads: Sequence[str], opset: int) -> list[tuple[str, str]]:
    """Append the requested format statistics (``fisher.statistics``); return (key, output) pairs."""
    if not r.statistics:
        return []
    shapes = statistic_shapes(r.model, r.tensors, r.shapes)
    stats = scored_statistics(r.statistics, r.tensors)
    return add_statistics(g, stats, dict(zip((t.name for t in r.tensors), grads, strict=True)), shapes, opset)


def _gradient_names(g: onnx.GraphProto, tensors: Sequence[QuantTensor], by_tensor: Mapping[str, str]) -> list[str]:
    """The gradient output of each tensor (order of ``tensors``), checked to be in the graph."""
    produced = {o for n in g.node for o in n.output}
    names = []
    for t in tensors:
        grad = by_tensor[t.name] + "_grad"
        if grad not in produced:
            raise UnsupportedError(
                f"the loss does not depend on {t.kind.value} {t.name!r}; expected every quantizable tensor "
                "to reach the chosen output",
                hint="pick the output that depends on it with --output",
            )
        names.append(grad)
    return names


def _add_sqnorms(g: onnx.GraphProto, r: GradientRequest, grads: Sequence[str], opset: int) -> list[str]:
    """Append the per-sample squared norm of each gradient; return their names."""
    sizes = {init.name: int(np.prod(init.dims, dtype=np.int64)) for init in r.model.graph.initializer}
    outputs = []
    for i, (t, grad) in enumerate(zip(r.tensors, grads, strict=True)):
        sq = _safe(i, "sq")
        numel = sizes[t.name] if t.kind is Kind.WEIGHT else _numel((r.shapes or {}).get(t.name))
        nodes, inits = _sqnorm_nodes(grad, sq, None if r.exact_norms else numel, opset)
        g.node.extend(nodes)
        g.initializer.extend(inits)
        outputs.append(sq)
    return outputs


def _add_range(g: onnx.GraphProto, tensor: str, lo: str, hi: str) -> tuple[str, str]:
    """Append the min and max of ``tensor`` as scalars ``lo`` and ``hi``."""
    g.node.append(helper.make_node("ReduceMin", [tensor], [lo], keepdims=0))
    g.node.append(helper.make_node("ReduceMax", [tensor], [hi], keepdims=0))
    return lo, hi


def _add_points(
    g: onnx.GraphProto, r: GradientRequest, ranges: Sequence[tuple[str, str]], by_tensor: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """Append the grid noise model's exactly-represented traces (see ``GradientModel.point_outputs``)."""
    act_ranges = dict(zip((a.name for a in r.activations), ranges, strict=True))
    points = []
    for i, t in enumerate(r.tensors):
        lo_hi = act_ranges.get(t.name)
        if lo_hi is None:  # a weight: its own min and max
            lo_hi = _add_range(g, t.name, _safe(i, "wmin"), _safe(i, "wmax"))
        nodes, inits, names = _point_nodes(t.name, by_tensor[t.name] + "_grad", lo_hi, _safe(i, "pt"))
        g.node.extend(nodes)
        g.initializer.extend(inits)
        points.append(names)
    return points


def _set_outputs(
    g: onnx.GraphProto,
    sq_outputs: Sequence[str],
    ranges: Sequence[tuple[str, str]],
    grads: Sequence[str],
    points: Sequence[tuple[str, str, str]],
    loss_output: str | None,
) -> None:
    """Replace the graph outputs by what the engine fetches, in the order it reads them."""
    del g.output[:]
    for name in sq_outputs:
        g.output.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, []))
    for lo, hi in ranges:
        g.output.append(helper.make_tensor_value_info(lo, TensorProto.FLOAT, []))
        g.output.append(helper.make_tensor_value_info(hi, TensorProto.FLOAT, []))
    for name in grads:
        g.output.append(helper.make_empty_tensor_value_info(name))
    for name in (n for triple in points for n in triple):
        g.output.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, []))
    if loss_output is not None:
        g.output.append(helper.make_tensor_value_info(loss_output, TensorProto.FLOAT, []))


def _point_nodes(
    tensor: str, grad: str, lo_hi: tuple[str, str], prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], tuple[str, str, str]]:
    """Nodes computing ‖g ⊙ 1[t = v]‖² in float64 for v = 0, ``lo_hi[0]`` and ``lo_hi[1]``."""
    zero32, zero64 = prefix + "_zero32", prefix + "_zero64"
    inits = [
        helper.make_tensor(zero32, TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor(zero64, TensorProto.DOUBLE, [], [0.0]),
    ]
    g64 = prefix + "_g64"
    nodes = [helper.make_node("Cast", [grad], [g64], to=TensorProto.DOUBLE)]
    outs = []
    for tag, value in (("z", zero32), ("lo", lo_hi[0]), ("hi", lo_hi[1])):
        p = f"{prefix}_{tag}"
        nodes += [
            helper.make_node("Equal", [tensor, value], [p + "_eq"]),
            helper.make_node("Where", [p + "_eq", g64, zero64], [p + "_masked"]),
            helper.make_node("ReduceSumSquare", [p + "_masked"], [p], keepdims=0),
        ]
        outs.append(p)
    return nodes, inits, (outs[0], outs[1], outs[2])


# Per-sample squared norms: squares summed in float32 over blocks of k consecutive elements
# (MIN_BLOCK <= k <= MAX_BLOCK, k dividing the element count), the block sums cast to float64 and
# summed there. Each block sum is within k·2⁻²⁴ (≤ 2e-6) of exact, so is the norm. Casting the
# whole gradient to float64 first is exact to float64 rounding, but onnxruntime's Cast is one
# single-threaded pass writing 8 bytes per element: on ResNet-18 the loop ran at 0.85 of a bare
# gradient loop that way, at 1.0 with blocks (bench/bench_score.py, BENCHMARKS.md).
# Tensors whose size is unknown at build time or has no such divisor take the exact path.
MIN_BLOCK = 16
MAX_BLOCK = 32


def _numel(shape: Sequence[int] | None) -> int | None:
    return None if shape is None else int(np.prod(shape, dtype=np.int64))


def _block(numel: int | None) -> int | None:
    """The largest divisor of ``numel`` in [MIN_BLOCK, MAX_BLOCK], or None."""
    if numel is None:
        return None
    return next((k for k in range(MAX_BLOCK, MIN_BLOCK - 1, -1) if numel % k == 0), None)


def _sqnorm_nodes(
    grad: str, out: str, numel: int | None, opset: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``out`` = ‖grad‖² as a float64 scalar (see MIN_BLOCK for the precision)."""
    k = _block(numel)
    if k is None:
        return [
            helper.make_node("Cast", [grad], [out + "_f64"], to=TensorProto.DOUBLE),
            helper.make_node("ReduceSumSquare", [out + "_f64"], [out], keepdims=0),
        ], []
    shape = helper.make_tensor(out + "_blocks", TensorProto.INT64, [2], [-1, k])
    nodes = [helper.make_node("Reshape", [grad, shape.name], [out + "_rows"])]
    inits = [shape]
    if opset >= 18:  # ReduceSumSquare took its axes as an attribute before opset 18
        axes = helper.make_tensor(out + "_axes", TensorProto.INT64, [1], [1])
        inits.append(axes)
        nodes.append(helper.make_node("ReduceSumSquare", [out + "_rows", axes.name], [out + "_f32"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSumSquare", [out + "_rows"], [out + "_f32"], axes=[1], keepdims=0))
    nodes.append(helper.make_node("Cast", [out + "_f32"], [out + "_f64"], to=TensorProto.DOUBLE))
    nodes.append(helper.make_node("ReduceSum", [out + "_f64"], [out], keepdims=0))
    return nodes, inits
