"""Option groups shared by subcommands, as reusable click decorators."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fitonnx.allocate.formats_alloc import FormatOptions
from fitonnx.allocate.knapsack import AllocationOptions, BudgetKind, budget_from
from fitonnx.allocate.targets import DEFAULT_TARGET, TARGETS
from fitonnx.errors import FitonnxError
from fitonnx.files.readers import DEFAULT_LIMIT_MB, LIMIT_OPTION, Limit
from fitonnx.fisher import batched, engines
from fitonnx.fisher.losses import FisherMode, Likelihood
from fitonnx.fisher.options import FisherOptions
from fitonnx.formats import parse_format
from fitonnx.model.runtime import DEVICES
from fitonnx.model.sources.script import LoaderScript
from fitonnx.scale import LOCAL_RAY, Workers
from fitonnx.score.fit import DEFAULT_ACTIVATION_BITS, DEFAULT_WEIGHT_BITS
from fitonnx.score.formats_fit import TARGET_FORMATS
from fitonnx.score.noise import NOISE_MODELS, NoiseModel

F = TypeVar("F", bound=Callable[..., Any])


def _compose(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


class BitsList(click.ParamType):
    """A comma-separated list of bit widths, e.g. ``2,3,4,8``."""

    name = "bits"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            bits = tuple(sorted({int(v) for v in str(value).split(",") if v.strip()}))
        except ValueError:
            self.fail(f"expected comma-separated integers like 2,4,8; found {value!r}", param, ctx)
        if not bits or any(b < 1 or b > 32 for b in bits):
            self.fail(f"expected bit widths between 1 and 32; found {value!r}", param, ctx)
        return bits


class FormatList(click.ParamType):
    """A comma-separated list of quantization format names, e.g. ``int8/ch,fp8e4m3`` (checked by the
    format registry's grammar, ``fitonnx.formats.parse_format``)."""

    name = "formats"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        names = tuple(dict.fromkeys(v.strip() for v in str(value).split(",") if v.strip()))
        if not names:
            self.fail(f"expected comma-separated format names like int8/ch,fp8e4m3; found {value!r}", param, ctx)
        for name in names:
            try:
                parse_format(name)
            except FitonnxError as exc:
                self.fail(exc.message, param, ctx)
        return names


def data_options(f: F) -> F:
    """--data / --data-loader-script / --random-data: where calibration samples come from (the script
    reaches the command as its ``data``, a ``LoaderScript``)."""

    @functools.wraps(f)
    def collect(*args: Any, data: str | None, loader_script: str | None, **kwargs: Any) -> Any:
        if loader_script is not None:
            if data is not None:
                raise click.UsageError("give --data or --data-loader-script, not both")
            return f(*args, data=LoaderScript.parse(loader_script), **kwargs)
        return f(*args, data=data, **kwargs)

    return _compose(
        click.option(
            "--data",
            "data",
            type=click.Path(exists=False, dir_okay=True),
            help="Calibration .npz (keys = input names, optional 'labels'; `fitonnx data` builds one from images, "
            "WAVs or text), a test_data_set_* folder, or a loader script file.py[:function]. "
            "Default: the model's bundled <model>.calib.npz.",
        ),
        click.option(
            "--data-loader-script",
            "loader_script",
            metavar="FILE.py[:FUNCTION]",
            help="A Python file whose function (default load_data) yields feed dicts {input name: array} "
            "(Polygraphy's convention); a 'labels' entry is the sample's labels.",
        ),
        click.option(
            "--random-data",
            "random_samples",
            type=click.IntRange(min=1),
            help="Score N random inputs instead of real data (a smoke test: says little about real sensitivity).",
        ),
        max_data_option,
    )(collect)  # type: ignore[arg-type]


def _use_limit(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Set the readers' limit for this command only (undone when its context closes)."""
    ctx.call_on_close(Limit.megabytes(value).use())
    return value


max_data_option = click.option(
    LIMIT_OPTION,
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_LIMIT_MB,
    show_default=True,
    expose_value=False,
    callback=_use_limit,
    help="Read at most this many MiB of any one data array or tensor file (checked before reading).",
)


def force_option(f: F) -> F:
    """--force: write through an output path that is a symbolic link (refused otherwise)."""
    return click.option(
        "--force", is_flag=True, help="Write through an output that is a symbolic link, to the file it points to."
    )(f)


WORKERS_OPTIONS = (
    click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Score calibration samples (and validate's configurations) in N local processes; same results. "
        "With --ray: at most N Ray tasks at once.",
    ),
    click.option(
        "--ray",
        metavar="[ADDRESS]",
        is_flag=False,
        flag_value=LOCAL_RAY,
        help="Run the work as Ray tasks (pip install 'fitonnx[ray]'): on the cluster at ADDRESS (HOST:PORT, "
        "ray://HOST:PORT, auto), or alone for a Ray started here (alone: after MODEL, or --ray=local). "
        "fitonnx must be installed on the nodes.",
    ),
)


def _workers_into(f: F) -> F:
    """--workers / --ray, put into the command's ``options`` as its ``Workers``."""

    @functools.wraps(f)
    def collect(*args: Any, options: FisherOptions, workers: int, ray: str | None, **kwargs: Any) -> Any:
        spread = Workers(processes=workers, ray=ray is not None, address=None if ray in (None, LOCAL_RAY) else ray)
        return f(*args, options=options.replace(workers=spread), **kwargs)

    return collect  # type: ignore[return-value]


def _engine_options() -> tuple[Callable[[F], F], ...]:
    """--engine, --batch-size and --device: what computes the gradients, how many samples per run, where."""
    return (
        click.option(
            "--engine",
            type=click.Choice(list(engines.ENGINE_CHOICES)),
            default=engines.AUTO,
            show_default=True,
            help="What builds the gradient graph. auto: the first installed of " + ", ".join(engines.PREFERENCE) + ".",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            help=f"Samples per batched run of the onnx engine (per-sample values unchanged). Default: "
            f"{batched.DEFAULT_BATCH_SIZE} for onnx, 1 for ort-training.",
        ),
        click.option(
            "--device",
            type=click.Choice(list(DEVICES)),
            default="cpu",
            show_default=True,
            help="Where the gradient runs: cpu, or cuda (onnxruntime-gpu's CUDAExecutionProvider).",
        ),
    )


def fisher_options(f: F) -> F:
    """Fisher mode, loss output, sample budget, seed, gradient engine and workers, handed to the command
    as one ``options: FisherOptions`` argument."""

    @functools.wraps(f)
    def collect(
        *args: Any,
        fisher: str | None,
        likelihood: str | None,
        output: str | None,
        class_axis: int | None,
        max_samples: int | None,
        tol: float | None,
        seed: int,
        engine: str,
        **kwargs: Any,
    ) -> Any:
        options = FisherOptions(
            fisher=fisher,  # type: ignore[arg-type]  # FisherOptions coerces the strings
            likelihood=likelihood,  # type: ignore[arg-type]
            output=output,
            class_axis=class_axis,
            max_samples=max_samples,
            tol=tol,
            seed=seed,
            engine=engine,
            batch_size=kwargs.pop("batch_size"),
            device=kwargs.pop("device"),
            output_kinds=kwargs.pop("output_kind"),  # FisherOptions parses the NAME=KIND strings
        )
        return with_workers(*args, options=options, **kwargs)

    with_workers = _workers_into(f)

    return _compose(
        click.option(
            "--fisher",
            type=click.Choice([m.value for m in FisherMode]),
            help="empirical: cross-entropy against the data's labels; mc: labels sampled from the model; "
            "exact: the true Fisher summed over every class (categorical outputs, or one Bernoulli probability per "
            "sample; one pass per class). "
            "Default: empirical when the data has labels, else mc.",
        ),
        click.option(
            "--likelihood",
            type=click.Choice([m.value for m in Likelihood]),
            help="How to read the output. Default: from the output's producer (Softmax/Sigmoid) and the labels.",
        ),
        click.option(
            "--output",
            help="The one model output that defines the loss. Default: every float output (the first with labels).",
        ),
        click.option("--class-axis", type=int, help="Class axis of a categorical output. Default: 1 (-1 for rank 3)."),
        click.option(
            "--output-kind",
            multiple=True,
            metavar="NAME=KIND",
            help="What output NAME is, when its reading would be a guess: logits:AXIS, probabilities[:AXIS] "
            "(class probabilities over AXIS, else independent ones), boxes or hidden (both Gaussian). Repeatable.",
        ),
        click.option("--max-samples", type=click.IntRange(min=1), help="Use at most N calibration samples."),
        click.option(
            "--tol",
            type=click.FloatRange(min=0, min_open=True),
            help="Stop once the relative standard error of the total trace is below TOL (e.g. 0.05).",
        ),
        click.option(
            "--seed",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Seed for --fisher mc and --random-data.",
        ),
        *_engine_options(),
        *WORKERS_OPTIONS,
    )(collect)  # type: ignore[arg-type]


def noise_model_option(f: F) -> F:
    """--noise-model: the paper's uniform rounding noise, or the grid model."""
    return click.option(
        "--noise-model",
        type=click.Choice([m.value for m in NoiseModel]),
        default=NoiseModel.UNIFORM.value,
        show_default=True,
        help="; ".join(f"{m.value}: {d}" for m, d in NOISE_MODELS.items()) + ".",
    )(f)


def _bits_text(bits: tuple[int, ...]) -> str:
    """Bit widths as the comma-separated text ``BitsList`` reads (``2,3,4,8``)."""
    return ",".join(str(b) for b in bits)


def bits_options(f: F) -> F:
    """Candidate bit widths for weights and activations."""
    return _compose(
        click.option(
            "--weight-bits",
            type=BitsList(),
            default=_bits_text(DEFAULT_WEIGHT_BITS),
            show_default=True,
            help="Candidate weight bit widths.",
        ),
        click.option(
            "--act-bits",
            type=BitsList(),
            default=_bits_text(DEFAULT_ACTIVATION_BITS),
            show_default=True,
            help="Candidate activation bit widths.",
        ),
    )(f)


def format_options(f: F) -> F:
    """--format (repeatable, comma lists) and --target: the number formats to score every tensor under."""

    @functools.wraps(f)
    def collect(*args: Any, formats: tuple[tuple[str, ...], ...], format_target: str | None, **kwargs: Any) -> Any:
        names = [n for group in formats for n in group]
        if format_target is not None:
            names += TARGET_FORMATS[format_target]
        return f(*args, formats=tuple(dict.fromkeys(names)), **kwargs)

    return _compose(
        click.option(
            "--format",
            "formats",
            type=FormatList(),
            multiple=True,
            help="Also score every tensor under this number format (repeatable or comma-separated): "
            "[u]intN[/ch|/bB], fp8e4m3, fp8e5m2, fp8e4m3/ch, mxfp4/32, mxfp8/32, nvfp4/16, fp16, bf16. "
            "Per-channel and per-block formats apply to Conv/Gemm/MatMul weights.",
        ),
        click.option(
            "--target",
            "format_target",
            type=click.Choice(sorted(TARGET_FORMATS)),
            help="Also score the formats this toolchain quantizes to: "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(TARGET_FORMATS.items()))
            + ".",
        ),
    )(collect)  # type: ignore[arg-type]


BUDGET_HELP = {
    BudgetKind.AVG_BITS: "Budget: average bits per weight element (e.g. 4).",
    BudgetKind.SIZE_KB: "Budget: total weight size in KB (1 KB = 1024 bytes, weights packed).",
    BudgetKind.MAX_FIT: "Budget: the smallest weights whose total FIT stays within this.",
}


def budget_options(f: F) -> F:
    """One option per ``BudgetKind`` (--avg-bits, --size-kb, --max-fit), handed to the command as its one
    ``budget: Budget``."""

    @functools.wraps(f)
    def collect(*args: Any, **kwargs: Any) -> Any:
        given = {kind.value: kwargs.pop(kind.value) for kind in BudgetKind}
        return f(*args, budget=budget_from(**given), **kwargs)

    flags = [
        click.option(f"--{kind.value.replace('_', '-')}", type=float, help=BUDGET_HELP[kind]) for kind in BudgetKind
    ]
    return _compose(*flags)(collect)  # type: ignore[arg-type]


def _allocation_choices(kwargs: dict[str, Any]) -> AllocationOptions | FormatOptions:
    """Bit-width choices, or format choices with --formats/--weight-formats/--act-format (the options'
    values are taken out of ``kwargs``)."""
    common = {"target": kwargs.pop("target"), "tolerance": kwargs.pop("tolerance")}
    bits = {name: kwargs.pop(name) for name in ("weight_bits", "act_bits")}
    act_avg_bits = kwargs.pop("act_avg_bits")
    formats = {name: kwargs.pop(name) for name in ("weight_formats", "act_format")}
    if not (kwargs.pop("by_format") or any(v is not None for v in formats.values())):
        return AllocationOptions(**common, **bits, act_avg_bits=act_avg_bits)
    mixed = ", ".join(f"--{name.replace('_', '-')}" for name, value in bits.items() if value)
    if mixed:
        raise click.UsageError(f"{mixed} choose bit widths; with --formats use --weight-formats/--act-format")
    return FormatOptions(**common, **formats, act_avg_bits=act_avg_bits)


def allocation_options(f: F) -> F:
    """--target and what it may choose: bit widths, or with --formats the formats of its menu; handed to
    the command as one ``choices: AllocationOptions | FormatOptions``."""

    @functools.wraps(f)
    def collect(*args: Any, **kwargs: Any) -> Any:
        return f(*args, choices=_allocation_choices(kwargs), **kwargs)

    return _compose(
        click.option(
            "--target",
            type=click.Choice(sorted(TARGETS)),
            default=DEFAULT_TARGET,
            show_default=True,
            help="Deployment toolchain: its bit widths, grid and export files. "
            + "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values()),
        ),
        click.option("--weight-bits", type=BitsList(), help="Restrict the target's weight bit widths, e.g. 4,8."),
        click.option(
            "--act-bits",
            type=BitsList(),
            help=f"Bits of every activation (one width), or with --act-avg-bits the candidate widths (e.g. 8,16). "
            f"Default: the target's ({TARGETS[DEFAULT_TARGET].default_activation_bits}).",
        ),
        click.option(
            "--act-avg-bits",
            type=float,
            help="Choose activation bits under this average (exact), among --act-bits if given; with --formats, "
            "activation formats among --act-format if given, else the target's activation menu (block scales counted).",
        ),
        *_format_choice_options(),
        click.option(
            "--tolerance",
            type=click.FloatRange(min=0),
            default=AllocationOptions.tolerance,
            show_default=True,
            help="0: exact optimum. ε > 0: FIT within a factor 1+ε of optimal, with a smaller front (for huge models).",
        ),
    )(collect)  # type: ignore[arg-type]


def _format_choice_options() -> tuple[Callable[[F], F], ...]:
    """--formats, --weight-formats and --act-format: allocate over the target's format menu."""
    return (
        click.option(
            "--formats",
            "by_format",
            is_flag=True,
            help="Choose per-tensor FORMATS from the target's menu (per channel, per block, FP8, NVFP4, MatMulNBits "
            "...) with exact storage costs (scales and zero points counted in the budget) instead of bit widths.",
        ),
        click.option(
            "--weight-formats",
            type=FormatList(),
            help="With --formats: restrict the weights' candidates, e.g. int8/ch,int4/ch (implies --formats).",
        ),
        click.option(
            "--act-format",
            type=FormatList(),
            help="With --formats: the format of every activation (default: the target's), or with --act-avg-bits "
            "the candidates (e.g. int8,fp8e4m3,mxfp8/32; a block format only on the activations the target blocks).",
        ),
    )
