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
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.analysis import simulate
from fitonnx.errors import InternalError
from fitonnx.fisher import engine
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import PREFIX
from fitonnx.model.graph import Kind

# Runs a gradient model over the calibration data, fetching the named extra outputs.
RunPass = Callable[[GradientModel, Sequence[str]], engine.FisherTraces]


@dataclass(frozen=True)
class ErrorOutputs:
    """Names of the second pass's per-sample outputs, per (tensor, bits)."""

    diagonal: Mapping[tuple[str, int], str]  # activations: Σ_j (g_j·e_j)²
    quadratic: Mapping[tuple[str, int], str]  # every tensor: (Σ_j g_j·e_j)²


@dataclass(frozen=True)
class MeasuredErrors:
    """Means over the calibration samples of the error model's outputs, per (tensor, bits)."""

    diagonal: Mapping[tuple[str, int], float]  # activations: (1/N)·Σ_i Σ_j (g_ij·e_ij)²
    quadratic: Mapping[tuple[str, int], float]  # every tensor: eᵀFe


def _fake_quantized_error(g: onnx.GraphProto, name: str, p: str, grid: simulate.Grid, dtype: np.dtype) -> None:
    """Nodes computing ``p + "err64"`` = Q_b(a) − a in float64 for activation ``name``."""
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
            n("Sub", [p + "fq", name], [p + "err"]),
            n("Cast", [p + "err"], [p + "err64"], to=TensorProto.DOUBLE),
        ]
    )


def _weighted_error(g: onnx.GraphProto, p: str, g64: str, diagonal: bool) -> None:
    """Outputs ``p + "quad"`` = (g·e)² and, with ``diagonal``, ``p + "out"`` = Σ_j (g_j·e_j)²."""
    n = helper.make_node
    g.node.extend(
        [
            n("Mul", [p + "err64", g64], [p + "weighted"]),
            n("ReduceSum", [p + "weighted"], [p + "dot"], keepdims=0),
            n("Mul", [p + "dot", p + "dot"], [p + "quad"]),
        ]
    )
    g.output.append(helper.make_tensor_value_info(p + "quad", TensorProto.DOUBLE, []))
    if diagonal:
        g.node.append(n("ReduceSumSquare", [p + "weighted"], [p + "out"], keepdims=0))
        g.output.append(helper.make_tensor_value_info(p + "out", TensorProto.DOUBLE, []))


def error_model(
    gm: GradientModel,
    grids: Mapping[tuple[str, int], simulate.Grid],
    dtypes: Mapping[str, np.dtype],
    weight_errors: Mapping[tuple[str, int], np.ndarray],
) -> tuple[GradientModel, ErrorOutputs]:
    """The gradient model plus float64 scalars per (tensor, bits) that need the real rounding error e:
    for activations (e per sample, from the simulation's fake quantizer: same ops, same float32
    arithmetic) Σ_j (∂ℓ/∂a_j·e_j)², and for every tensor (∂ℓ/∂t · e)², whose mean over samples (and
    labels) is eᵀFe, the Fisher quadratic form of that error (``weight_errors``: Q_b(w) − w)."""
    model = onnx.load_from_string(gm.model_bytes)
    g = model.graph
    grads = {t.name: grad for t, grad in zip(gm.tensors, gm.grad_outputs, strict=True)}
    diagonal: dict[tuple[str, int], str] = {}
    quadratic: dict[tuple[str, int], str] = {}
    for i, t in enumerate(gm.tensors):
        g64 = f"{PREFIX}merr{i}_g64"
        g.node.append(helper.make_node("Cast", [grads[t.name]], [g64], to=TensorProto.DOUBLE))
        keys = sorted(key for key in (*grids, *weight_errors) if key[0] == t.name)
        for _, b in keys:
            p = f"{PREFIX}merr{i}_{b}_"
            if t.kind is Kind.WEIGHT:
                err = weight_errors[(t.name, b)].astype(np.float64)
                g.initializer.append(numpy_helper.from_array(err, p + "err64"))
            else:
                _fake_quantized_error(g, t.name, p, grids[(t.name, b)], dtypes[t.name])
            _weighted_error(g, p, g64, diagonal=t.kind is Kind.ACTIVATION)
            quadratic[(t.name, b)] = p + "quad"
            if t.kind is Kind.ACTIVATION:
                diagonal[(t.name, b)] = p + "out"
    return dataclasses.replace(gm, model_bytes=model.SerializeToString()), ErrorOutputs(diagonal, quadratic)


def measure_errors(
    gm: GradientModel,
    simulator: simulate.Simulator,
    weight_bits: Sequence[int],
    activation_bits: Sequence[int],
    run: RunPass,
) -> MeasuredErrors:
    """Run the error model of every simulated tensor at every candidate width over the calibration
    data (``run``) and average its outputs over the samples."""
    acts = [a.name for a in simulator.sim.activations]
    grids = {(a, b): simulator.activation_grid(a, b) for a in acts for b in activation_bits}
    dtypes = {a.name: a.dtype for a in simulator.sim.activations}
    weight_errors = {
        (w, b): simulator.quantized_weight(w, b).astype(np.float64) - value.astype(np.float64)
        for w, value in simulator.sim.weights.items()
        for b in weight_bits
    }
    gm2, outs = error_model(gm, grids, dtypes, weight_errors)
    second = run(gm2, [*outs.diagonal.values(), *outs.quadratic.values()])
    if second.extra is None:
        raise InternalError("engine returned no extra outputs")
    return MeasuredErrors(
        diagonal={key: float(second.extra[name].mean()) for key, name in outs.diagonal.items()},
        quadratic={key: float(second.extra[name].mean()) for key, name in outs.quadratic.items()},
    )
