"""``fitonnx validate``: measure real quantization damage and how well FIT predicts it.

Random mixed-precision configurations (plus uniform ones) are simulated in ONNX Runtime
(``fitonnx.simulate``) on held-out data; the damage each one does (KL of the outputs, change of
loss, accuracy) is ranked against FIT and against simple baselines, with bootstrap confidence
intervals over configurations.

Every predictor is additive over tensors, so each is a table [tensor, bit width] summed along a
configuration:

- ``fit``: Σ_t Tr(F_t)·Δ_t(b_t)²/12, the paper's FIT (per-channel weights: Σ_c Tr(F_t,c)·Δ_c²/12);
- ``fit_grid``: FIT with the grid noise model (``fitonnx.noise``): elements whose value is a level
  of the simulated grid at every width (0, min, max; per channel for per-channel weights) are not
  perturbed, Σ_t Tr_pert(F_t)·Δ_t(b_t)²/12;
- ``fit_measured``: FIT.md's refinement with the measured rounding error instead of Δ²/12:
  weights Σ_j F_jj·(Q_b(w)_j − w_j)² with the diagonal Fisher F_jj; activations
  (1/N)·Σ_i Σ_j (∂ℓ_i/∂a_ij)²·(Q_b(a_ij) − a_ij)², per calibration sample, since activation
  values (hence their errors) change from sample to sample;
- ``quadratic``: Σ_t e_tᵀ F e_t with the real rounding error e_t = Q_b(t) − t (per calibration
  sample for activations) and the full Fisher, (1/N)·Σ_i (∂ℓ_i/∂t · e_t)²: twice the second-order
  KL of each tensor's own quantization, with neither the trace nor a noise model (with
  ``FisherOptions(fisher="exact")`` it is exact in the labels; with MC one sampled label per sample);
- ``noise_only``: Σ_t numel_t·Δ_t(b_t)², the total squared rounding error, every element weighted alike;
- ``trace_only``: Σ_t Tr(F_t)/(2^b_t − 1)², sensitivity without the tensor's range;
- ``size_only``: Σ_t numel_t/(2^b_t − 1)², neither sensitivity nor range: only how many values
  lose how many bits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.analysis import simulate
from fitonnx.analysis.damage import (
    MEASURES,
    Damage,
    Reference,
    Reliability,
    damage,
    per_sample_measures,
    reference,
    reliability,
)
from fitonnx.analysis.simulate import Config, GridScheme
from fitonnx.errors import DataError, FitonnxError, InternalError
from fitonnx.files.atomic import write_atomic
from fitonnx.fisher import engine, losses
from fitonnx.fisher import session as api
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import PREFIX, OutputTarget
from fitonnx.fisher.options import FisherOptions
from fitonnx.model import data as data_mod
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.progress import Progress, as_progress
from fitonnx.score import noise
from fitonnx.score.fit import ScoreReport, build_report
from fitonnx.score.ranks import Correlation, rank_correlations
from fitonnx.score.run import provenance

DEFAULT_BITS: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
DEFAULT_CONFIGS = 100
DEFAULT_RESAMPLES = 1000
EVAL_SUFFIX = ".heldout.npz"
# Above this median KL (nats per held-out sample) the report says the configurations are outside
# the second-order regime: KL ≈ ½δᵀFδ holds for KL well below 1.
LARGE_KL = 1.0

PREDICTORS: dict[str, str] = {
    "fit": "FIT, Σ Tr(F)·Δ²/12 (the paper's uniform noise model)",
    "fit_grid": "FIT, grid noise model: elements at exact levels (0, min, max) unperturbed",
    "fit_measured": "Σ diag(F)·(Q(t) − t)², measured rounding error (FIT.md refinement)",
    "quadratic": "Σ eᵀFe, Fisher quadratic form of the real rounding error e (2·KL to second order)",
    "noise_only": "Σ numel·Δ², rounding noise without Fisher",
    "trace_only": "Σ Tr(F)/(2^b − 1)², Fisher trace without ranges",
    "size_only": "Σ numel/(2^b − 1)², tensor sizes and bits only",
}


@dataclass(frozen=True)
class ConfigResult:
    """One simulated configuration: its bit widths, what each predictor says and the measured damage."""

    weight_bits: Mapping[str, int]
    activation_bits: Mapping[str, int]
    uniform: bool
    fit: float
    fit_grid: float
    fit_measured: float
    quadratic: float
    noise_only: float
    trace_only: float
    size_only: float
    kl: float
    dloss: float | None
    accuracy: float | None


@dataclass(frozen=True)
class ValidationReport:
    """The result of ``fitonnx validate``."""

    model: str
    fisher: str
    likelihood: str
    output: str
    data_source: str
    samples: int
    eval_source: str
    eval_samples: int
    scheme: GridScheme
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    seed: int
    resamples: int
    float_loss: float | None
    float_accuracy: float | None
    configs: tuple[ConfigResult, ...]
    correlations: tuple[Correlation, ...]
    reliability: tuple[Reliability, ...] = ()
    notes: tuple[str, ...] = ()  # what the simulation could not do as asked (e.g. per channel)

    def correlation(self, predictor: str, measure: str) -> Correlation:
        for c in self.correlations:
            if c.predictor == predictor and c.measure == measure:
                return c
        raise FitonnxError(f"expected a predictor in {list(PREDICTORS)} and a measure in {self.measures}")

    @property
    def measures(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.measure for c in self.correlations))


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def sample_configs(
    weights: Sequence[str],
    activations: Sequence[str],
    weight_bits: Sequence[int],
    activation_bits: Sequence[int],
    n: int,
    seed: int,
    uniform: bool = True,
) -> tuple[tuple[Config, bool], ...]:
    """``n`` configurations with bits drawn uniformly per tensor, then (if asked) every tensor at b
    bits for each b both candidate lists share. Returns (configuration, is uniform) pairs."""
    rng = np.random.default_rng(seed)
    wb, ab = np.array(sorted(weight_bits)), np.array(sorted(activation_bits))
    out: list[tuple[Config, bool]] = []
    for _ in range(n):
        out.append(
            (
                Config(
                    weight_bits={w: int(rng.choice(wb)) for w in weights},
                    activation_bits={a: int(rng.choice(ab)) for a in activations},
                ),
                False,
            )
        )
    if uniform:
        for b in sorted(set(weight_bits) & set(activation_bits)):
            out.append((Config({w: b for w in weights}, {a: b for a in activations}), True))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Predictor tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ErrorOutputs:
    """Names of the second pass's per-sample outputs, per (tensor, bits)."""

    diagonal: Mapping[tuple[str, int], str]  # activations: Σ_j (g_j·e_j)²
    quadratic: Mapping[tuple[str, int], str]  # every tensor: (Σ_j g_j·e_j)²


