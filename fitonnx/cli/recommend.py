"""``fitonnx recommend``: per-tensor bit widths under a budget, written for a deployment toolchain."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import click

from fitonnx import api
from fitonnx.allocate.formats_alloc import FormatOptions
from fitonnx.allocate.knapsack import BYTES_PER_KB, Allocation, AllocationOptions, Budget, Objective
from fitonnx.analysis.refine import Refinement
from fitonnx.cli.common import data_source, echo_warnings, note, output_plan, table_width, wide_option
from fitonnx.cli.options import (
    allocation_options,
    budget_options,
    data_options,
    fisher_options,
    force_option,
    noise_model_option,
)
from fitonnx.cli.progress import info, progress_bars
from fitonnx.files import StagedFolder
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.graph import Kind
from fitonnx.render.text import name_width, short


def _kb(n_bytes: int) -> str:
    return f"{n_bytes / BYTES_PER_KB:.1f} KB"


def format_summary(result: api.RecommendResult, limit: int | None = None, width: int | None = None) -> str:
    """The chosen bits per tensor (most sensitive first) and the totals against the uniform baseline;
    names cut to fit ``width`` (whole when None)."""
    alloc: Allocation = result.allocation
    rec = alloc.recommendation
    rows = [t for t in result.report.tensors if t.name in rec.weight_bits or t.name in rec.activation_bits]
    name_w = name_width([t.name for t in rows], 31, width)
    col = 10 if rec.by_format else 4
    how = "exact" if alloc.front.tolerance == 0 else f"within a factor {1 + alloc.front.tolerance:g} of optimal"
    lines = [
        f"{rec.model}: target {alloc.target.name}, {alloc.budget.describe()}; {how} Pareto front of "
        f"{len(alloc.front)} configurations, FIT from {result.report.samples} samples ({result.report.fisher} Fisher)",
        f"{'tensor':<{name_w}} {'kind':<4} {'numel':>9} {'format' if rec.by_format else 'bits':>{col}} {'FIT':>10}",
    ]
    lines.append("-" * len(lines[-1]))
    shown = rows if limit is None else rows[:limit]
    for t in shown:
        bits = rec.weight_bits.get(t.name) if t.kind is Kind.WEIGHT else rec.activation_bits.get(t.name)
        fit = rec.fit_per_tensor.get(t.name, {}).get(bits, float("nan"))
        choice: object = bits
        if rec.by_format:
            choice = rec.weight_formats.get(t.name) or rec.activation_formats.get(t.name) or "float"
            fit = rec.fit_per_format.get(t.name, {}).get(str(choice), float("nan"))
        lines.append(
            f"{short(t.name, name_w):<{name_w}} {'W' if t.kind is Kind.WEIGHT else 'A':<4} {t.numel:>9} "
            f"{choice!s:>{col}} {fit:>10.3g}"
        )
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more (see recommendation.json)")
    lines.append("")
    lines.append(
        f"recommended: weights {_kb(rec.weight_bytes)} (average {alloc.avg_bits:.2f} bits), "
        f"FIT {rec.fit:.4g} (activations {alloc.activation_fit:.4g})"
    )
    if rec.activation_fit_models:
        lines.append(activation_models_line(rec.activation_formats, rec.activation_fit_models))
    uniform = alloc.comparable_uniform()
    if uniform is not None:
        ratio = f", {uniform.fit / rec.fit:.2f}× the recommended FIT" if rec.fit > 0 else ""
        what = f"{uniform.format}" if uniform.format else f"{uniform.bits}-bit"
        lines.append(f"uniform {what} weights: {_kb(uniform.weight_bytes)}, FIT {uniform.fit:.4g}{ratio}")
    else:
        lines.append("no uniform bit width meets this budget")
    return "\n".join(lines)


def activation_models_line(formats: Mapping[str, str], models: Mapping[str, str]) -> str:
    """Which activation formats' FIT is the in-graph per-sample statistic and which the range model."""
    by_model: dict[str, dict[str, None]] = {}
    for name, fmt in formats.items():
        by_model.setdefault(models.get(name, "?"), {})[fmt] = None
    what = {"in-graph": "in-graph per-sample statistics", "range": "range model Tr(F)·Δ²/12"}
    parts = [f"{what.get(m, m)} for {', '.join(fs)}" for m, fs in sorted(by_model.items())]
    return f"activation FIT: {'; '.join(parts)}"


