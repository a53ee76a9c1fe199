"""``fitonnx export``: write a (possibly hand-edited) recommendation.json in a toolchain's format."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from fitonnx.cli.common import echo_warnings, output_plan, parent_made
from fitonnx.cli.options import data_options, force_option
from fitonnx.errors import FitonnxError
from fitonnx.export import EXPORTERS, export_recommendation, get_exporter
from fitonnx.export.evaluate import accuracy
from fitonnx.model.data import load_npz


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--recommendation",
    "recommendation",
    required=True,
    type=click.Path(dir_okay=False),
    help="The recommendation.json written by fitonnx recommend (bits may be edited by hand).",
)
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(sorted(EXPORTERS)),
    help="overrides: ONNX Runtime TensorQuantOverrides JSON; qdq: QDQ model from onnxruntime's quantize_static "
    "(TensorRT's for a tensorrt recommendation); qnn / qnn-1.0.0: QNN/AIMET encodings; tensorrt: symmetric QDQ "
    "model, 16-bit tensors in float; annotated: the model with the recommendation in its metadata.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="File to write (never an input), or a folder (existing, or new with a trailing /) for the format's "
    "default name.",
)
@data_options
@click.option(
    "--per-channel",
    is_flag=True,
    help="Quantize Conv/Gemm/MatMul weights per output channel (default: per tensor, as FIT scores them).",
)
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(dir_okay=False),
    help="Labelled .npz (e.g. <model>.heldout.npz): print the top-1 accuracy of the float and exported models.",
)
@force_option
def export_command(
    model: str,
    recommendation: str,
    fmt: str,
    out: str,
    data: str | None,
    random_samples: int | None,
    per_channel: bool,
    eval_data: str | None,
    force: bool,
) -> None:
    """Write MODEL's recommendation in one toolchain's format (calibrating on --data where needed)."""

    exporter = get_exporter(fmt)
    if eval_data is not None and not exporter.filename.endswith(".onnx"):
        raise FitonnxError(
            f"expected a format that writes a model (qdq, tensorrt, annotated) for --eval; found {fmt!r}",
            hint="drop --eval, or export a QDQ model",
        )
    plan = output_plan([model], [data, eval_data], [("the recommendation", recommendation)], force=force)
    target = plan.file("--out", out, default_name=exporter.default_path(".", Path(model).name).name)
    assert target is not None and target.path is not None  # --out is required and never stdout
    held_out = load_npz(eval_data) if eval_data is not None else None
    reference = None if held_out is None else accuracy(model, held_out)  # bad labels refused before writing
    with echo_warnings(), parent_made(target) as path:
        result = export_recommendation(
            model, recommendation, fmt, path, data=data, random_samples=random_samples, per_channel=per_channel
        )
    widths = Counter(result.quantized.values())
    summary = ", ".join(f"{n} at {b} bits" for b, n in sorted(widths.items())) or "none quantized"
    click.echo(f"wrote {result.path} ({fmt}): {summary}; {len(result.kept_float)} left in float")
    for note in result.notes:
        click.echo(f"note: {note}")
    if held_out is not None and reference is not None:
        exported = accuracy(result.path, held_out)
        click.echo(
            f"held-out top-1 accuracy on {reference.total} labels from {held_out.source}: "
            f"float {100 * reference.value:.2f}%, exported {100 * exported.value:.2f}%"
        )
