"""``fitonnx score``: Fisher traces and FIT for every quantizable tensor."""

from __future__ import annotations

import click

from fitonnx import api
from fitonnx.cli.common import data_source, echo_for, echo_warnings, output_plan, table_width, target_path, wide_option
from fitonnx.cli.options import (
    bits_options,
    data_options,
    fisher_options,
    force_option,
    format_options,
    noise_model_option,
)
from fitonnx.cli.progress import progress_bars
from fitonnx.fisher.options import FisherOptions
from fitonnx.render import report


@click.command("score")
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@fisher_options
@bits_options
@noise_model_option
@format_options
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON here (- for stdout)."
)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the table as CSV here (- for stdout).")
@click.option("--top", type=click.IntRange(min=1), help="Show only the N most sensitive tensors in the terminal.")
@wide_option
@force_option
def score_command(
    model: str,
    data: str | None,
    random_samples: int | None,
    options: FisherOptions,
    weight_bits: tuple[int, ...],
    act_bits: tuple[int, ...],
    noise_model: str,
    formats: tuple[str, ...],
    json_path: str | None,
    csv_path: str | None,
    top: int | None,
    wide: bool,
    force: bool,
) -> None:
    """Rank MODEL's quantizable weights and activations by FIT (most sensitive first)."""
    plan = output_plan([model], [data], force=force)
    json_out = target_path(plan.file("--json", json_path, stdout_ok=True))
    csv_out = target_path(plan.file("--csv", csv_path, stdout_ok=True))
    echo = echo_for(plan)
    with echo_warnings(), progress_bars() as bars:
        result = api.score(
            model,
            data_source(data, random_samples, options.seed),
            options=options,
            weight_bits=weight_bits,
            activation_bits=act_bits,
            progress=bars,
            noise_model=noise_model,
            formats=formats,
        )
    echo(report.format_table(result, limit=top, width=table_width(wide)))
    if json_out:
        report.write_json(result, json_out)
        echo(f"wrote {json_path}")
    if csv_out:
        report.write_csv(result, csv_out)
        echo(f"wrote {csv_path}")
