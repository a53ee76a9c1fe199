"""FIT per tensor and bit width, totals of uniform configurations, and how stable the ranking is."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from fitonnx.errors import InternalError
from fitonnx.fisher.engine import FisherTraces, StopReason
from fitonnx.model import external
from fitonnx.model.graph import Kind, QuantTensor
from fitonnx.score import noise
from fitonnx.score.formats_fit import FormatFit
from fitonnx.score.noise import NoiseModel
from fitonnx.score.ranks import kendall

DEFAULT_WEIGHT_BITS: tuple[int, ...] = (2, 3, 4, 8)
DEFAULT_ACTIVATION_BITS: tuple[int, ...] = (8, 16)


@dataclass(frozen=True)
class TensorScore:
    """One report row: a quantizable tensor's Fisher trace, range and FIT per bit width."""

    name: str
    kind: Kind
    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    shape: tuple[int, ...]
    numel: int
    ef_trace: float
    ef_trace_se: float
    min: float
    max: float
    fit: Mapping[int, float]
    share: float  # of the total FIT; the same at every bit width, since Δ(b)² scales all tensors alike
    # Grid noise model only: mean Fisher mass of the elements equal to 0, to min and to max
    # (engine.PointTraces), so a target with another grid can tell which of them it keeps exact.
    point_mass: PointMass | None = None
    # ``score --format``: this tensor under each requested format that applies to it, by format name.
    formats: Mapping[str, FormatFit] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class PointMass:
    """(1/N)·Σ_i ‖g_i ⊙ 1[t_i = v]‖² for v = 0, the tensor's min and its max."""

    zero: float
    at_min: float
    at_max: float


@dataclass(frozen=True)
class Stability:
    """Bootstrap agreement of the FIT ranking with itself (Kendall τ over resampled samples)."""

    resamples: int
    kendall_tau_mean: float
    kendall_tau_p05: float
    top_k: int
    top_k_same: float  # fraction of resamples whose top-k set equals the full-data top-k


@dataclass(frozen=True)
class ScoreReport:
    """The result of ``fitonnx score``."""

    model: str
    fisher: str
    likelihood: str
    output: str
    samples: int
    stop_reason: StopReason
    data_source: str
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    tensors: tuple[TensorScore, ...]  # sorted by FIT, most sensitive first
    total_fit: Mapping[int, float]  # every tensor at b bits
    uniform: tuple[tuple[int, int, float], ...]  # (weight bits, activation bits, total FIT)
    total_trace_rel_se: float
    stability: Stability | None
    noise_model: str = NoiseModel.UNIFORM.value
    notes: tuple[str, ...] = ()  # what the user must know about the scored twin (e.g. an untaken If branch)
    engine: str = ""  # the gradient engine, the device its session ran on, and samples per run
    device: str = "cpu"
    batch_size: int = 1
    batch_note: str = ""  # why the run was at batch 1 though a larger batch was asked for
    formats: tuple[str, ...] = ()  # ``score --format``: the formats scored, in the order asked
    format_totals: Mapping[str, float] = dataclasses.field(default_factory=dict)  # Σ over tensors it applies to

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.weight_bits) | set(self.activation_bits)))

    def tensor(self, name: str) -> TensorScore:
        return next(t for t in self.tensors if t.name == name)