def _error_model(
    gm: GradientModel,
    grids: Mapping[tuple[str, int], simulate.Grid],
    dtypes: Mapping[str, np.dtype],
    weight_errors: Mapping[tuple[str, int], np.ndarray],
) -> tuple[GradientModel, _ErrorOutputs]:
    """The gradient model plus float64 scalars per (tensor, bits) that need the real rounding error e:
    for activations (e per sample, from the simulation's fake quantizer: same ops, same float32
    arithmetic) Σ_j (∂ℓ/∂a_j·e_j)², and for every tensor (∂ℓ/∂t · e)², whose mean over samples (and
    labels) is eᵀFe, the Fisher quadratic form of that error (``weight_errors``: Q_b(w) − w)."""
    model = onnx.load_from_string(gm.model_bytes)
    g = model.graph
    grads = {t.name: grad for t, grad in zip(gm.tensors, gm.grad_outputs, strict=True)}
    n = helper.make_node
    diagonal: dict[tuple[str, int], str] = {}
    quadratic: dict[tuple[str, int], str] = {}
    for i, t in enumerate(gm.tensors):
        g64 = f"{PREFIX}merr{i}_g64"
        g.node.append(n("Cast", [grads[t.name]], [g64], to=TensorProto.DOUBLE))
        keys = sorted(key for key in (*grids, *weight_errors) if key[0] == t.name)
        for _, b in keys:
            p = f"{PREFIX}merr{i}_{b}_"
            if t.kind is Kind.WEIGHT:
                g.initializer.append(
                    numpy_helper.from_array(weight_errors[(t.name, b)].astype(np.float64), p + "err64")
                )
            else:
                grid, dtype = grids[(t.name, b)], dtypes[t.name]
                for suffix, value in (
                    ("zp", grid.zero_point),
                    ("step", grid.step),
                    ("levels", grid.levels),
                    ("zero", 0.0),
                ):
                    g.initializer.append(numpy_helper.from_array(np.array(value, dtype), p + suffix))
                g.node.extend(
                    [
                        n("Div", [t.name, p + "step"], [p + "scaled"]),
                        n("Round", [p + "scaled"], [p + "rounded"]),
                        n("Add", [p + "rounded", p + "zp"], [p + "shifted"]),
                        n("Clip", [p + "shifted", p + "zero", p + "levels"], [p + "q"]),
                        n("Sub", [p + "q", p + "zp"], [p + "centred"]),
                        n("Mul", [p + "centred", p + "step"], [p + "fq"]),
                        n("Sub", [p + "fq", t.name], [p + "err"]),
                        n("Cast", [p + "err"], [p + "err64"], to=TensorProto.DOUBLE),
                    ]
                )
            g.node.extend(
                [
                    n("Mul", [p + "err64", g64], [p + "weighted"]),
                    n("ReduceSum", [p + "weighted"], [p + "dot"], keepdims=0),
                    n("Mul", [p + "dot", p + "dot"], [p + "quad"]),
                ]
            )
            g.output.append(helper.make_tensor_value_info(p + "quad", TensorProto.DOUBLE, []))
            quadratic[(t.name, b)] = p + "quad"
            if t.kind is Kind.ACTIVATION:
                g.node.append(n("ReduceSumSquare", [p + "weighted"], [p + "out"], keepdims=0))
                g.output.append(helper.make_tensor_value_info(p + "out", TensorProto.DOUBLE, []))
                diagonal[(t.name, b)] = p + "out"
    return dataclasses.replace(gm, model_bytes=model.SerializeToString()), _ErrorOutputs(diagonal, quadratic)


