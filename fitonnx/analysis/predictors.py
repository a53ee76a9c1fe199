"""What ``validate`` ranks against the measured damage: the predictors, each a table [tensor, bits].

Most predictors are additive over tensors, so each is a table [tensor, bit width] summed along a
configuration; ``joint`` and ``joint_kl`` are not (they see the interactions between tensors'
errors, ``Projections``), and their tables hold each tensor's value alone:

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
- ``joint``: (1/N)·Σ_i (Σ_t ∂ℓ_i/∂t · e_t)², the Fisher quadratic form of the configuration's whole
  error vector: ``quadratic`` plus the cross terms between tensors (weights' rounding errors are
  deterministic, so they do not cancel). From per-sample projections s[i,t,b] = ∂ℓ_i/∂t·e_t(b) kept
  by the error pass (no extra pass); with enumerated outcomes (``Projections.enumerated``) it is
  Σ_i Σ_c p_ic·(Σ_t s[i,c,t,b_t])², twice the exact second-order KL;
- ``joint_kl``: the KL of the outputs moved by the configuration's linearised change,
  KL(softmax(log p) ‖ softmax(log p + Δz)) with Δz_c = −Σ_t s[i,c,t,b_t] (the centred logit shift:
  ∂ℓ_c = −∂ log p_c), beyond second order; needs every outcome enumerated (one categorical or
  Bernoulli distribution per sample), elsewhere ½·``joint``;
- ``joint_uniform``: ``joint`` with every sample's output distribution taken as uniform,
  (1/N)·Σ_i (1/K)·Σ_c (u_ic − ū_i)², u_ic = −Σ_t s[i,c,t,b_t] the linearised move of log p_ic and ū_i
  its mean over the K outcomes: the mean squared move of the centred logits, every sample and
  outcome weighted alike (the T → ∞ limit of the Fisher of softmax(z/T), scaled by T²). A
  confident model's Fisher puts almost all its weight p_ic(1 − p_ic) on the few calibration samples
  near the decision boundary (the PaddleOCR classifier: one of 64 lines holds 97%), so ``joint``
  estimates the cross terms from about one sample; this reads the direction of every sample's
  move. Needs every outcome enumerated, elsewhere it is ``joint``;
- ``superposed``: the KL of the float outputs against z + Σ_t Δz_t(b_t), each tensor's measured
  output shift alone on a few calibration samples (``superpose``): exact per tensor, its tensors'
  moves adding in the outputs, around each family's dearest uniform configuration (opt-in,
  ``harness(baselines=BaselineOptions(extras=Extras(superpose=True)))``: one run per tensor and state; where not measured
  it is ``joint_kl``);
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
from fitonnx.analysis.superpose import Superposition
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
    JOINT = "joint"
    JOINT_KL = "joint_kl"
    JOINT_UNIFORM = "joint_uniform"
    SUPERPOSED = "superposed"
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
    Predictor.JOINT: "(1/N)Σ_i (Σ_t ∇_t ℓ_i·e_t)², Fisher quadratic form of the whole error (tensors' cross terms)",
    Predictor.JOINT_KL: "KL of the outputs moved by the linearised change Σ_t J_t·e_t (every outcome; else joint/2)",
    Predictor.JOINT_UNIFORM: "(1/N)Σ_i var_c(Σ_t Δz_ict), joint with uniform output weights (centred logit move²)",
    Predictor.SUPERPOSED: "KL of the outputs moved by Σ_t Δz_t, each tensor's measured output shift alone (calibration)",
    Predictor.WEIGHT_ERROR: "Σ (Q(w) − w)², measured rounding error without Fisher (data-free, as NNCF)",
    Predictor.NOISE_ONLY: "Σ numel·Δ², rounding noise without Fisher",
    Predictor.TRACE_ONLY: "Σ Tr(F)/(2^b − 1)², Fisher trace without ranges",
    Predictor.SIZE_ONLY: "Σ numel/(2^b − 1)², tensor sizes and bits only",
    Predictor.HESSIAN: "Σ Tr(H)/n·(Q(w) − w)², HAWQ-v2's Hutchinson Hessian trace (weights only)",
}
# Predictors whose tables are built only when asked (validate's baselines): the others always are.
ON_REQUEST = frozenset({Predictor.HESSIAN})


NON_ADDITIVE = (Predictor.JOINT, Predictor.JOINT_KL, Predictor.JOINT_UNIFORM, Predictor.SUPERPOSED)


@dataclass(frozen=True)
class Projections:
    """Per calibration sample i and fed label k, each tensor's first-order change of the loss
    s[i,k,t,b] = ∂ℓ_ik/∂t · e_t(b) (rows and columns of ``PredictorTables``; 0 where b is not a
    candidate of t), with the labels' weights: one true or sampled label of weight 1, or every outcome
    c of the output with weight p_ic (``enumerated``: then −Σ_t s[i,c,t,b_t] is the linearised shift
    of log p_ic up to a constant, the output's whole first-order move)."""

    values: np.ndarray  # [N, K, T, B] float64
    weights: np.ndarray  # [N, K]
    enumerated: bool

    def summed(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        """Σ_t s[i,k,t,b_t] over the configuration's (row, column) pairs: [N, K]."""
        if not rows:
            return np.zeros(self.weights.shape)
        return self.values[:, :, list(rows), list(cols)].sum(axis=2)

    def quadratic(self, rows: Sequence[int], cols: Sequence[int]) -> float:
        """(1/N)·Σ_i Σ_k w_ik·(Σ_t s[i,k,t,b_t])²."""
        d = self.summed(rows, cols)
        return float(np.mean(np.sum(self.weights * d * d, axis=1)))

    def uniform(self, rows: Sequence[int], cols: Sequence[int]) -> float:
        """(1/N)·Σ_i (1/K)·Σ_k (d_ik − mean_k d_ik)², d = Σ_t s[i,k,t,b_t] (enumerated outcomes: the
        centred logits' move, every outcome weighted alike; else the labels' form, ``quadratic``)."""
        if not self.enumerated:
            return self.quadratic(rows, cols)
        d = self.summed(rows, cols)
        centred = d - d.mean(axis=1, keepdims=True)
        return float(np.mean(np.mean(centred * centred, axis=1)))

    def kl(self, rows: Sequence[int], cols: Sequence[int]) -> float:
        """Mean KL(p_i ‖ softmax(log p_i − Σ_t s_i)) over samples (enumerated outcomes; else ½·quadratic)."""
        if not self.enumerated:
            return 0.5 * self.quadratic(rows, cols)
        logp = np.log(np.maximum(self.weights, np.finfo(np.float64).tiny))
        z = logp - self.summed(rows, cols)
        logq = z - z.max(axis=1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(axis=1, keepdims=True))
        return float(np.mean(np.sum(self.weights * (logp - logq), axis=1)))


@dataclass(frozen=True)
class PredictorTables:
    """Every predictor per tensor and candidate choice: arrays [tensor, choice index], rows in
    ``names`` order, NaN where a choice is not a candidate; a configuration's prediction is a sum,
    but for ``NON_ADDITIVE`` predictors, which read ``projections`` (their tables: each tensor alone)."""

    names: tuple[str, ...]
    bits: tuple[Choice, ...]  # the columns: bit widths and/or format names
    values: Mapping[Predictor, np.ndarray]
    projections: Projections | None = None
    superposition: Superposition | None = None

    def cells(self, config: Config) -> tuple[list[int], list[int]]:
        """The (row, column) of every tensor ``config`` quantizes."""
        merged = {**config.weight_bits, **config.activation_bits}
        col = {b: k for k, b in enumerate(self.bits)}
        pairs = [(row, col[merged[name]]) for row, name in enumerate(self.names) if name in merged]
        return [r for r, _ in pairs], [c for _, c in pairs]

    def total(self, predictor: Predictor | str, config: Config) -> float:
        """What ``predictor`` says of ``config``: its table summed along the configuration (or, for
        a non-additive predictor, its value on the configuration's whole error)."""
        p = Predictor(predictor)
        if p is Predictor.SUPERPOSED:
            if self.superposition is not None:
                return self.superposition.kl(config)
            p = Predictor.JOINT_KL
        rows, cols = self.cells(config)
        if p in NON_ADDITIVE and self.projections is not None:
            if p is Predictor.JOINT:
                return self.projections.quadratic(rows, cols)
            if p is Predictor.JOINT_UNIFORM:
                return self.projections.uniform(rows, cols)
            return self.projections.kl(rows, cols)
        table = self.values[p]
        return float(sum(table[r, c] for r, c in zip(rows, cols, strict=True)))

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


@dataclass(frozen=True)
class NonAdditive:
    """What the non-additive predictors read beyond the error pass: enumerated projections and the
    measured superposition (each None when not computed)."""

    projections: Projections | None = None
    superposition: Superposition | None = None


def stack_projections(
    names: Sequence[str],
    bits: Sequence[Choice],
    per_key: Mapping[tuple[str, Choice], np.ndarray],
    weights: np.ndarray | None = None,
    enumerated: bool = False,
) -> Projections | None:
    """``Projections`` from per-(tensor, choice) arrays [N] (one label) or [N, K] (K labels with
    ``weights`` [N, K]); None when there are none."""
    if not per_key:
        return None
    first = np.asarray(next(iter(per_key.values())))
    n, k = first.shape[0], 1 if first.ndim == 1 else first.shape[1]
    values = np.zeros((n, k, len(names), len(bits)))
    row, col = {t: r for r, t in enumerate(names)}, {b: c for c, b in enumerate(bits)}
    for (t, b), v in per_key.items():
        if t in row and b in col:
            values[:, :, row[t], col[b]] = np.asarray(v, np.float64).reshape(n, k)
    w = np.ones((n, k)) if weights is None else np.asarray(weights, np.float64).reshape(n, k)
    return Projections(values, w, enumerated)


def predictor_tables(
    report: ScoreReport,
    traces: engine.FisherTraces,
    simulator: simulate.Simulator,
    errors: MeasuredErrors,
    weight_bits: Sequence[Choice],
    activation_bits: Sequence[Choice],
    output_space: Mapping[tuple[str, Choice], float],
    extra: NonAdditive | None = None,
) -> PredictorTables:
    """Each predictor per tensor and candidate choice (NaN where a choice is not a candidate).
    ``extra.projections`` (enumerated outcomes) replace the error pass's own per-sample projections;
    ``extra.superposition`` gives ``superposed`` (else it is ``joint_kl``)."""
    projections = None if extra is None else extra.projections
    superposition = None if extra is None else extra.superposition
    if traces.diag is None or traces.points is None:
        raise InternalError("validate needs the diagonal Fisher (keep_gradients) and point statistics (exact_points)")
    column = {t.name: j for j, t in enumerate(traces.tensors)}
    names = tuple(t.name for t in report.tensors)
    bits = sorted_choices([*weight_bits, *activation_bits])
    values = {p: np.full((len(names), len(bits)), np.nan) for p in Predictor if p not in ON_REQUEST}
    proj = projections if projections is not None else stack_projections(names, bits, errors.projections)
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
                Predictor.JOINT: errors.quadratic[(t.name, b)] if proj is None else proj.quadratic([row], [col]),
                Predictor.JOINT_KL: 0.5 * errors.quadratic[(t.name, b)] if proj is None else proj.kl([row], [col]),
                Predictor.JOINT_UNIFORM: errors.quadratic[(t.name, b)] if proj is None else proj.uniform([row], [col]),
            }
            alone = Config({t.name: b}, {}) if t.kind is Kind.WEIGHT else Config({}, {t.name: b})
            cell[Predictor.SUPERPOSED] = cell[Predictor.JOINT_KL] if superposition is None else superposition.kl(alone)
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
    return PredictorTables(names, bits, values, proj, superposition)
