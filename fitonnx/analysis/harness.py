"""The stage of ``validate`` before any configuration: calibration passes, simulator, predictor
tables and the float reference on held-out data, for callers that measure configurations of their own.

The calibration pass runs three times: once for traces and ranges, once more for the measured
rounding errors (``error_model``), which need those ranges, and once for the output-space
sensitivity (``output_space``), whose gradient model also taps every quantized op's outputs.
Baselines asked for (``Baseline``: HAWQ's Hessian trace, ``hessian``) run after them. Each stage's
cost (gradient passes, seconds) is kept, and each predictor's is the sum of the stages it needs.
When the output holds one small distribution per sample, it runs once more per outcome for the
``joint`` predictors' enumerated projections (``joint``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitonnx.analysis import choices, simulate
from fitonnx.analysis.choices import Choice, Family
from fitonnx.analysis.damage import Damage, Reference, damage, reference
from fitonnx.analysis.error_model import measure_errors
from fitonnx.analysis.hessian import HessianOptions, HessianTraces, hessian_traces
from fitonnx.analysis.hessian import table as hessian_table
from fitonnx.analysis.joint import enumerated_projections
from fitonnx.analysis.output_space import measure_output_space
from fitonnx.analysis.predictors import (
    NonAdditive,
    Predictor,
    PredictorTables,
    Projections,
    predictor_tables,
    stack_projections,
)
from fitonnx.analysis.simulate import Config, GridScheme
from fitonnx.analysis.superpose import MIN_SAMPLES as MIN_SUPERPOSE_SAMPLES
from fitonnx.analysis.superpose import Superposition, samples_within, superposition
from fitonnx.errors import DataError, FitonnxError, InternalError
from fitonnx.fisher import engine, losses, parallel
from fitonnx.fisher import session as api
from fitonnx.fisher.checks import check_traces
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.losses import OutputTarget
from fitonnx.fisher.options import FisherOptions
from fitonnx.formats import Format, parse_format
from fitonnx.formats.block_nodes import is_dynamic_block
from fitonnx.model import data as data_mod
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.progress import Progress, as_progress
from fitonnx.scale import Job, Pool, Workers, warm_up
from fitonnx.score.fit import ScoreReport, build_report
from fitonnx.score.run import provenance
from fitonnx.values import TextEnum

DEFAULT_BITS: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
DEFAULT_BATCH_SIZE = 256
MAX_CONFIGS_PER_TASK = 8  # configurations a worker measures per task at most (progress, balance)
EVAL_SUFFIX = ".heldout.npz"
EvalSource = str | os.PathLike[str] | Dataset | None


class Baseline(TextEnum):
    """Peers ``validate`` computes only when asked (``--baseline``): they cost many more passes."""

    HESSIAN = "hessian"  # HAWQ-v2's Hutchinson Hessian trace, ``Predictor.HESSIAN``


@dataclass(frozen=True)
class Extras:
    """Optional passes of the non-additive predictors.

    ``enumerate_outcomes``: the ``joint`` predictors' projections over every outcome of an output
    holding one small distribution per sample (one more pass per outcome), else the Fisher's labels;
    None (default): only with the exact Fisher, whose error pass sums the projections over classes.
    ``superpose``: measure each tensor's output shifts from each family's base on a few calibration
    samples (``superpose``: one simulation run per tensor, state and family) for the ``superposed``
    predictor (off by default: it costs about what the one-at-a-time baseline costs; without it
    ``superposed`` is ``joint_kl``).
    """

    enumerate_outcomes: bool | None = None
    superpose: bool = False


@dataclass(frozen=True)
class BaselineOptions:
    """Which expensive peers ``validate`` ranks too (none by default) and how: ``hessian`` holds the
    Hessian baseline's probes, step and samples. Strings are accepted for the baselines."""

    baselines: tuple[Baseline, ...] = ()
    hessian: HessianOptions = dataclasses.field(default_factory=HessianOptions)
    extras: Extras = dataclasses.field(default_factory=Extras)

    def __post_init__(self) -> None:
        try:
            asked = tuple(dict.fromkeys(Baseline(b) for b in self.baselines))
        except ValueError:
            raise FitonnxError(
                f"expected baselines among {[b.value for b in Baseline]}; found {list(self.baselines)}"
            ) from None
        object.__setattr__(self, "baselines", asked)