@dataclass(frozen=True)
class PredictorTables:
    """Every predictor per tensor and candidate width: arrays [tensor, bit-width index], rows in
    ``names`` order, NaN where a width is not a candidate; a configuration's prediction is a sum."""

    names: tuple[str, ...]
    bits: tuple[int, ...]
    values: Mapping[str, np.ndarray]

    def total(self, predictor: str, config: Config) -> float:
        table = self.values[predictor]
        merged = {**config.weight_bits, **config.activation_bits}
        col = {b: k for k, b in enumerate(self.bits)}
        return float(sum(table[row, col[merged[name]]] for row, name in enumerate(self.names) if name in merged))


def _tables(
    report: ScoreReport,
    traces: engine.FisherTraces,
    simulator: simulate.Simulator,
    measured_acts: Mapping[tuple[str, int], float],
    quadratic: Mapping[tuple[str, int], float],
    weight_bits: Sequence[int],
    activation_bits: Sequence[int],
) -> PredictorTables:
    """Each predictor per tensor and candidate width (NaN where a width is not a candidate)."""
    if traces.diag is None or traces.points is None:
        raise InternalError("validate needs the diagonal Fisher (keep_gradients) and point statistics (exact_points)")
    points = traces.points
    column = {t.name: j for j, t in enumerate(traces.tensors)}
    names = tuple(t.name for t in report.tensors)
    bits = tuple(sorted(set(weight_bits) | set(activation_bits)))
    shape = (len(names), len(bits))
    values = {p: np.full(shape, np.nan) for p in PREDICTORS}
    for row, t in enumerate(report.tensors):
        candidates = weight_bits if t.kind is Kind.WEIGHT else activation_bits
        for col, b in enumerate(bits):
            if b not in candidates:
                continue
            levels = 2.0**b - 1.0
            values["quadratic"][row, col] = quadratic[(t.name, b)]
            values["trace_only"][row, col] = t.ef_trace / levels**2
            values["size_only"][row, col] = t.numel / levels**2
            if t.kind is Kind.WEIGHT:
                grid = simulator.weight_grid(t.name, b)
                w = simulator.sim.weights[t.name].astype(np.float64)
                diag = np.asarray(traces.diag[t.name], np.float64).reshape(w.shape)
                step_sq = np.broadcast_to(np.square(grid.step), w.shape)
                # Per-channel Σ_c Tr(F_t,c)·Δ_c²/12 = Σ_j F_jj·Δ_j²/12; per tensor it is Tr(F_t)·Δ²/12.
                values["fit"][row, col] = (
                    float(np.sum(diag * step_sq)) / 12.0 if grid.step.ndim else t.ef_trace * float(grid.step) ** 2 / 12
                )
                values["noise_only"][row, col] = float(step_sq.sum())
                err = simulator.quantized_weight(t.name, b).astype(np.float64) - w
                values["fit_measured"][row, col] = float(np.sum(diag * err * err))
                exact = _exact_elements(w, grid, simulator.axes[t.name])
                values["fit_grid"][row, col] = float(np.sum(np.where(exact, 0.0, diag * step_sq))) / 12.0
            else:
                grid = simulator.activation_grid(t.name, b)
                step = float(grid.step)
                values["fit"][row, col] = t.ef_trace * step**2 / 12.0
                j = column[t.name]
                lo, hi = simulator.act_ranges[t.name]
                held = noise.unperturbed(
                    float(points.zero[:, j].mean()),
                    float(points.at_min[:, j].mean()),
                    float(points.at_max[:, j].mean()),
                    lo,
                    hi,
                    lambda v, grid=grid: noise.represented(v, float(grid.lo), float(grid.step), grid.levels),
                )
                values["fit_grid"][row, col] = (t.ef_trace - float(held)) * step**2 / 12.0
                values["noise_only"][row, col] = t.numel * step**2
                values["fit_measured"][row, col] = measured_acts[(t.name, b)]
    return PredictorTables(names, bits, values)


