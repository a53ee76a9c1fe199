"""What ``validate`` ranks against the measured damage: the predictors, each a table [tensor, bits].

Every predictor is additive over tensors, so each is a table [tensor, bit width] summed along a
configuration:

- ``fit``: Σ_t Tr(F_t)·Δ_t(b_t)²/12, the paper's FIT (per-channel weights: Σ_c Tr(F_t,c)·Δ_c²/12);
- ``fit_grid``: FIT with the grid noise model (``fitonnx.score.noise``): elements whose value is a
  level of the simulated grid at every width (0, min, max; per channel for per-channel weights)
  are not perturbed, Σ_t Tr_pert(F_t)·Δ_t(b_t)²/12;
- ``fit_measured``: FIT.md's refinement with the measured rounding error instead of Δ²/12:
  weights Σ_j F_jj·(Q_b(w)_j − w_j)² with the diagonal Fisher F_jj; activations
  (1/N)·Σ_i Σ_j (∂ℓ_i/∂a_ij)²·(Q_b(a_ij) − a_ij)², per calibration sample, since activation
  values (hence their errors) change from sample to sample (``error_model``);
- ``quadratic``: Σ_t e_tᵀ F e_t with the real rounding error e_t = Q_b(t) − t (per calibration
  sample for activations) and the full Fisher, (1/N)·Σ_i (∂ℓ_i/∂t · e_t)²: twice the second-order
  KL of each tensor's own quantization, with neither the trace nor a noise model (with
  ``FisherOptions(fisher="exact")`` it is exact in the labels; with MC one sampled label per sample);
- ``output_space``: NVIDIA ModelOpt AutoQuantize's score, (1/N)·Σ_i Σ_j (∂ℓ_i/∂y_j · Δy_j)² at the
  output y of each op reading the tensor, Δy the move of y when the tensor alone is quantized
  (``output_space``);
- ``weight_error``: Σ_j (Q(t)_j − t_j)², the measured rounding error with every element weighted
  alike (data-free for weights, as NNCF's weight-compression criterion; activations: Σ_j E[δ_j²],
  the noise model's);
- ``noise_only``: Σ_t numel_t·Δ_t(b_t)², the total squared rounding error, every element weighted alike;
- ``trace_only``: Σ_t Tr(F_t)/(2^b_t − 1)², sensitivity without the tensor's range;
- ``size_only``: Σ_t numel_t/(2^b_t − 1)², neither sensitivity nor range: only how many values
  lose how many bits;
- ``hessian``: HAWQ-v2's Σ_t Tr(H_t)/n_t·‖Q(w_t) − w_t‖², the average Hessian trace of the loss by
  Hutchinson's estimator (``hessian``), weights only; computed on request (``ON_REQUEST``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.analysis import simulate
from fitonnx.analysis.choices import Choice, cost_bits, sorted_choices
from fitonnx.analysis.error_model import MeasuredErrors
from fitonnx.analysis.simulate import Config
from fitonnx.errors import InternalError
from fitonnx.fisher import engine
from fitonnx.formats import fit_expected, fit_measured, noise_power
from fitonnx.model.graph import Kind
from fitonnx.score import noise
from fitonnx.score.fit import ScoreReport, TensorScore
from fitonnx.values import TextEnum


class Predictor(TextEnum):
    """A prediction of a configuration's damage, by the name the reports use."""

    FIT = "fit"
    FIT_GRID = "fit_grid"
    FIT_MEASURED = "fit_measured"
    QUADRATIC = "quadratic"
    OUTPUT_SPACE = "output_space"
    WEIGHT_ERROR = "weight_error"
    NOISE_ONLY = "noise_only"
    TRACE_ONLY = "trace_only"
    SIZE_ONLY = "size_only"
    HESSIAN = "hessian"

    @property
    def description(self) -> str:
        return PREDICTORS[self]