class Stage(TextEnum):
    """The passes of ``harness`` whose cost is kept."""

    CALIBRATION = "calibration"  # traces, diagonal Fisher, ranges
    ERRORS = "errors"  # measured rounding errors (``error_model``)
    OUTPUT_SPACE = "output_space"
    HESSIAN = "hessian"
    OUTCOMES = "outcomes"  # the joint predictors' projections over every outcome (``Extras``)
    SUPERPOSE = "superpose"  # each tensor's measured output shifts (simulation runs, no gradients)


@dataclass(frozen=True)
class Cost:
    """Forward+backward passes of a gradient graph (0: data-free) and the seconds they took."""

    passes: int
    seconds: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.passes + other.passes, self.seconds + other.seconds)


# The stages each predictor's table needs (predictors of weights only need no pass: data-free).
# Stages that run only when asked for (``Extras``); a predictor that may use one costs it only then.
OPTIONAL_STAGES = frozenset({Stage.OUTCOMES, Stage.SUPERPOSE})
PREDICTOR_STAGES: dict[Predictor, tuple[Stage, ...]] = {
    Predictor.FIT: (Stage.CALIBRATION,),
    Predictor.FIT_GRID: (Stage.CALIBRATION,),
    Predictor.TRACE_ONLY: (Stage.CALIBRATION,),
    Predictor.FIT_MEASURED: (Stage.CALIBRATION, Stage.ERRORS),
    Predictor.QUADRATIC: (Stage.CALIBRATION, Stage.ERRORS),
    Predictor.OUTPUT_SPACE: (Stage.CALIBRATION, Stage.OUTPUT_SPACE),
    Predictor.WEIGHT_ERROR: (),
    Predictor.NOISE_ONLY: (),
    Predictor.SIZE_ONLY: (),
    Predictor.HESSIAN: (Stage.HESSIAN,),
    Predictor.JOINT: (Stage.CALIBRATION, Stage.ERRORS, Stage.OUTCOMES),
    Predictor.JOINT_KL: (Stage.CALIBRATION, Stage.ERRORS, Stage.OUTCOMES),
    Predictor.JOINT_UNIFORM: (Stage.CALIBRATION, Stage.ERRORS, Stage.OUTCOMES),
    Predictor.SUPERPOSED: (Stage.CALIBRATION, Stage.ERRORS, Stage.OUTCOMES, Stage.SUPERPOSE),
}


@dataclass(frozen=True)
class SimulationOptions:
    """How configurations are simulated: candidate widths (or formats), the grids, held-out samples per run.

    With ``formats`` (names of ``fitonnx.formats`` or ``all``) the candidates are those formats,
    grouped in families (``choices.families``), and the bit widths and grid scheme are not used.
    ``weights_only`` keeps every activation in float.
    """

    weight_bits: Sequence[int] = DEFAULT_BITS
    activation_bits: Sequence[int] = DEFAULT_BITS
    per_channel: bool = False  # weights per output channel (activations are always per tensor)
    symmetric: bool = False  # max|x| grids for weights and activations (default: min/max)
    batch_size: int = DEFAULT_BATCH_SIZE
    formats: Sequence[str] = ()
    weights_only: bool = False

    @property
    def scheme(self) -> GridScheme:
        return GridScheme(per_channel=self.per_channel, symmetric=self.symmetric)

    def checked(self) -> SimulationOptions:
        """These options with the bit widths checked, sorted and deduplicated (and the formats parsed)."""
        checked = dataclasses.replace(
            self,
            weight_bits=simulate.check_bits(self.weight_bits),
            activation_bits=() if self.weights_only else simulate.check_bits(self.activation_bits),
            formats=tuple(self.formats),
        )
        checked.families()  # an unknown format fails here, before any work
        return checked

    def families(self) -> tuple[Family, ...]:
        """The families of candidates configurations are drawn from: one per format family, or the
        bit widths on the scheme's grid."""
        if self.formats:
            return choices.families(self.formats, self.weights_only)
        name = f"{'symmetric' if self.symmetric else 'minmax'}{'/ch' if self.per_channel else ''} bits"
        return (Family(name, tuple(self.weight_bits), tuple(self.activation_bits)),)


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
    weight_bits: tuple[Choice, ...]  # every candidate of every family
    activation_bits: tuple[Choice, ...]
    families: tuple[Family, ...]
    weights: tuple[str, ...]
    activations: tuple[str, ...]
    simulator: simulate.Simulator
    tables: PredictorTables
    reference: Reference
    traces: engine.FisherTraces  # the first pass's (diagonal Fisher, ranges), for callers' own predictors
    stages: dict[Stage, Cost] = dataclasses.field(default_factory=dict)
    hessian: HessianTraces | None = None  # with ``Baseline.HESSIAN``

    def cost(self, predictor: Predictor) -> Cost:
        """The passes and seconds ``predictor``'s table took (activations' data-free predictors
        read the calibration pass's ranges)."""
        if predictor not in PREDICTOR_STAGES:
            raise InternalError(f"expected a cost for every predictor; {predictor} has none in PREDICTOR_STAGES")
        needs = PREDICTOR_STAGES[predictor] or ((Stage.CALIBRATION,) if self.activation_bits else ())
        return sum((self.stages[k] for k in needs if k in self.stages or k not in OPTIONAL_STAGES), Cost(0, 0.0))

    # The error pass's per-sample projections with the Fisher's own labels (the tables may hold the
    # enumerated ones instead), for studies that compare the two.
    label_projections: Projections | None = None

    def measure(self, config: Config) -> Damage:
        """The damage ``config`` does on the held-out data."""
        return damage(self.reference, self.simulator.run(config))

    def predict(self, config: Config) -> dict[Predictor, float]:
        """What every predictor says of ``config``."""
        return self.tables.predict(config)