def _exact_elements(w: np.ndarray, grid: simulate.Grid, axis: int | None) -> np.ndarray:
    """Elements of ``w`` equal to 0 or to their slice's min or max that ``grid`` represents exactly
    (the grid noise model's unperturbed elements; a slice is the tensor, or a channel on ``axis``)."""
    other = tuple(k for k in range(w.ndim) if axis is None or k != axis)
    lo = w.min(axis=other, keepdims=True)
    hi = w.max(axis=other, keepdims=True)
    candidate = (w == 0) | (w == lo) | (w == hi)
    error = np.abs(simulate.quantize(w.astype(np.float64), grid) - w)
    return candidate & (error <= noise.EXACT_TOL * np.broadcast_to(grid.step, w.shape))


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------


def _eval_dataset(s: api.Session, eval_data: str | os.PathLike[str] | Dataset | None) -> Dataset:
    if isinstance(eval_data, Dataset):
        dataset = eval_data
    elif eval_data is not None:
        dataset = data_mod.load_data(eval_data, list(s.specs))
    else:
        path = s.loaded.path
        candidate = None if path is None else path.with_name(path.stem + EVAL_SUFFIX)
        if candidate is None or not candidate.is_file():
            raise DataError(
                f"expected held-out data for {s.loaded.name}; found no --eval-data and no "
                f"{Path(s.loaded.name).stem}{EVAL_SUFFIX} beside it",
                hint="pass --eval-data heldout.npz (samples not used for calibration)",
            )
        dataset = data_mod.load_npz(candidate)
    data_mod.check_against(dataset, s.specs)
    return dataset


@dataclass(frozen=True)
class Harness:
    """Everything configurations are predicted and measured with: the Fisher pass's predictor
    tables, the simulator on the held-out data and the float reference (``harness``)."""

    session: api.Session
    target: OutputTarget
    fisher: losses.FisherMode
    samples: int
    held_out: Dataset
    scheme: GridScheme
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    weights: tuple[str, ...]
    activations: tuple[str, ...]
    simulator: simulate.Simulator
    tables: PredictorTables
    reference: Reference

    def measure(self, config: Config) -> Damage:
        """The damage ``config`` does on the held-out data."""
        return damage(self.reference, self.simulator.run(config))

    def predict(self, config: Config) -> dict[str, float]:
        """What every predictor says of ``config``."""
        return {p: self.tables.total(p, config) for p in PREDICTORS}