PREDICTORS: dict[Predictor, str] = {
    Predictor.FIT: "FIT, Σ Tr(F)·Δ²/12 (the paper's uniform noise model)",
    Predictor.FIT_GRID: "FIT, grid noise model: elements at exact levels (0, min, max) unperturbed",
    Predictor.FIT_MEASURED: "Σ diag(F)·(Q(t) − t)², measured rounding error (FIT.md refinement)",
    Predictor.QUADRATIC: "Σ eᵀFe, Fisher quadratic form of the real rounding error e (2·KL to second order)",
    Predictor.OUTPUT_SPACE: "Σ (∂ℓ/∂y ⊙ Δy)² at each reader's output y, ModelOpt AutoQuantize's score",
    Predictor.WEIGHT_ERROR: "Σ (Q(w) − w)², measured rounding error without Fisher (data-free, as NNCF)",
    Predictor.NOISE_ONLY: "Σ numel·Δ², rounding noise without Fisher",
    Predictor.TRACE_ONLY: "Σ Tr(F)/(2^b − 1)², Fisher trace without ranges",
    Predictor.SIZE_ONLY: "Σ numel/(2^b − 1)², tensor sizes and bits only",
    Predictor.HESSIAN: "Σ Tr(H)/n·(Q(w) − w)², HAWQ-v2's Hutchinson Hessian trace (weights only)",
}
# Predictors whose tables are built only when asked (validate's baselines): the others always are.
ON_REQUEST = frozenset({Predictor.HESSIAN})


@dataclass(frozen=True)
class PredictorTables:
    """Every predictor per tensor and candidate choice: arrays [tensor, choice index], rows in
    ``names`` order, NaN where a choice is not a candidate; a configuration's prediction is a sum."""

    names: tuple[str, ...]
    bits: tuple[Choice, ...]  # the columns: bit widths and/or format names
    values: Mapping[Predictor, np.ndarray]

    def total(self, predictor: Predictor | str, config: Config) -> float:
        """What ``predictor`` says of ``config``: its table summed along the configuration."""
        table = self.values[Predictor(predictor)]
        merged = {**config.weight_bits, **config.activation_bits}
        col = {b: k for k, b in enumerate(self.bits)}
        return float(sum(table[row, col[merged[name]]] for row, name in enumerate(self.names) if name in merged))

    def predict(self, config: Config) -> dict[Predictor, float]:
        """What every predictor with a table says of ``config``."""
        return {p: self.total(p, config) for p in self.values}


def exact_elements(w: np.ndarray, grid: simulate.Grid, axis: int | None) -> np.ndarray:
    """Elements of ``w`` equal to 0 or to their slice's min or max that ``grid`` represents exactly
    (the grid noise model's unperturbed elements; a slice is the tensor, or a channel on ``axis``)."""
    other = tuple(k for k in range(w.ndim) if axis is None or k != axis)
    lo = w.min(axis=other, keepdims=True)
    hi = w.max(axis=other, keepdims=True)
    candidate = (w == 0) | (w == lo) | (w == hi)
    error = np.abs(simulate.quantize(w.astype(np.float64), grid) - w)
    return candidate & (error <= noise.EXACT_TOL * np.broadcast_to(grid.step, w.shape))


def _weight_cell(
    t: TensorScore, b: Choice, traces: engine.FisherTraces, simulator: simulate.Simulator
) -> dict[Predictor, float]:
    """The predictors that depend on the weight's own values for choice ``b`` (per tensor or channel)."""
    if traces.diag is None:
        raise InternalError("validate needs the diagonal Fisher (keep_gradients)")
    w = simulator.sim.weights[t.name].astype(np.float64)
    diag = np.asarray(traces.diag[t.name], np.float64).reshape(w.shape)
    if not isinstance(b, int):  # a named format: its own noise model (fitonnx.formats.fit)
        fmt, axis = simulator.weight_format(t.name, b)
        w32 = w.astype(np.float32)
        fit = fit_expected(fmt, w32, diag, axis)
        return {
            Predictor.FIT: fit,
            Predictor.FIT_GRID: fit,
            Predictor.NOISE_ONLY: 12.0 * float(noise_power(fmt, w32, axis).sum()),
            Predictor.FIT_MEASURED: fit_measured(fmt, w32, diag, axis),
            Predictor.WEIGHT_ERROR: fit_measured(fmt, w32, np.ones_like(diag), axis),
        }
    grid = simulator.weight_grid(t.name, b)
    step_sq = np.broadcast_to(np.square(grid.step), w.shape)
    err = simulator.quantized_weight(t.name, b).astype(np.float64) - w
    exact = exact_elements(w, grid, simulator.axes[t.name])
    return {
        # Per-channel Σ_c Tr(F_t,c)·Δ_c²/12 = Σ_j F_jj·Δ_j²/12; per tensor it is Tr(F_t)·Δ²/12.
        Predictor.FIT: (
            float(np.sum(diag * step_sq)) / 12.0 if grid.step.ndim else t.ef_trace * float(grid.step) ** 2 / 12
        ),
        Predictor.NOISE_ONLY: float(step_sq.sum()),
        Predictor.FIT_MEASURED: float(np.sum(diag * err * err)),
        Predictor.WEIGHT_ERROR: float(np.sum(err * err)),
        Predictor.FIT_GRID: float(np.sum(np.where(exact, 0.0, diag * step_sq))) / 12.0,
    }