def _eval_dataset(s: api.Session, eval_data: EvalSource) -> Dataset:
    """The held-out data: given, loaded from a path, or ``<model>.heldout.npz`` beside the model."""
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
class _Calibration:
    """The first calibration pass: the gradient model, its target and Fisher mode, the traces, FIT."""

    gm: GradientModel
    target: OutputTarget
    mode: losses.FisherMode
    traces: engine.FisherTraces
    report: ScoreReport


def _calibrate(s: api.Session, opts: FisherOptions, sim: SimulationOptions, progress: Progress | None) -> _Calibration:
    """Traces with the diagonal Fisher and point statistics, and the FIT report of the candidates."""
    as_progress(progress).start(1, "Building the gradient model")  # closed by the samples' stage
    gm, target, mode = api.gradient_model(s, opts, keep_gradients=True, exact_points=True)
    traces = parallel.run(gm, s.data, s.specs, opts.run_options(), opts.workers, progress)
    traces = check_traces(traces, gm, {k: v for k, v in s.data.sample(0, s.specs).items() if k in s.specs})
    report = build_report(  # its traces and sizes feed the predictors; the widths do not matter here
        s.prepared.model,
        traces,
        provenance(s, target, mode, gm.head.targets),
        weight_bits=sim.weight_bits,
        activation_bits=sim.activation_bits or sim.weight_bits,
        resamples=0,
    )
    return _Calibration(gm, target, mode, traces, report)


def _simulator(s: api.Session, cal: _Calibration, sim: SimulationOptions, held_out: Dataset) -> simulate.Simulator:
    """The simulator of the loss's tap on the held-out data, activation grids from the calibration ranges."""
    traces = cal.traces
    act_ranges = {name: (traces.act_min[name], traces.act_max[name]) for name in traces.act_min}
    # Block quantizers need each activation's per-sample shape: the one the first sample showed.
    seen = traces.act_shapes
    tensors = [
        dataclasses.replace(t, shape=tuple(seen[t.name])) if t.kind is Kind.ACTIVATION and t.name in seen else t
        for t in cal.gm.tensors
    ]
    return simulate.Simulator(
        simulate.build(s.prepared.model, tensors, cal.target.tap, s.specs, _block_formats(sim)),
        s.prepared.model,
        tensors,
        act_ranges,
        sim.scheme,
        held_out,
        s.specs,
        sim.batch_size,
    )


def _block_formats(sim: SimulationOptions) -> tuple[Format, ...]:
    """The dynamic block formats (MX, NVFP4) among the activations' candidates: the simulation's block modes."""
    names = dict.fromkeys(c for f in sim.families() for c in f.activations if isinstance(c, str))
    return tuple(f for f in (parse_format(n) for n in names) if is_dynamic_block(f))