def harness(
    model: ModelSource,
    data: DataSource = None,
    eval_data: str | os.PathLike[str] | Dataset | None = None,
    *,
    weight_bits: Sequence[int] = DEFAULT_BITS,
    activation_bits: Sequence[int] = DEFAULT_BITS,
    per_channel: bool = False,
    symmetric: bool = False,
    options: FisherOptions | None = None,
    random_samples: int | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
    session: api.Session | None = None,
) -> Harness:
    """Run the calibration passes and build the simulator: the stage of ``validate`` before any
    configuration, for callers that measure configurations of their own.

    ``eval_data`` defaults to ``<model>.heldout.npz`` beside the model. The calibration pass runs
    twice (``progress`` sees both): once for traces and ranges, once more for the measured
    rounding errors, which need those ranges.
    """
    opts = options or FisherOptions()
    weight_bits, activation_bits = simulate.check_bits(weight_bits), simulate.check_bits(activation_bits)
    scheme = GridScheme(per_channel=per_channel, symmetric=symmetric)
    s = session if session is not None else api.open_model(model, data, random_samples=random_samples, seed=opts.seed)
    held_out = _eval_dataset(s, eval_data)

    gm, target, mode = api.gradient_model(s, opts, keep_gradients=True, exact_points=True)
    run_options = opts.run_options()
    traces = engine.run(gm, s.data, s.specs, run_options, progress)
    report = build_report(
        s.prepared.model,
        traces,
        provenance(s, target, mode),
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        resamples=0,
    )
    sim = simulate.build(s.prepared.model, s.tensors, target.tap, s.specs)
    act_ranges = {name: (traces.act_min[name], traces.act_max[name]) for name in traces.act_min}
    simulator = simulate.Simulator(sim, s.prepared.model, s.tensors, act_ranges, scheme, held_out, s.specs, batch_size)

    acts = tuple(t.name for t in s.tensors if t.kind is Kind.ACTIVATION)
    weights = tuple(t.name for t in s.tensors if t.kind is Kind.WEIGHT)
    grids = {(a, b): simulator.activation_grid(a, b) for a in acts for b in activation_bits}
    dtypes = {a.name: a.dtype for a in sim.activations}
    weight_errors = {
        (w, b): simulator.quantized_weight(w, b).astype(np.float64) - simulator.sim.weights[w].astype(np.float64)
        for w in weights
        for b in weight_bits
    }
    gm2, outs = _error_model(gm, grids, dtypes, weight_errors)
    extra_names = [*outs.diagonal.values(), *outs.quadratic.values()]
    second = engine.run(gm2, s.data, s.specs, run_options, progress, extra_outputs=extra_names)
    if second.extra is None:
        raise InternalError("engine returned no extra outputs")
    measured_acts = {key: float(second.extra[name].mean()) for key, name in outs.diagonal.items()}
    quadratic = {key: float(second.extra[name].mean()) for key, name in outs.quadratic.items()}
    tables = _tables(report, traces, simulator, measured_acts, quadratic, weight_bits, activation_bits)
    ref = reference(target, simulator.run(Config.floating()), held_out.labels, held_out.source)
    return Harness(
        session=s,
        target=target,
        fisher=mode,
        samples=traces.samples,
        held_out=held_out,
        scheme=scheme,
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        weights=weights,
        activations=acts,
        simulator=simulator,
        tables=tables,
        reference=ref,
    )


