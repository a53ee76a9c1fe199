"""The second calibration pass of ``validate``: the real rounding error e weighted by the gradient.

Two predictors need e itself, not a noise model: ``fit_measured`` (activations: Σ_j (∂ℓ/∂a_j·e_j)²
per sample) and ``quadratic`` ((∂ℓ/∂t · e)² per sample, whose mean over samples and labels is
eᵀFe). Activation errors change from sample to sample, so they are computed in the graph, with
the simulation's fake quantizer (same ops, same float32 arithmetic); weight errors Q_b(w) − w are
constants. The pass needs the activation ranges of the first pass, hence a second one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.analysis import simulate
from fitonnx.analysis.choices import BlockGrid, Choice, FloatGrid
from fitonnx.errors import InternalError
from fitonnx.fisher import engine
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import PREFIX
from fitonnx.fisher.statistics import BlockStat, block_stat_nodes
from fitonnx.formats import block_nodes
from fitonnx.model.graph import Kind

# Runs a gradient model over the calibration data, fetching the named extra outputs.
RunPass = Callable[[GradientModel, Sequence[str]], engine.FisherTraces]


@dataclass(frozen=True)
class ErrorOutputs:
    """Names of the second pass's per-sample outputs, per (tensor, bits)."""

    diagonal: Mapping[tuple[str, Choice], str]  # activations: Σ_j (g_j·e_j)²
    quadratic: Mapping[tuple[str, Choice], str]  # every tensor: (Σ_j g_j·e_j)²
    expected: Mapping[tuple[str, Choice], str]  # floating activations: Σ_j g_j²·s_j²/12 (s_j: spacing)
    noise: Mapping[tuple[str, Choice], str]  # floating activations: Σ_j s_j²
    projection: Mapping[tuple[str, Choice], str] = field(default_factory=dict)  # every tensor: Σ_j g_j·e_j


@dataclass(frozen=True)
class MeasuredErrors:
    """Means over the calibration samples of the error model's outputs, per (tensor, bits)."""

    diagonal: Mapping[tuple[str, Choice], float]  # activations: (1/N)·Σ_i Σ_j (g_ij·e_ij)²
    quadratic: Mapping[tuple[str, Choice], float]  # every tensor: eᵀFe
    expected: Mapping[tuple[str, Choice], float]  # floating activations: FIT of the binade noise model
    noise: Mapping[tuple[str, Choice], float]  # floating activations: Σ_j s_j², mean over samples
    # Every tensor, per calibration sample: the projection g_i·e_i (Σ_j ∂ℓ_i/∂t_j·e_ij), the first-order
    # change of the sample's loss; empty when the engine summed it over enumerated labels (exact Fisher).
    projections: Mapping[tuple[str, Choice], np.ndarray] = field(default_factory=dict)


def _int_quantized(g: onnx.GraphProto, name: str, p: str, grid: simulate.Grid, dtype: np.dtype) -> str:
    """Nodes computing ``p + "fq"`` = Q(a) on an integer grid, as the simulation's fake quantizer does."""
    n = helper.make_node
    for suffix, value in (("zp", grid.zero_point), ("step", grid.step), ("levels", grid.levels), ("zero", 0.0)):
        g.initializer.append(numpy_helper.from_array(np.array(value, dtype), p + suffix))
    g.node.extend(
        [
            n("Div", [name, p + "step"], [p + "scaled"]),
            n("Round", [p + "scaled"], [p + "rounded"]),
            n("Add", [p + "rounded", p + "zp"], [p + "shifted"]),
            n("Clip", [p + "shifted", p + "zero", p + "levels"], [p + "q"]),
            n("Sub", [p + "q", p + "zp"], [p + "centred"]),
            n("Mul", [p + "centred", p + "step"], [p + "fq"]),
        ]
    )
    return p + "fq"