def harness(
    model: ModelSource,
    data: DataSource = None,
    eval_data: EvalSource = None,
    *,
    simulation: SimulationOptions | None = None,
    options: FisherOptions | None = None,
    progress: Progress | None = None,
    session: api.Session | None = None,
    baselines: BaselineOptions | None = None,
) -> Harness:
    """Run the calibration passes and build the simulator: the stage of ``validate`` before any
    configuration, for callers that measure configurations of their own.

    ``data`` is the calibration data (``RandomData(n)`` for a smoke test); ``eval_data`` defaults
    to ``<model>.heldout.npz`` beside the model. ``progress`` sees both calibration passes.
    ``baselines`` adds those peers' tables, and its ``extras`` the non-additive predictors' passes.
    """
    peers = baselines or BaselineOptions()
    opts = options or FisherOptions()
    ext = peers.extras
    sim = (simulation or SimulationOptions()).checked()
    if session is None:
        as_progress(progress).start(1, "Loading and preparing the model")
    warm_up(opts.workers)  # local workers start while the model is prepared
    s = session if session is not None else api.open_model(model, data, seed=opts.seed, max_samples=opts.max_samples)
    held_out = _eval_dataset(s, eval_data)
    if opts.output is None:  # the damage is measured on one output: the Fisher's loss reads that one
        opts = opts.replace(output=losses.pick_output(s.prepared.model, None))
    started = time.perf_counter()
    cal = _calibrate(s, opts, sim, progress)
    traces = cal.traces
    stages = {Stage.CALIBRATION: Cost(_passes(cal), time.perf_counter() - started)}
    simulator = _simulator(s, cal, sim, held_out)

    def second_pass(gm: GradientModel, extra: Sequence[str]) -> engine.FisherTraces:
        return parallel.run(gm, s.data, s.specs, opts.run_options(), opts.workers, progress, extra_outputs=extra)

    families = sim.families()
    weight_choices = choices.sorted_choices(c for f in families for c in f.weights)
    act_choices = choices.sorted_choices(c for f in families for c in f.activations)
    started = time.perf_counter()
    errors = measure_errors(cal.gm, simulator, weight_choices, act_choices, second_pass)
    stages[Stage.ERRORS] = Cost(_passes(cal), time.perf_counter() - started)
    started = time.perf_counter()
    out_space = measure_output_space(s, opts, simulator, (weight_choices, act_choices), second_pass)
    stages[Stage.OUTPUT_SPACE] = Cost(_passes(cal), time.perf_counter() - started)
    rows = (tuple(t.name for t in cal.report.tensors), choices.sorted_choices([*weight_choices, *act_choices]))
    started = time.perf_counter()
    enumerated = _enumerated(s, opts, cal, simulator, rows, (weight_choices, act_choices), progress, ext)
    if enumerated is not None:  # one pass per outcome
        stages[Stage.OUTCOMES] = Cost(cal.traces.samples * enumerated.weights.shape[1], time.perf_counter() - started)
    ref = reference(cal.target, simulator.run(Config.floating()), held_out.labels, held_out.source)
    started = time.perf_counter()
    superposed = _superposed(s, cal, sim, simulator, ref) if ext.superpose else None
    if superposed is not None:
        stages[Stage.SUPERPOSE] = Cost(0, time.perf_counter() - started)
    extra = NonAdditive(enumerated, superposed)
    tables = predictor_tables(cal.report, traces, simulator, errors, weight_choices, act_choices, out_space, extra)
    tables, hess = _with_hessian(s, cal, opts, peers, tables, stages, progress)
    return Harness(
        session=s,
        target=cal.target,
        fisher=cal.mode,
        samples=traces.samples,
        held_out=held_out,
        scheme=sim.scheme,
        weight_bits=weight_choices,
        activation_bits=act_choices,
        families=families,
        weights=tuple(t.name for t in cal.gm.tensors if t.kind is Kind.WEIGHT),
        activations=tuple(t.name for t in cal.gm.tensors if t.kind is Kind.ACTIVATION),
        simulator=simulator,
        tables=tables,
        reference=ref,
        traces=traces,
        stages=stages,
        hessian=hess,
        label_projections=stack_projections(*rows, errors.projections),
    )


def _with_hessian(
    s: api.Session,
    cal: _Calibration,
    opts: FisherOptions,
    peers: BaselineOptions,
    tables: PredictorTables,
    stages: dict[Stage, Cost],
    progress: Progress | None,
) -> tuple[PredictorTables, HessianTraces | None]:
    """``tables`` with HAWQ's Hessian table when ``peers`` asks for it (its cost into ``stages``)."""
    if Baseline.HESSIAN not in peers.baselines:
        return tables, None
    as_progress(progress).start(1, "Hutchinson Hessian trace (HAWQ baseline)")
    hess = hessian_traces(s, cal.target, opts, peers.hessian)
    as_progress(progress).advance(1)
    stages[Stage.HESSIAN] = Cost(hess.passes, hess.seconds)
    table = hessian_table(hess, tables.names, tables.values[Predictor.WEIGHT_ERROR])
    return dataclasses.replace(tables, values={**tables.values, Predictor.HESSIAN: table}), hess