def validate(
    model: ModelSource,
    data: DataSource = None,
    eval_data: str | os.PathLike[str] | Dataset | None = None,
    *,
    configs: int = DEFAULT_CONFIGS,
    weight_bits: Sequence[int] = DEFAULT_BITS,
    activation_bits: Sequence[int] = DEFAULT_BITS,
    uniform: bool = True,
    per_channel: bool = False,
    symmetric: bool = False,
    options: FisherOptions | None = None,
    random_samples: int | None = None,
    batch_size: int = 256,
    resamples: int = DEFAULT_RESAMPLES,
    progress: Progress | None = None,
    session: api.Session | None = None,
) -> ValidationReport:
    """Simulate ``configs`` random mixed-precision configurations (plus uniform ones) on held-out
    data and rank FIT and baselines against the damage each one does (``harness`` explains the
    shared arguments; ``options.seed`` also draws the configurations and the bootstrap)."""
    if configs < 0:
        raise FitonnxError(f"expected a non-negative number of configurations; found {configs}")
    opts = options or FisherOptions()
    seed = opts.seed
    h = harness(
        model,
        data,
        eval_data,
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        per_channel=per_channel,
        symmetric=symmetric,
        options=opts,
        random_samples=random_samples,
        batch_size=batch_size,
        progress=progress,
        session=session,
    )
    sampled = sample_configs(h.weights, h.activations, h.weight_bits, h.activation_bits, configs, seed, uniform)
    results: list[ConfigResult] = []
    damages = []
    bar = as_progress(progress)
    bar.start(len(sampled), "Configurations")
    for config, is_uniform in sampled:
        d = h.measure(config)
        damages.append(d)
        results.append(
            ConfigResult(
                weight_bits=dict(config.weight_bits),
                activation_bits=dict(config.activation_bits),
                uniform=is_uniform,
                kl=d.kl,
                dloss=d.dloss,
                accuracy=d.accuracy,
                **h.predict(config),
            )
        )
        bar.advance(1)

    s, ref = h.session, h.reference
    return ValidationReport(
        model=s.loaded.name,
        fisher=h.fisher.value,
        likelihood=h.target.likelihood.value,
        output=h.target.output,
        data_source=s.data.source,
        samples=h.samples,
        eval_source=h.held_out.source,
        eval_samples=h.held_out.num_samples,
        scheme=h.scheme,
        weight_bits=h.weight_bits,
        activation_bits=h.activation_bits,
        seed=seed,
        resamples=resamples,
        float_loss=ref.loss,
        float_accuracy=ref.accuracy,
        configs=tuple(results),
        correlations=_correlations(results, ref.accuracy, resamples, seed),
        reliability=reliability(per_sample_measures(ref, damages), seed=seed) if len(results) >= 3 else (),
        notes=tuple(h.simulator.notes),
    )


def _correlations(
    results: Sequence[ConfigResult], float_accuracy: float | None, resamples: int, seed: int
) -> tuple[Correlation, ...]:
    if len(results) < 2:
        return ()
    measures: dict[str, np.ndarray] = {"kl": np.array([r.kl for r in results])}
    if all(r.dloss is not None for r in results):
        measures["dloss"] = np.array([r.dloss for r in results], np.float64)
    if float_accuracy is not None and all(r.accuracy is not None for r in results):
        measures["accuracy_drop"] = float_accuracy - np.array([r.accuracy for r in results], np.float64)
    predictors = {p: np.array([getattr(r, p) for r in results]) for p in PREDICTORS}
    return rank_correlations(predictors, measures, resamples, seed)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def to_dict(report: ValidationReport) -> dict[str, Any]:
    """The JSON report (schema in README.md); NaN (undefined correlation) is written as null."""
    corr: dict[str, dict[str, dict[str, Any]]] = {}
    for c in report.correlations:
        corr.setdefault(c.measure, {})[c.predictor] = {
            "spearman": _finite(c.spearman),
            "spearman_ci": [_finite(v) for v in c.spearman_ci],
            "kendall": _finite(c.kendall),
            "kendall_ci": [_finite(v) for v in c.kendall_ci],
        }
    return {
        "model": report.model,
        "fisher": report.fisher,
        "likelihood": report.likelihood,
        "output": report.output,
        "data": report.data_source,
        "samples": report.samples,
        "eval_data": report.eval_source,
        "eval_samples": report.eval_samples,
        "scheme": {"per_channel": report.scheme.per_channel, "symmetric": report.scheme.symmetric},
        "weight_bits": list(report.weight_bits),
        "activation_bits": list(report.activation_bits),
        "seed": report.seed,
        "resamples": report.resamples,
        "float": {"loss": report.float_loss, "accuracy": report.float_accuracy},
        "predictors": dict(PREDICTORS),
        "measures": {m: MEASURES[m] for m in report.measures},
        "configs": [
            {
                "weight_bits": dict(r.weight_bits),
                "activation_bits": dict(r.activation_bits),
                "uniform": r.uniform,
                **{p: getattr(r, p) for p in PREDICTORS},
                "kl": r.kl,
                "dloss": r.dloss,
                "accuracy": r.accuracy,
            }
            for r in report.configs
        ],
        "correlation": corr,
        "notes": list(report.notes),
        "reliability": {
            r.measure: {
                "split_half": _finite(r.split_half),
                "full": _finite(r.full),
                "ceiling": _finite(r.ceiling),
                "splits": r.splits,
            }
            for r in report.reliability
        },
    }