def _float_quantized(g: onnx.GraphProto, name: str, p: str, grid: FloatGrid, dtype: np.dtype) -> str:
    """Nodes computing ``p + "fout"`` = Q(a) on a floating grid (the simulation's own quantizer)."""
    values = (("fscale", grid.scale), ("fmant", float(grid.mant)), ("femin", float(grid.emin)), ("ftop", grid.top))
    for suffix, value in values:
        g.initializer.append(numpy_helper.from_array(np.array(value, dtype), p + suffix))
    g.initializer.extend(simulate.float_constants(p, dtype))
    g.node.extend(simulate.float_quantizer_nodes(name, p, p + "fscale", p + "fmant", p + "femin", p + "ftop"))
    return p + "fout"


def _block_quantized(g: onnx.GraphProto, name: str, p: str, grid: BlockGrid) -> str:
    """Nodes computing ``p + "bq_out"`` = Q(a) under a dynamic block format (the simulation's own block quantizer)."""
    q = p + "bq_"
    g.initializer.append(helper.make_tensor(q + "ts", TensorProto.FLOAT, [], [grid.tensor_scale]))
    nodes, inits = block_nodes.block_qdq_nodes(name, q, grid.fmt, grid.layout, grid.opset, q + "ts")
    g.node.extend(nodes)
    g.initializer.extend(inits)
    return q + "out"


def _block_quantized_error(g: onnx.GraphProto, name: str, p: str, grid: BlockGrid, grad: str) -> tuple[str, str]:
    """Nodes computing ``p + "err64"`` under a dynamic block format, and the outputs Σ_j g_j²·E[δ_j²]
    (``fisher.statistics.block_stat_nodes``, the statistic ``score --format`` sums) and Σ_j E[δ_j²]."""
    n = helper.make_node
    fq = _block_quantized(g, name, p, grid)
    g.node.extend([n("Sub", [fq, name], [p + "err"]), n("Cast", [p + "err"], [p + "err64"], to=TensorProto.DOUBLE)])
    stat = BlockStat(name, grid.fmt, grid.axis, grid.tensor_scale)
    nodes, inits, (expected, _) = block_stat_nodes(stat, grad, grid.shape, p + "bs_", grid.opset)
    mant = block_nodes.element_constants(grid.fmt)[0]
    factor = numpy_helper.from_array(np.array(4.0 ** (-mant) / 12.0, np.float64), p + "bs_nfactor")
    nodes += [
        n("Cast", [p + "bs_rs"], [p + "bs_rs64"], to=TensorProto.DOUBLE),
        n("ReduceSumSquare", [p + "bs_rs64"], [p + "bs_rsq"], keepdims=0),
        n("Mul", [p + "bs_rsq", factor.name], [p + "noise"]),
    ]
    g.node.extend(nodes)
    g.initializer.extend([*inits, factor])
    for out in (expected, p + "noise"):
        g.output.append(helper.make_tensor_value_info(out, TensorProto.DOUBLE, []))
    return expected, p + "noise"


def fake_quantized(
    g: onnx.GraphProto, name: str, p: str, grid: simulate.Grid | FloatGrid | BlockGrid, dtype: np.dtype
) -> str:
    """Nodes computing Q(a) for activation ``name`` on ``grid`` (integer, floating or block); returns its name."""
    if isinstance(grid, BlockGrid):
        return _block_quantized(g, name, p, grid)
    if isinstance(grid, FloatGrid):
        return _float_quantized(g, name, p, grid, dtype)
    return _int_quantized(g, name, p, grid, dtype)


def _fake_quantized_error(g: onnx.GraphProto, name: str, p: str, grid: simulate.Grid, dtype: np.dtype) -> None:
    """Nodes computing ``p + "err64"`` = Q_b(a) − a in float64 for activation ``name``."""
    n = helper.make_node
    fq = _int_quantized(g, name, p, grid, dtype)
    g.node.extend([n("Sub", [fq, name], [p + "err"]), n("Cast", [p + "err"], [p + "err64"], to=TensorProto.DOUBLE)])


