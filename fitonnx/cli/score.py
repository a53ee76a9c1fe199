"""``fitonnx score``: Fisher traces and FIT for every quantizable tensor."""

from __future__ import annotations

import click

from fitonnx import api
from fitonnx.cli.common import (
    STDOUT,
    data_source,
    echo_table,
    echo_warnings,
    table_width,
    wide_option,
    write_output,
)
from fitonnx.cli.options import bits_options, data_options, fisher_options, noise_model_option
from fitonnx.cli.progress import progress_bars
from fitonnx.fisher.options import FisherOptions
from fitonnx.render import report


@click.command("score")
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@fisher_options
@bits_options
@noise_model_option
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON here (- for stdout)."
)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the table as CSV here (- for stdout).")
@click.option("--top", type=click.IntRange(min=1), help="Show only the N most sensitive tensors in the terminal.")
@wide_option
def score_command(
    model: str,
    data: str | None,
    random_samples: int | None,
    options: FisherOptions,
    weight_bits: tuple[int, ...],
    act_bits: tuple[int, ...],
    noise_model: str,
    json_path: str | None,
    csv_path: str | None,
    top: int | None,
    wide: bool,
) -> None:
    """Rank MODEL's quantizable weights and activations by FIT (most sensitive first)."""
    with echo_warnings(), progress_bars() as bars:
        result = api.score(
            model,
            data_source(data, random_samples, options.seed),
            options=options,
            weight_bits=weight_bits,
            activation_bits=act_bits,
            progress=bars,
            noise_model=noise_model,
        )
    if json_path == csv_path == STDOUT:
        raise click.UsageError("only one of --json and --csv can go to stdout (-)")
    echo_table(report.format_table(result, limit=top, width=table_width(wide)), json_path, csv_path)
    if json_path:
        write_output(json_path, lambda p: report.write_json(result, p), csv_path)
    if csv_path:
        write_output(csv_path, lambda p: report.write_csv(result, p), json_path)
