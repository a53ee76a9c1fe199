"""``fitonnx validate``: simulate mixed-precision configurations and rank FIT against measured damage."""

from __future__ import annotations

import time

import click

from fitonnx.analysis import simulate
from fitonnx.analysis.choices import ALL
from fitonnx.analysis.damage import DEFAULT_MIN_AGREEMENT, Threshold
from fitonnx.analysis.harness import DEFAULT_BATCH_SIZE, DEFAULT_BITS, Baseline, BaselineOptions, SimulationOptions
from fitonnx.analysis.hessian import DEFAULT_PROBES, HessianOptions
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.validate import (
    DEFAULT_CONFIGS,
    DEFAULT_PREDICTOR,
    DEFAULT_RESAMPLES,
    Sampler,
    SamplingOptions,
    validate,
)
from fitonnx.cli.common import data_source, echo_for, echo_warnings, output_plan, target_path, write_plot
from fitonnx.cli.options import BitsList, data_options, fisher_options, force_option
from fitonnx.cli.progress import progress_bars
from fitonnx.fisher.options import FisherOptions
from fitonnx.render import plot
from fitonnx.render import validate as view


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
    help="Mixed-precision configurations to simulate per family (uniform ones are added).",
)
@click.option(
    "--sampler",
    type=click.Choice([m.value for m in Sampler]),
    default=Sampler.BUDGET.value,
    show_default=True,
    help="budget: around the budgets a user would pick, between the cheapest uniform configuration that "
    "still works and the dearest; random: every tensor's choice uniformly (the old sampler).",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_MIN_AGREEMENT,
    show_default=True,
    help="A configuration works when it takes the float model's decision on this share of outputs.",
)
@click.option("--max-kl", type=click.FloatRange(min=0.0), help="A configuration works only with at most this KL.")
@click.option(
    "--predictor",
    type=click.Choice([p.value for p in Predictor]),
    default=DEFAULT_PREDICTOR.value,
    show_default=True,
    help="The predictor the report leads with and plots (the paper's fit is shown beside it).",
)
@click.option(
    "--baseline",
    "baselines",
    multiple=True,
    type=click.Choice([b.value for b in Baseline]),
    help="Also rank this peer, with its cost (off by default: expensive). hessian: HAWQ-v2's Hutchinson "
    "Hessian trace by central differences of the gradient (2 passes per probe and calibration sample). Repeatable.",
)
@click.option(
    "--hessian-probes",
    type=click.IntRange(min=1),
    default=DEFAULT_PROBES,
    show_default=True,
    help="Rademacher probes of the hessian baseline.",
)
@click.option(
    "--format",
    "formats",
    multiple=True,
    help=f"Simulate these formats (e.g. int4/ch, int8/b32, fp8e4m3, nvfp4/16; '{ALL}': every family of the "
    "registry) instead of --bits; ρ is reported per format family. Repeatable.",
)
@click.option("--weights-only", is_flag=True, help="Keep every activation in float.")
@click.option(
    "--bits",
    type=BitsList(),
    default=",".join(map(str, DEFAULT_BITS)),
    show_default=True,
    help=f"Candidate bit widths ({simulate.MIN_BITS}-{simulate.MAX_BITS}) per tensor, weights and activations.",
)
@click.option("--weight-bits", type=BitsList(), help="Candidate weight bit widths (overrides --bits for weights).")
@click.option("--act-bits", type=BitsList(), help="Candidate activation bit widths (overrides --bits for activations).")
@click.option("--no-uniform", is_flag=True, help="Do not add the uniform configurations (every tensor at b bits).")
@click.option("--per-channel", is_flag=True, help="Quantize weights per output channel (default: per tensor).")
@click.option("--symmetric", is_flag=True, help="Symmetric max|x| grids (default: asymmetric min/max, FIT's model).")
@click.option(
    "--eval-batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Held-out samples per simulation run (--batch-size is the Fisher's).",
)
@click.option(
    "--resamples",
    type=click.IntRange(min=0),
    default=DEFAULT_RESAMPLES,
    show_default=True,
    help="Bootstrap resamples of the configurations for confidence intervals (0: none).",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON here (- for stdout)."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Write a PNG scatter of FIT vs damage here (needs matplotlib: else a note, the rest written).",
)
@force_option
def validate_command(
    model: str,
    data: str | None,
    random_samples: int | None,
    options: FisherOptions,
    eval_data: str | None,
    configs: int,
    sampler: str,
    min_agreement: float,
    max_kl: float | None,
    predictor: str,
    baselines: tuple[str, ...],
    hessian_probes: int,
    formats: tuple[str, ...],
    weights_only: bool,
    bits: tuple[int, ...],
    weight_bits: tuple[int, ...] | None,
    act_bits: tuple[int, ...] | None,
    no_uniform: bool,
    per_channel: bool,
    symmetric: bool,
    eval_batch_size: int,
    resamples: int,
    json_path: str | None,
    plot_path: str | None,
    force: bool,
) -> None:
    """Measure the damage of mixed-precision configurations of MODEL and how well FIT ranks it.

    --seed also seeds the configuration sampling and the bootstrap.
    """
    plan = output_plan([model], [data, eval_data], force=force)
    json_out = target_path(plan.file("--json", json_path, stdout_ok=True))
    plot_out = target_path(plan.file("--plot", plot_path))
    echo = echo_for(plan)
    started = time.perf_counter()
    with echo_warnings(), progress_bars() as bars:
        result = validate(
            model,
            data_source(data, random_samples, options.seed),
            eval_data=eval_data,
            simulation=SimulationOptions(
                weight_bits=weight_bits or bits,
                activation_bits=act_bits or bits,
                per_channel=per_channel,
                symmetric=symmetric,
                batch_size=eval_batch_size,
                formats=formats,
                weights_only=weights_only,
            ),
            sampling=SamplingOptions(
                configs=configs,
                uniform=not no_uniform,
                resamples=resamples,
                sampler=Sampler(sampler),
                threshold=Threshold(min_agreement, max_kl),
                predictor=Predictor(predictor),
                baselines=BaselineOptions(baselines, HessianOptions(probes=hessian_probes)),
            ),
            options=options,
            progress=bars,
        )
    echo(view.format_report(result))
    echo(f"\n{len(result.configs)} configurations validated in {time.perf_counter() - started:.1f} s")
    if json_out:
        view.write_json(result, json_out)
        echo(f"wrote {json_path}")
    if plot_out:
        write_plot(plot_out, lambda p: plot.pyplot_or_none() is not None and view.scatter(result, p) is None, echo)
