"""The public Python API: each subcommand of the CLI is one call here.

The stages below hold the work (see docs/architecture.md); this module only strings them
together the way a command does, so that scripts and the CLI get the same results.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fitonnx.allocate import knapsack as allocate
from fitonnx.allocate.formats_alloc import (
    FormatOptions,
    allocate_formats,
    least_storage,
    requested_activation_formats,
    requested_formats,
)
from fitonnx.allocate.knapsack import AllocationOptions, Budget, BudgetKind, Objective, budget_from
from fitonnx.analysis.compare import CompareReport, compare
from fitonnx.analysis.inspection import Inspection, inspect_model
from fitonnx.analysis.refine import Refinement, Rework, check_refine, rework_allocation
from fitonnx.analysis.validate import ValidationReport, validate
from fitonnx.errors import FitonnxError
from fitonnx.export import export_recommendation
from fitonnx.export.bundle import PARETO_CSV, PARETO_JSON, PARETO_PNG, Written, prepare_out_dir, write_outputs
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import Session, fisher_traces, gradient_model, inspect_tensors, open_model
from fitonnx.formats import Format
from fitonnx.model.data import check_against
from fitonnx.model.graph import Kind, input_specs
from fitonnx.model.source import (
    RANDOM_CALIBRATION,
    DataSource,
    ModelSource,
    RandomData,
    RandomDataWarning,
    load_source,
    resolve_data,
)
from fitonnx.model.sources.build import BuildOptions, DataKind, build
from fitonnx.model.sources.common import Built, write_npz
from fitonnx.model.sources.script import LoaderScript
from fitonnx.progress import Progress, as_progress
from fitonnx.render import pareto
from fitonnx.render.plot import MISSING_MATPLOTLIB
from fitonnx.scale import warm_up
from fitonnx.score import noise
from fitonnx.score.fit import DEFAULT_ACTIVATION_BITS, DEFAULT_WEIGHT_BITS, ScoreReport
from fitonnx.score.formats_fit import FormatFit, format_fits, plan_statistics, target_formats, weight_fits
from fitonnx.score.run import score_session

export = export_recommendation
inspect = inspect_model

__all__ = [
    "AllocationOptions",
    "Budget",
    "BudgetKind",
    "BuildOptions",
    "Built",
    "CompareReport",
    "DataKind",
    "DataSource",
    "FormatFit",
    "FormatOptions",
    "Inspection",
    "LoaderScript",
    "ModelSource",
    "RandomData",
    "RandomDataWarning",
    "RecommendResult",
    "ScoreReport",
    "Session",
    "ValidationReport",
    "budget_from",
    "build_data",
    "compare",
    "export",
    "fisher_traces",
    "format_fits",
    "gradient_model",
    "inspect",
    "inspect_tensors",
    "open_model",
    "plan_statistics",
    "recommend",
    "resolve_data",
    "score",
    "target_formats",
    "validate",
]


def score(
    model: ModelSource | Session,
    data: DataSource = None,
    *,
    options: FisherOptions | None = None,
    weight_bits: Sequence[int] = DEFAULT_WEIGHT_BITS,
    activation_bits: Sequence[int] = DEFAULT_ACTIVATION_BITS,
    noise_model: noise.NoiseModel | str = noise.NoiseModel.UNIFORM,
    formats: Sequence[Format | str] = (),
    progress: Progress | None = None,
) -> ScoreReport:
    """Fisher traces and FIT for every quantizable weight and activation of ``model`` (a path, a
    model, or a ``Session`` from ``open_model``, whose data is then used), per bit width and per
    number format in ``formats`` (``int4/ch``, ``fp8e4m3``, ``nvfp4/16``; ``target_formats(name)``
    gives a toolchain's). ``options``: how the Fisher is estimated; ``noise_model``: ``uniform``
    (the paper) or ``grid`` (``fitonnx.score.noise``). ``data`` may be ``RandomData(n)``."""
    opts = options or FisherOptions()
    if isinstance(model, Session):
        s = model
    else:
        as_progress(progress).start(1, "Loading and preparing the model")
        warm_up(opts.workers)  # local workers start while the model is prepared
        s = open_model(model, data, seed=opts.seed, max_samples=opts.max_samples)
    return score_session(
        s, options=opts, weight_bits=weight_bits, activation_bits=activation_bits, noise_model=noise_model,
        formats=formats, progress=progress,
    )  # fmt: skip


@dataclass(frozen=True)
class RecommendResult:
    """What ``recommend`` chose (``allocation``), the FIT report it used, the files it wrote, and
    with ``refine`` > 1 the candidates measured on the calibration data (and a note on them)."""

    allocation: allocate.Allocation
    report: ScoreReport
    written: Written | None
    refinement: Refinement | None = None
    refine_note: str | None = None


def build_data(
    model: ModelSource,
    inputs: str | os.PathLike[str],
    *,
    kind: DataKind | str | None = None,
    options: BuildOptions | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Built:
    """Calibration data for ``model`` from a folder of images or WAV files, or a text file of lines
    (``kind`` None: told by the files), shaped after the model's inputs and checked against them; with
    ``out``, also written as the .npz that ``--data`` reads. ``fitonnx.model.sources.common.preview``
    describes the result."""
    loaded = load_source(model)
    specs = input_specs(loaded.proto)
    built = build(specs, inputs, kind, options, loaded.path)
    check_against(built.dataset, specs)
    if out is not None:
        write_npz(built.dataset, out)
    return built


def recommend(
    model: ModelSource,
    data: DataSource = None,
    *,
    budget: allocate.Budget,
    choices: allocate.AllocationOptions | FormatOptions | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    options: FisherOptions | None = None,
    noise_model: noise.NoiseModel | str = noise.NoiseModel.UNIFORM,
    progress: Progress | None = None,
) -> RecommendResult:
    """Per-tensor bit widths under ``budget`` (``allocate.budget_from(avg_bits=..., size_kb=... or
    max_fit=...)``) among ``choices``, and, with ``out_dir``, every output of ``fitonnx recommend``
    written there. ``options``: how the Fisher is estimated; ``noise_model``: as in ``score``, with
    the grid model judged on the target's own grids (``targets.Target.represents``).

    With ``FormatOptions`` as ``choices`` it chooses per-tensor FORMATS of the target's menu
    (per channel, per block, FP8, ...) with their exact storage costs instead (``formats_alloc``).

    ``AllocationOptions(objective="output_space")`` has the knapsack minimise ModelOpt's output-space
    score (one more calibration pass) instead of FIT; ``AllocationOptions(refine=K)`` simulates the knapsack's
    answer and its K − 1 best-predicted neighbours (at most two weights changed, same budget) on the
    calibration data and keeps a measurably less damaging one (``analysis.refine``): K simulations,
    for the tensors' interactions an additive score misses.

    Every option and the output folder are checked before any work."""
    choices = choices or allocate.AllocationOptions()
    tgt = choices.check()
    by_format = isinstance(choices, FormatOptions)
    rework = Rework() if by_format else Rework(Objective(choices.objective), choices.refine)
    widths = () if by_format else (choices.weight_bits or tgt.weight_bits)
    check_refine(rework.refine, tgt, widths, by_format, rework.objective, budget)
    if by_format and noise.NoiseModel(noise_model) is not noise.NoiseModel.UNIFORM:
        raise FitonnxError("expected --noise-model uniform with --formats; the grid model is for bit widths")
    opts = options or FisherOptions()
    as_progress(progress).start(1, "Loading and preparing the model")
    s = open_model(model, data, seed=opts.seed, max_samples=opts.max_samples)
    if isinstance(choices, FormatOptions):
        least, total = least_storage(s.prepared.model, s.tensors, choices)
        allocate.check_least(budget, least, total, allocate.SMALLEST_FORMATS)
    else:
        lowest = min(choices.weight_bits or tgt.weight_bits)
        allocate.check_budget(budget, [t.numel or 0 for t in s.tensors if t.kind is Kind.WEIGHT], lowest)
    out = None if out_dir is None else prepare_out_dir(out_dir, s.loaded.path, s.loaded.name)
    report = score_session(
        s,
        options=opts,
        weight_bits=tgt.weight_bits,
        activation_bits=tgt.activation_bits,
        noise_model=noise_model,
        formats=requested_formats(tgt, choices.weight_formats) if by_format else (),
        progress=progress,
        activation_formats=requested_activation_formats(choices) if isinstance(choices, FormatOptions) else None,
    )
    alloc = _allocate(s, report, budget, choices)
    refinement, refine_note = None, None
    if rework.active:
        alloc, refinement, refine_note = rework_allocation(s, alloc, opts, rework, progress)
    if out is not None and s.data.synthetic:
        warnings.warn(RANDOM_CALIBRATION, RandomDataWarning, stacklevel=2)  # the bundle's QDQ models
    written = (
        None
        if out is None
        else write_outputs(
            alloc,
            s.loaded.proto,
            out,
            source=s.loaded.path,
            data=s.data,
            formats=(tgt.format_exports or tgt.formats) if by_format else None,
            origin_of=s.prepared.origin_of,
            front=_write_front,
        )
    )
    return RecommendResult(alloc, report, written, refinement, refine_note)


def _allocate(
    s: Session, report: ScoreReport, budget: Budget, choices: allocate.AllocationOptions | FormatOptions
) -> allocate.Allocation:
    """The bit-width allocation, or the format allocation from each weight's FIT per format (scored
    with the report, in the same Fisher pass: ``score_session(formats=...)``)."""
    if isinstance(choices, FormatOptions):
        per_format = {(t.name, name): fit for t in report.tensors for name, fit in t.formats.items()}
        fits = weight_fits(per_format, s.prepared.model)
        if not fits:
            raise FitonnxError(f"expected quantizable weights with gradients in {report.model}; found none")
        return allocate_formats(report, s.prepared.model, fits, budget, choices)
    return allocate.allocate(
        report,
        choices.check(),
        budget,
        weight_bits=choices.weight_bits,
        act_bits=choices.act_bits,
        act_avg_bits=choices.act_avg_bits,
        tolerance=choices.tolerance,
    )


def _write_front(alloc: allocate.Allocation, out: Path) -> tuple[list[Path], list[str]]:
    """pareto.json, pareto.csv and (with matplotlib) pareto.png in ``out``: the files and a note for a missing one."""
    pareto.write_json(alloc, out / PARETO_JSON)
    pareto.write_csv(alloc, out / PARETO_CSV)
    paths = [out / PARETO_JSON, out / PARETO_CSV]
    if pareto.write_png(alloc, out / PARETO_PNG):
        return [*paths, out / PARETO_PNG], []
    return paths, [f"no {PARETO_PNG}: {MISSING_MATPLOTLIB}"]