def _float_quantized_error(
    g: onnx.GraphProto, name: str, p: str, grid: FloatGrid, dtype: np.dtype, g64: str
) -> tuple[str, str]:
    """Nodes computing ``p + "err64"`` for a floating format (the simulation's own quantizer), and
    the outputs Σ_j g_j²·s_j²/12 and Σ_j s_j² of its element spacings s_j (scale · 2^(e_j − mant))."""
    n = helper.make_node
    _float_quantized(g, name, p, grid, dtype)
    g.initializer.append(numpy_helper.from_array(np.array(1.0 / 12.0, np.float64), p + "twelfth"))
    g.node.extend(
        [
            n("Sub", [p + "fout", name], [p + "err"]),
            n("Cast", [p + "err"], [p + "err64"], to=TensorProto.DOUBLE),
            n("Mul", [p + "fstep", p + "fscale"], [p + "spacing"]),
            n("Cast", [p + "spacing"], [p + "spacing64"], to=TensorProto.DOUBLE),
            n("Mul", [p + "spacing64", g64], [p + "gs"]),
            n("ReduceSumSquare", [p + "gs"], [p + "gs2"], keepdims=0),
            n("Mul", [p + "gs2", p + "twelfth"], [p + "expected"]),
            n("ReduceSumSquare", [p + "spacing64"], [p + "noise"], keepdims=0),
        ]
    )
    for out in ("expected", "noise"):
        g.output.append(helper.make_tensor_value_info(p + out, TensorProto.DOUBLE, []))
    return p + "expected", p + "noise"


def _weighted_error(g: onnx.GraphProto, p: str, g64: str, diagonal: bool) -> None:
    """Outputs ``p + "dot"`` = g·e, ``p + "quad"`` = (g·e)² and, with ``diagonal``, ``p + "out"`` = Σ_j (g_j·e_j)²."""
    n = helper.make_node
    g.node.extend(
        [
            n("Mul", [p + "err64", g64], [p + "weighted"]),
            n("ReduceSum", [p + "weighted"], [p + "dot"], keepdims=0),
            n("Mul", [p + "dot", p + "dot"], [p + "quad"]),
        ]
    )
    g.output.append(helper.make_tensor_value_info(p + "quad", TensorProto.DOUBLE, []))
    g.output.append(helper.make_tensor_value_info(p + "dot", TensorProto.DOUBLE, []))
    if diagonal:
        g.node.append(n("ReduceSumSquare", [p + "weighted"], [p + "out"], keepdims=0))
        g.output.append(helper.make_tensor_value_info(p + "out", TensorProto.DOUBLE, []))