def refine_summary(r: Refinement) -> str:
    """What ``--refine`` measured: how many candidates, which was kept, its KL against FIT's answer's."""
    kept = "the knapsack's answer"
    if r.chosen:
        kept = f"candidate {r.chosen + 1} (the knapsack's answer measured {r.measured[0]:.4g})"
    return (
        f"refined by measurement: {r.simulations} candidates simulated on the calibration data; kept {kept}, "
        f"calibration KL {r.measured[r.chosen]:.4g}"
    )


@click.command("recommend")
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@fisher_options
@noise_model_option
@budget_options
@allocation_options
@click.option(
    "--refine",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Simulate the knapsack's answer and its K-1 best-predicted neighbours (at most two weights changed, "
    "same budget) on the calibration data and keep the least measured KL: K simulations, for the tensors' "
    "interactions FIT's additive model misses (a neighbour replaces it only if lower by 2 paired standard "
    "errors). 1: the knapsack's answer as it is; 32 measured best on the bundled CNN over 30 calibration draws "
    "and never worse than 1 on two real models (BENCHMARKS.md).",
)
@click.option(
    "--objective",
    type=click.Choice([o.value for o in Objective]),
    default=Objective.FIT.value,
    show_default=True,
    help="What the knapsack minimises: fit (the paper's FIT) or output_space (NVIDIA ModelOpt AutoQuantize's "
    "Σ(∂ℓ/∂y·Δy)² at each weight's op outputs; one more calibration pass). Size budgets only.",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for recommendation.json, pareto.*, the annotated model and the target's exports: written "
    "whole beside it and moved into place when complete (an earlier fitonnx output there is replaced).",
)
@click.option("--top", type=click.IntRange(min=1), help="Show only the N most sensitive tensors in the terminal.")
@wide_option
@force_option
def recommend_command(
    model: str,
    data: str | None,
    random_samples: int | None,
    options: FisherOptions,
    noise_model: str,
    budget: Budget,
    choices: AllocationOptions | FormatOptions,
    refine: int,
    objective: str,
    out_dir: str,
    top: int | None,
    wide: bool,
    force: bool,
) -> None:
    """Choose per-tensor bit widths for MODEL under one budget (--avg-bits, --size-kb or --max-fit)."""
    if isinstance(choices, FormatOptions):
        if refine > 1 or objective != Objective.FIT.value:
            raise click.UsageError("--refine and --objective choose bit widths; a --formats recommendation is FIT's")
    else:
        choices = dataclasses.replace(choices, objective=Objective(objective), refine=refine)
    out = output_plan([model], [data], force=force).folder("--out", out_dir)
    assert out is not None and out.path is not None  # --out is required
    with StagedFolder(out.path) as staging, echo_warnings(), progress_bars() as bars:
        result = api.recommend(
            model,
            data_source(data, random_samples, options.seed),
            budget=budget,
            choices=choices,
            out_dir=staging,
            options=options,
            noise_model=noise_model,
            progress=bars,
        )
    click.echo(format_summary(result, limit=top, width=table_width(wide)))
    if result.refinement is not None:
        click.echo(refine_summary(result.refinement))
    if result.refine_note:
        note(result.refine_note)
    if result.written is not None:
        for message in result.written.notes:
            note(message)
        for path in result.written.paths:
            info(f"wrote {out.path / Path(path).relative_to(staging)}")
