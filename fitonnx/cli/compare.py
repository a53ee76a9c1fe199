"""``fitonnx compare``: several models side by side, paired tensor by tensor where their graphs align."""

from __future__ import annotations

import click

from fitonnx.analysis.compare import DEFAULT_AGREE_TOL, compare
from fitonnx.cli.common import echo_for, output_plan, target_path
from fitonnx.cli.options import bits_options, fisher_options, force_option, max_data_option
from fitonnx.cli.progress import progress_bars
from fitonnx.fisher.options import FisherOptions
from fitonnx.render import compare as view


@click.command("compare")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--data",
    "data",
    multiple=True,
    type=click.Path(exists=False, dir_okay=True),
    help="Calibration data: once for all models, or once per model in the order of MODELS (each in that model's "
    "own input layout). Default: each model's bundled <model>.calib.npz.",
)
@max_data_option
@fisher_options
@bits_options
@click.option(
    "--agree-tol",
    type=click.FloatRange(min=0),
    default=DEFAULT_AGREE_TOL,
    show_default=True,
    help="Flag a pair whose traces or ranges differ by more than this fraction.",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the comparison as JSON here (- for stdout)."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Plot every model's FIT-against-size Pareto front here (PNG; needs matplotlib, the 'plot' extra).",
)
@force_option
def compare_command(
    models: tuple[str, ...],
    data: tuple[str, ...],
    options: FisherOptions,
    weight_bits: tuple[int, ...],
    act_bits: tuple[int, ...],
    agree_tol: float,
    json_path: str | None,
    plot_path: str | None,
    force: bool,
) -> None:
    """Compare MODELS (two or more; each against the first): paired Fisher traces, ranges and FIT."""
    plan = output_plan(models, data, force=force)
    json_out = target_path(plan.file("--json", json_path, stdout_ok=True))
    plot_out = target_path(plan.file("--plot", plot_path))
    echo = echo_for(plan)
    with progress_bars() as bars:
        result = compare(
            models,
            data or None,
            options=options,
            weight_bits=weight_bits,
            activation_bits=act_bits,
            agree_tol=agree_tol,
            progress=bars,
        )
    echo(view.format_table(result))
    if json_out:
        view.write_json(result, json_out)
        echo(f"wrote {json_path}")
    if plot_out:
        if view.write_plot(result, plot_out):
            echo(f"wrote {plot_path}")
        else:
            click.secho(
                "warning: matplotlib is not installed; no plot written (pip install 'fitonnx[plot]')",
                fg="yellow",
                err=True,
            )