def error_model(
    gm: GradientModel,
    grids: Mapping[tuple[str, Choice], simulate.Grid | FloatGrid | BlockGrid],
    dtypes: Mapping[str, np.dtype],
    weight_errors: Mapping[tuple[str, Choice], np.ndarray],
) -> tuple[GradientModel, ErrorOutputs]:
    """The gradient model plus float64 scalars per (tensor, choice) that need the real rounding error e:
    for activations (e per sample, from the simulation's fake quantizer: same ops, same float32
    arithmetic) Σ_j (∂ℓ/∂a_j·e_j)², and for every tensor (∂ℓ/∂t · e)², whose mean over samples (and
    labels) is eᵀFe, the Fisher quadratic form of that error (``weight_errors``: Q(w) − w). Floating
    activation formats also give their noise model's FIT and total noise (``_float_quantized_error``)."""
    model = onnx.load_from_string(gm.model_bytes)
    g = model.graph
    grads = {t.name: grad for t, grad in zip(gm.tensors, gm.grad_outputs, strict=True)}
    outs = ErrorOutputs({}, {}, {}, {})
    for i, t in enumerate(gm.tensors):
        g64 = f"{PREFIX}merr{i}_g64"
        g.node.append(helper.make_node("Cast", [grads[t.name]], [g64], to=TensorProto.DOUBLE))
        keys = [key for key in (*grids, *weight_errors) if key[0] == t.name]
        for k, key in enumerate(dict.fromkeys(keys)):
            p = f"{PREFIX}merr{i}_{k}_"
            if t.kind is Kind.WEIGHT:
                err = weight_errors[key].astype(np.float64)
                g.initializer.append(numpy_helper.from_array(err, p + "err64"))
            elif isinstance(grids[key], BlockGrid):
                expected, noise_out = _block_quantized_error(g, t.name, p, grids[key], grads[t.name])
                outs.expected[key], outs.noise[key] = expected, noise_out  # type: ignore[index]
            elif isinstance(grids[key], FloatGrid):
                expected, noise_out = _float_quantized_error(g, t.name, p, grids[key], dtypes[t.name], g64)
                outs.expected[key], outs.noise[key] = expected, noise_out  # type: ignore[index]
            else:
                _fake_quantized_error(g, t.name, p, grids[key], dtypes[t.name])
            _weighted_error(g, p, g64, diagonal=t.kind is Kind.ACTIVATION)
            outs.quadratic[key] = p + "quad"  # type: ignore[index]
            outs.projection[key] = p + "dot"  # type: ignore[index]
            if t.kind is Kind.ACTIVATION:
                outs.diagonal[key] = p + "out"  # type: ignore[index]
    return dataclasses.replace(gm, model_bytes=model.SerializeToString()), outs


def simulated_error_model(
    gm: GradientModel,
    simulator: simulate.Simulator,
    weight_choices: Sequence[Choice],
    activation_choices: Sequence[Choice],
) -> tuple[GradientModel, ErrorOutputs]:
    """``error_model`` of every simulated tensor at every candidate choice, with the simulator's grids."""
    acts = [a.name for a in simulator.sim.activations]
    grids: dict[tuple[str, Choice], simulate.Grid | FloatGrid | BlockGrid] = {}
    for a in acts:
        for c in activation_choices:
            fg = simulator.activation_float(a, c)
            grids[(a, c)] = fg if fg is not None else simulator.activation_grid(a, c)
    dtypes = {a.name: a.dtype for a in simulator.sim.activations}
    weight_errors = {
        (w, c): simulator.quantized_weight(w, c).astype(np.float64) - value.astype(np.float64)
        for w, value in simulator.sim.weights.items()
        for c in weight_choices
    }
    return error_model(gm, grids, dtypes, weight_errors)


def measure_errors(
    gm: GradientModel,
    simulator: simulate.Simulator,
    weight_choices: Sequence[Choice],
    activation_choices: Sequence[Choice],
    run: RunPass,
) -> MeasuredErrors:
    """Run the error model of every simulated tensor at every candidate choice over the calibration
    data (``run``) and average its outputs over the samples (the projections kept per sample, unless
    the head enumerates labels: the engine's Σ_c p_c·g_c·e is the expected score, zero)."""
    gm2, outs = simulated_error_model(gm, simulator, weight_choices, activation_choices)
    keep = {} if gm.head.enumerate_labels else outs.projection
    fetched = [*outs.diagonal.values(), *outs.quadratic.values(), *outs.expected.values(), *outs.noise.values()]
    second = run(gm2, [*fetched, *keep.values()])
    if second.extra is None:
        raise InternalError("engine returned no extra outputs")
    extra = second.extra

    def means(names: Mapping[tuple[str, Choice], str]) -> dict[tuple[str, Choice], float]:
        return {key: float(extra[name].mean()) for key, name in names.items()}

    projections = {key: np.asarray(extra[name], np.float64) for key, name in keep.items()}
    return MeasuredErrors(
        means(outs.diagonal), means(outs.quadratic), means(outs.expected), means(outs.noise), projections
    )
