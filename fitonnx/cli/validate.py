"""``fitonnx validate``: simulate mixed-precision configurations and rank FIT against measured damage."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

import click

from fitonnx.analysis.validate import DEFAULT_CONFIGS, DEFAULT_RESAMPLES, format_report, validate, write_json
from fitonnx.cli.common import open_session, samples_to_use
from fitonnx.cli.options import BitsList, data_options, fisher_options
from fitonnx.cli.progress import progress_bar
from fitonnx.fisher.options import FisherOptions


@click.command("validate")
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@fisher_options
@click.option(
    "--eval-data",
    type=click.Path(exists=False, dir_okay=True),
    help="Held-out .npz (or test_data_set_* folder) on which damage is measured. "
    "Default: the model's bundled <model>.heldout.npz.",
)
@click.option(
    "--configs",
    type=click.IntRange(min=0),
    default=DEFAULT_CONFIGS,
    show_default=True,
    help="Random mixed-precision configurations to simulate (uniform ones are added).",
)
@click.option(
    "--bits",
    type=BitsList(),
    default="3,4,5,6,7,8",
    show_default=True,
    help="Candidate bit widths (2-16) per tensor, weights and activations.",
)
@click.option("--weight-bits", type=BitsList(), help="Candidate weight bit widths (overrides --bits for weights).")
@click.option("--act-bits", type=BitsList(), help="Candidate activation bit widths (overrides --bits for activations).")
@click.option("--no-uniform", is_flag=True, help="Do not add the uniform configurations (every tensor at b bits).")
@click.option("--per-channel", is_flag=True, help="Quantize weights per output channel (default: per tensor).")
@click.option("--symmetric", is_flag=True, help="Symmetric max|x| grids (default: asymmetric min/max, FIT's model).")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Held-out samples per run."
)
@click.option(
    "--resamples",
    type=click.IntRange(min=0),
    default=DEFAULT_RESAMPLES,
    show_default=True,
    help="Bootstrap resamples of the configurations for confidence intervals (0: none).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG scatter of FIT vs damage here.")
def validate_command(
    model: str,
    data: str | None,
    random_samples: int | None,
    options: FisherOptions,
    eval_data: str | None,
    configs: int,
    bits: tuple[int, ...],
    weight_bits: tuple[int, ...] | None,
    act_bits: tuple[int, ...] | None,
    no_uniform: bool,
    per_channel: bool,
    symmetric: bool,
    batch_size: int,
    resamples: int,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """Measure the damage of random quantization configurations of MODEL and how well FIT ranks it.

    --seed also seeds the configuration sampling and the bootstrap.
    """
    if plot_path:
        from fitonnx.render.plot import require_matplotlib

        require_matplotlib()  # fail before the work, not after it
    started = time.perf_counter()
    session = open_session(model, data, random_samples, options.seed)
    samples = samples_to_use(session, options.max_samples)
    uniform = 0 if no_uniform else len(set(weight_bits or bits) & set(act_bits or bits))
    passes = 2  # traces and ranges, then the measured rounding errors
    # Two bars, one after the other: the configurations' bar opens when the Fisher passes are done.
    with ExitStack() as fisher_bar, ExitStack() as config_bar:
        fisher_advance = fisher_bar.enter_context(progress_bar(passes * samples, f"Fisher samples ({passes} passes)"))
        config_advance: list[Callable[[int], None]] = []

        def advance_config(n: int) -> None:
            if not config_advance:
                fisher_bar.close()
                config_advance.append(config_bar.enter_context(progress_bar(configs + uniform, "Configurations")))
            config_advance[0](n)

        result = validate(
            model,
            session=session,
            eval_data=eval_data,
            configs=configs,
            weight_bits=weight_bits or bits,
            activation_bits=act_bits or bits,
            uniform=not no_uniform,
            per_channel=per_channel,
            symmetric=symmetric,
            options=options,
            batch_size=batch_size,
            resamples=resamples,
            fisher_progress=fisher_advance,
            config_progress=advance_config,
        )
    click.echo(format_report(result))
    click.echo(f"\n{len(result.configs)} configurations validated in {time.perf_counter() - started:.1f} s")
    if json_path:
        write_json(result, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        from fitonnx.render.plot import scatter

        scatter(result, plot_path)
        click.echo(f"wrote {plot_path}")