def weight_ranges(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    wanted = set(names)
    return {
        t.name: (float(a.min()), float(a.max()))
        for t in model.graph.initializer
        if t.name in wanted and (a := external.tensor_array(t)).size
    }


def stability(
    per_sample: np.ndarray, scale: np.ndarray, resamples: int = 200, seed: int = 0, top_k: int = 5
) -> Stability | None:
    """Resample calibration samples with replacement and compare the FIT ranking each time."""
    n, t = per_sample.shape
    if n < 2 or t < 2:
        return None
    rng = np.random.default_rng(seed)
    full = per_sample.mean(axis=0) * scale
    k = min(top_k, max(1, t // 2))  # a top-k that is the whole list would be trivially stable
    top = set(np.argsort(-full)[:k].tolist())
    taus, same = [], 0
    for _ in range(resamples):
        boot = per_sample[rng.integers(0, n, n)].mean(axis=0) * scale
        taus.append(kendall(full, boot))
        same += set(np.argsort(-boot)[:k].tolist()) == top
    taus_arr = np.array(taus)
    return Stability(resamples, float(taus_arr.mean()), float(np.quantile(taus_arr, 0.05)), k, same / resamples)


def _point_mass(traces: FisherTraces, j: int) -> PointMass:
    points = traces.points
    if points is None:
        raise InternalError("the grid noise model needs the engine's point statistics (exact_points)")
    return PointMass(
        float(points.zero[:, j].mean()), float(points.at_min[:, j].mean()), float(points.at_max[:, j].mean())
    )


def perturbed_traces(traces: FisherTraces, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Per-sample traces [samples, tensors] of the elements the min/max grid at ``bits`` perturbs
    (the grid noise model; ``lo``/``hi`` per tensor, as the grid's end points)."""
    points = traces.points
    if points is None:
        raise InternalError("the grid noise model needs the engine's point statistics (exact_points)")
    out = traces.per_sample.copy()
    for j in range(out.shape[1]):
        a, b = float(lo[j]), float(hi[j])
        out[:, j] -= noise.unperturbed(
            points.zero[:, j],
            points.at_min[:, j],
            points.at_max[:, j],
            a,
            b,
            lambda v, a=a, b=b: noise.on_asymmetric_grid(v, a, b, bits),
        )
    return out


@dataclass(frozen=True)
class Provenance:
    """Where a report came from: the model, how its Fisher was estimated, and on which data."""

    model: str
    fisher: str
    likelihood: str
    output: str
    data_source: str


def build_report(
    model: onnx.ModelProto,
    traces: FisherTraces,
    provenance: Provenance,
    *,
    weight_bits: Sequence[int] = DEFAULT_WEIGHT_BITS,
    activation_bits: Sequence[int] = DEFAULT_ACTIVATION_BITS,
    resamples: int = 200,
    noise_model: NoiseModel | str = NoiseModel.UNIFORM,
) -> ScoreReport:
    """Combine traces with the noise model into the ranked FIT report.

    ``noise_model`` GRID needs ``traces.points`` (``exact_points`` in the gradient model)."""
    kind = NoiseModel(noise_model)
    tensors: Sequence[QuantTensor] = traces.tensors
    w_ranges = weight_ranges(model, [t.name for t in tensors if t.kind is Kind.WEIGHT])
    trace, se = traces.trace(), traces.trace_se()
    bits = sorted(set(weight_bits) | set(activation_bits))
    lo = np.array([w_ranges[t.name][0] if t.kind is Kind.WEIGHT else traces.act_min[t.name] for t in tensors])
    hi = np.array([w_ranges[t.name][1] if t.kind is Kind.WEIGHT else traces.act_max[t.name] for t in tensors])
    if kind is NoiseModel.GRID:
        perturbed = {b: perturbed_traces(traces, lo, hi, b) for b in bits}
        fits = {b: noise.fit(perturbed[b].mean(axis=0), lo, hi, b) for b in bits}
        stability_samples = perturbed[bits[0]]
    else:
        fits = {b: noise.fit(trace, lo, hi, b) for b in bits}
        stability_samples = traces.per_sample
    totals = {b: float(fits[b].sum()) for b in bits}
    is_w = np.array([t.kind is Kind.WEIGHT for t in tensors])
    uniform = tuple(
        (bw, ba, float(fits[bw][is_w].sum() + fits[ba][~is_w].sum())) for bw in weight_bits for ba in activation_bits
    )
    rows = []
    for j, t in enumerate(tensors):
        shape = tuple(t.shape) if t.kind is Kind.WEIGHT else tuple(traces.act_shapes.get(t.name, t.shape or ()))
        rows.append(
            TensorScore(
                name=t.name,
                kind=t.kind,
                nodes=t.nodes,
                op_types=t.op_types,
                shape=shape,
                numel=int(np.prod(shape, dtype=np.int64)),
                ef_trace=float(trace[j]),
                ef_trace_se=float(se[j]),
                min=float(lo[j]),
                max=float(hi[j]),
                fit={b: float(fits[b][j]) for b in bits},
                share=float(fits[bits[0]][j] / totals[bits[0]]) if totals[bits[0]] > 0 else 0.0,
                point_mass=_point_mass(traces, j) if kind is NoiseModel.GRID else None,
            )
        )
    order = np.argsort(-fits[bits[0]], kind="stable")
    totals_ps = traces.per_sample.sum(axis=1)
    n = traces.samples
    rel_se = (
        float(totals_ps.std(ddof=1) / np.sqrt(n) / totals_ps.mean()) if n > 1 and totals_ps.mean() > 0 else float("nan")
    )
    return ScoreReport(
        **dataclasses.asdict(provenance),
        samples=n,
        stop_reason=traces.stop_reason,
        weight_bits=tuple(weight_bits),
        activation_bits=tuple(activation_bits),
        tensors=tuple(rows[i] for i in order),
        total_fit=totals,
        uniform=uniform,
        total_trace_rel_se=rel_se,
        stability=stability(stability_samples, (hi - lo) ** 2, resamples=resamples) if resamples else None,
        noise_model=kind.value,
        engine=traces.engine,
        device=traces.device,
        batch_size=traces.batch_size,
        batch_note=traces.batch_note,
    )