def _activation_cell(
    t: TensorScore, b: Choice, j: int, traces: engine.FisherTraces, simulator: simulate.Simulator
) -> dict[Predictor, float]:
    """The activation's predictors for an integer choice ``b`` (column ``j`` of the point statistics)
    but the measured one, which comes from the error model."""
    points = traces.points
    if points is None:
        raise InternalError("validate needs point statistics (exact_points)")
    grid = simulator.activation_grid(t.name, b)
    step = float(grid.step)
    lo, hi = simulator.act_ranges[t.name]
    held = noise.unperturbed(
        float(points.zero[:, j].mean()),
        float(points.at_min[:, j].mean()),
        float(points.at_max[:, j].mean()),
        lo,
        hi,
        lambda v, grid=grid: noise.represented(v, float(grid.lo), float(grid.step), grid.levels),
    )
    return {
        Predictor.FIT: t.ef_trace * step**2 / 12.0,
        Predictor.FIT_GRID: (t.ef_trace - float(held)) * step**2 / 12.0,
        Predictor.NOISE_ONLY: t.numel * step**2,
    }


def predictor_tables(
    report: ScoreReport,
    traces: engine.FisherTraces,
    simulator: simulate.Simulator,
    errors: MeasuredErrors,
    weight_bits: Sequence[Choice],
    activation_bits: Sequence[Choice],
    output_space: Mapping[tuple[str, Choice], float],
) -> PredictorTables:
    """Each predictor per tensor and candidate choice (NaN where a choice is not a candidate)."""
    if traces.diag is None or traces.points is None:
        raise InternalError("validate needs the diagonal Fisher (keep_gradients) and point statistics (exact_points)")
    column = {t.name: j for j, t in enumerate(traces.tensors)}
    names = tuple(t.name for t in report.tensors)
    bits = sorted_choices([*weight_bits, *activation_bits])
    values = {p: np.full((len(names), len(bits)), np.nan) for p in Predictor if p not in ON_REQUEST}
    for row, t in enumerate(report.tensors):
        candidates = weight_bits if t.kind is Kind.WEIGHT else activation_bits
        for col, b in enumerate(bits):
            if b not in candidates:
                continue
            levels = 2.0 ** cost_bits(b) - 1.0
            cell = {
                Predictor.QUADRATIC: errors.quadratic[(t.name, b)],
                Predictor.OUTPUT_SPACE: output_space.get((t.name, b), 0.0),
                Predictor.TRACE_ONLY: t.ef_trace / levels**2,
                Predictor.SIZE_ONLY: t.numel / levels**2,
            }
            if t.kind is Kind.WEIGHT:
                cell |= _weight_cell(t, b, traces, simulator)
            elif (t.name, b) in errors.expected:  # a floating format: its noise model ran in the graph
                expected = errors.expected[(t.name, b)]
                cell |= {
                    Predictor.FIT: expected,
                    Predictor.FIT_GRID: expected,
                    Predictor.NOISE_ONLY: errors.noise[(t.name, b)],
                }
            else:
                cell |= _activation_cell(t, b, column[t.name], traces, simulator)
            if t.kind is Kind.ACTIVATION:
                cell[Predictor.FIT_MEASURED] = errors.diagonal[(t.name, b)]
                cell[Predictor.WEIGHT_ERROR] = cell[Predictor.NOISE_ONLY] / 12.0
            for p, v in cell.items():
                values[p][row, col] = v
    return PredictorTables(names, bits, values)