def _passes(cal: _Calibration) -> int:
    """Forward+backward passes of one pass over the calibration samples (the exact Fisher: one per class)."""
    per_sample = _classes(cal) if cal.mode is losses.FisherMode.EXACT else 1
    return cal.traces.samples * per_sample


def _classes(cal: _Calibration) -> int:
    if cal.target.likelihood is losses.Likelihood.BERNOULLI:  # one probability: labels 0 and 1
        return 2
    shapes = cal.gm.sample_shapes
    tap, axis = cal.target.tap, cal.target.class_axis
    return int(shapes[tap][axis]) if tap in shapes and axis is not None else 1


def _enumerated(
    s: api.Session,
    opts: FisherOptions,
    cal: _Calibration,
    simulator: simulate.Simulator,
    rows: tuple[Sequence[str], Sequence[Choice]],
    choices_: tuple[Sequence[Choice], Sequence[Choice]],
    progress: Progress | None,
    ext: Extras,
) -> Projections | None:
    """The ``joint`` predictors' projections over every outcome of the output (``joint``), when
    ``ext`` asks for them (by default only with the exact Fisher)."""
    wanted = cal.mode is losses.FisherMode.EXACT if ext.enumerate_outcomes is None else ext.enumerate_outcomes
    if not wanted:
        return None

    def run_on(gm: GradientModel, data: Dataset, extra: Sequence[str]) -> engine.FisherTraces:
        return parallel.run(gm, data, s.specs, opts.run_options(), opts.workers, progress, extra_outputs=extra)

    return enumerated_projections(s, opts, cal.gm, simulator, rows, choices_, run_on)


def _superposed(
    s: api.Session,
    cal: _Calibration,
    sim: SimulationOptions,
    held: simulate.Simulator,
    ref: Reference,
) -> Superposition | None:
    """Each family's base and every simulated tensor's shifts from it, on calibration samples spread
    over the data (as many as ``superpose.MAX_BYTES`` allow; None below ``superpose.MIN_SAMPLES``)."""
    names = [t.name for t in cal.report.tensors]
    weights = [n for n in names if n in held.sim.weights]
    acts = [n for n in names if n in held.act_ranges]
    families = sim.families()
    cells = sum(
        len(weights) * len(f.weights) + (len(acts) * len(f.activations) if f.activations else 0) for f in families
    )
    per_sample = int(ref.out.size // max(1, ref.out.shape[0]))
    n = samples_within(per_sample, cells, s.data.num_samples)
    if n < MIN_SUPERPOSE_SAMPLES:
        return None
    calib = _spread(s.data, n)
    simulator = _simulator(s, cal, sim, calib)
    return superposition(simulator, lambda z: reference(cal.target, z, None, calib.source), families, (weights, acts))


def _spread(d: Dataset, n: int) -> Dataset:
    """``n`` samples of ``d`` evenly spaced over it (calibration data in stream order, as a VAD's
    chunks, is not alike from start to end)."""
    pick = np.linspace(0, d.num_samples - 1, n).round().astype(np.int64)
    labels = None if d.labels is None else d.labels[pick]
    return Dataset({k: v[pick] for k, v in d.arrays.items()}, labels, f"{d.source} ({n} spread)", d.synthetic)


def _measure_setup(context: tuple[simulate.Simulator, Reference]) -> tuple[simulate.Simulator, Reference]:
    return context  # the simulator opened its session as it arrived (``Simulator.__reduce__``)


def _measure_work(state: tuple[simulate.Simulator, Reference], configs: Sequence[Config]) -> list[Damage]:
    simulator, ref = state
    return [damage(ref, simulator.run(config)) for config in configs]


def measure_all(
    h: Harness, configs: Sequence[Config], workers: Workers | None = None, on_done: Callable[[int], None] | None = None
) -> list[Damage]:
    """``h.measure`` of every configuration, in order; on ``workers`` (each gets the simulator and the
    float reference once) when they are parallel. ``on_done(n)``: n more configurations measured."""
    tell = on_done or (lambda n: None)
    if workers is None or not workers.parallel:
        out = []
        for config in configs:
            out.append(h.measure(config))
            tell(1)
        return out
    with Pool(workers, Job((h.simulator, h.reference), _measure_setup, _measure_work)) as pool:
        size = max(1, min(MAX_CONFIGS_PER_TASK, math.ceil(len(configs) / (4 * pool.slots))))
        tasks = [tuple(configs[a : a + size]) for a in range(0, len(configs), size)]
        return [d for part in pool.ordered(tasks, on_done=lambda k: tell(len(tasks[k]))) for d in part]