def write_json(report: ValidationReport, path: str | os.PathLike[str]) -> None:
    text = json.dumps(to_dict(report), indent=2) + "\n"
    write_atomic(path, lambda f: f.write(text))


def _cell(c: Correlation, which: Callable[[Correlation], tuple[float, tuple[float, float]]]) -> str:
    value, (lo, hi) = which(c)
    if not math.isfinite(value):
        return "n/a"
    ci = "" if not (math.isfinite(lo) and math.isfinite(hi)) else f" [{lo:+.2f},{hi:+.2f}]"
    return f"{value:+.3f}{ci}"


def format_report(report: ValidationReport) -> str:
    """The terminal summary: set-up, range of damage, and the correlation table."""
    n_uniform = sum(r.uniform for r in report.configs)
    lines = [
        f"{report.model}: {len(report.configs)} configurations ({len(report.configs) - n_uniform} random, "
        f"{n_uniform} uniform); weight bits {','.join(map(str, report.weight_bits))}, activation bits "
        f"{','.join(map(str, report.activation_bits))}; {report.scheme.describe()}",
        f"{report.fisher} Fisher ({report.likelihood} on {report.output!r}) from {report.samples} samples of "
        f"{report.data_source}; damage measured on {report.eval_samples} samples of {report.eval_source}",
    ]
    floats = []
    if report.float_loss is not None:
        floats.append(f"float loss {report.float_loss:.4g}")
    if report.float_accuracy is not None:
        floats.append(f"float accuracy {100 * report.float_accuracy:.2f}%")
    if report.configs:
        kl = np.array([r.kl for r in report.configs])
        floats.insert(0, f"KL from {kl.min():.3g} to {kl.max():.3g}")
    if floats:
        lines.append("; ".join(floats))
    lines += [f"note: {note}" for note in report.notes]
    median_kl = float(np.median([r.kl for r in report.configs])) if report.configs else 0.0
    if median_kl > LARGE_KL:
        lines.append(
            f"note: the median configuration moves the outputs by KL {median_kl:.3g} nats per sample, far beyond the small "
            "perturbations FIT's second-order model describes, so these correlations say little about FIT "
            "(try --per-channel or higher --bits)"
        )
    if not report.correlations:
        lines.append("too few configurations for rank correlations")
        return "\n".join(lines)
    measures = report.measures
    width = 30
    lines.append("")
    lines.append(f"Spearman ρ [95% bootstrap CI over configurations, {report.resamples} resamples]")
    head = f"{'predictor':<14}" + "".join(f"{m:>{width}}" for m in measures)
    lines += [head, "-" * len(head)]
    for p in PREDICTORS:
        cells = [_cell(report.correlation(p, m), lambda c: (c.spearman, c.spearman_ci)) for m in measures]
        lines.append(f"{p:<14}" + "".join(f"{cell:>{width}}" for cell in cells))
    lines.append("")
    lines.append("Kendall τ-b")
    lines += [head, "-" * len(head)]
    for p in PREDICTORS:
        cells = [_cell(report.correlation(p, m), lambda c: (c.kendall, c.kendall_ci)) for m in measures]
        lines.append(f"{p:<14}" + "".join(f"{cell:>{width}}" for cell in cells))
    if report.reliability:
        lines.append("")
        lines.append(
            f"Measurement reliability (rank agreement of two random halves of the held-out data, mean of "
            f"{report.reliability[0].splits} splits; whole set by Spearman–Brown; ceiling = √whole, about the "
            "most any predictor can show against this measurement)"
        )
        lines += [
            f"  {r.measure:<14} halves {r.split_half:+.3f}   whole {r.full:+.3f}   ceiling {r.ceiling:.3f}"
            for r in report.reliability
        ]
    lines.append("")
    lines += [f"  {p}: {d}" for p, d in PREDICTORS.items()]
    lines += [f"  {m}: {MEASURES[m]}" for m in measures]
    return "\n".join(lines)
