"""The public Python API: each subcommand of the CLI is one call here.

The stages below hold the work (see docs/architecture.md); this module only strings them
together the way a command does, so that scripts and the CLI get the same results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fitonnx.allocate import knapsack as allocate
from fitonnx.allocate.knapsack import AllocationOptions, Budget, BudgetKind, budget_from
from fitonnx.analysis.compare import CompareReport, compare
from fitonnx.analysis.inspection import Inspection, inspect_model
from fitonnx.analysis.validate import ValidationReport, validate
from fitonnx.export import export_recommendation
from fitonnx.export.bundle import PARETO_CSV, PARETO_JSON, PARETO_PNG, Written, prepare_out_dir, write_outputs
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import Session, fisher_traces, gradient_model, inspect_tensors, open_model
from fitonnx.model.source import DataSource, ModelSource, RandomData, RandomDataWarning, resolve_data
from fitonnx.progress import Progress
from fitonnx.render import pareto
from fitonnx.score import noise
from fitonnx.score.fit import ScoreReport
from fitonnx.score.run import score_model

score = score_model
export = export_recommendation
inspect = inspect_model

__all__ = [
    "AllocationOptions",
    "Budget",
    "BudgetKind",
    "CompareReport",
    "DataSource",
    "Inspection",
    "ModelSource",
    "RandomData",
    "RandomDataWarning",
    "RecommendResult",
    "ScoreReport",
    "Session",
    "ValidationReport",
    "budget_from",
    "compare",
    "export",
    "fisher_traces",
    "gradient_model",
    "inspect",
    "inspect_tensors",
    "open_model",
    "recommend",
    "resolve_data",
    "score",
    "validate",
]


@dataclass(frozen=True)
class RecommendResult:
    """What ``recommend`` chose (``allocation``), the FIT report it used, and the files it wrote."""

    allocation: allocate.Allocation
    report: ScoreReport
    written: Written | None


def recommend(
    model: ModelSource,
    data: DataSource = None,
    *,
    budget: allocate.Budget,
    choices: allocate.AllocationOptions | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    options: FisherOptions | None = None,
    noise_model: noise.NoiseModel | str = noise.NoiseModel.UNIFORM,
    progress: Progress | None = None,
) -> RecommendResult:
    """Per-tensor bit widths under ``budget`` (``allocate.budget_from(avg_bits=..., size_kb=... or
    max_fit=...)``) among ``choices``, and, with ``out_dir``, every output of ``fitonnx recommend``
    written there. ``options``: how the Fisher is estimated; ``noise_model``: as in ``score``, with
    the grid model judged on the target's own grids (``targets.Target.represents``).

    Every option and the output folder are checked before any work."""
    choices = choices or allocate.AllocationOptions()
    tgt = choices.check()
    opts = options or FisherOptions()
    s = open_model(model, data, seed=opts.seed, max_samples=opts.max_samples)
    out = None if out_dir is None else prepare_out_dir(out_dir, s.loaded.path, s.loaded.name)
    report = score_model(
        model,
        session=s,
        options=opts,
        weight_bits=tgt.weight_bits,
        activation_bits=tgt.activation_bits,
        noise_model=noise_model,
        progress=progress,
    )
    alloc = allocate.allocate(
        report,
        tgt,
        budget,
        weight_bits=choices.weight_bits,
        act_bits=choices.act_bits,
        act_avg_bits=choices.act_avg_bits,
        tolerance=choices.tolerance,
    )
    written = (
        None
        if out is None
        else write_outputs(
            alloc,
            s.loaded.proto,
            out,
            source=s.loaded.path,
            data=s.data,
            origin_of=s.prepared.origin_of,
            front=_write_front,
        )
    )
    return RecommendResult(allocation=alloc, report=report, written=written)


def _write_front(alloc: allocate.Allocation, out: Path) -> tuple[list[Path], list[str]]:
    """pareto.json, pareto.csv and (with matplotlib) pareto.png in ``out``: the files and a note for a missing one."""
    pareto.write_json(alloc, out / PARETO_JSON)
    pareto.write_csv(alloc, out / PARETO_CSV)
    paths = [out / PARETO_JSON, out / PARETO_CSV]
    if pareto.write_png(alloc, out / PARETO_PNG):
        return [*paths, out / PARETO_PNG], []
    return paths, ["no pareto.png: matplotlib is not installed (pip install 'fitonnx[plot]')"]
