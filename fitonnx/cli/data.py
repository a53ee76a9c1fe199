"""``fitonnx data``: build a calibration .npz from a folder of images, WAV files or a text file."""

from __future__ import annotations

import click

from fitonnx import api
from fitonnx.cli.common import note
from fitonnx.cli.progress import info
from fitonnx.errors import FitonnxError
from fitonnx.model.sources.audio import DEFAULT_SAMPLE_RATE, AudioOptions
from fitonnx.model.sources.common import parse_fill, preview
from fitonnx.model.sources.images import CHANNEL_ORDERS, IMAGE_PRESETS, LAYOUTS, PRESET_HELP, image_options

ADVISED_SAMPLES = 128  # where a small CNN's ranking settled (docs/metric.md); score measures it per model


def _floats(value: str | None, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise FitonnxError(
            f"expected comma-separated numbers for {what} (e.g. 0.485,0.456,0.406); found {value!r}"
        ) from None


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    h, sep, w = value.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise FitonnxError(f"expected --size HxW (e.g. 224x224); found {value!r}")
    return int(h), int(w)


@click.command("data")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("inputs", type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The .npz to write (for --data).")
@click.option("--kind", type=click.Choice([k.value for k in api.DataKind]), help="Default: told by the files.")
@click.option("--input", "input_name", help="The model input to fill. Default: found from the model's inputs.")
@click.option("--max-samples", type=click.IntRange(min=1), help="Build at most N samples.")
@click.option("--fill", multiple=True, help="NAME=VALUE: a constant for another model input (default 0).")
@click.option(
    "--preset",
    type=click.Choice(sorted(IMAGE_PRESETS)),
    help="Images: " + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()) + ". Default: unit.",
)
@click.option("--size", help="Images: crop HxW. Default: the model input's height and width.")
@click.option("--resize", type=click.IntRange(min=1), help="Images: shorter side before the centre crop.")
@click.option("--layout", type=click.Choice(LAYOUTS), help="Images: default from the model input's shape.")
@click.option("--channels", type=click.Choice(CHANNEL_ORDERS), help="Images: channel order (default: the preset's).")
@click.option("--mean", help="Images: per-channel mean after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Images: per-channel standard deviation after scaling.")
@click.option("--scale", type=float, help="Images: pixel factor before mean/std (1/255 or 1 in the presets).")
@click.option(
    "--sample-rate",
    type=click.IntRange(min=1),
    default=DEFAULT_SAMPLE_RATE,
    show_default=True,
    help="Audio: the model's rate; files are resampled to it.",
)
@click.option("--frame", type=click.IntRange(min=1), help="Audio: samples per input. Default: the input's length.")
@click.option("--hop", type=click.IntRange(min=1), help="Audio: samples between frame starts. Default: --frame.")
@click.option(
    "--tokenizer",
    type=click.Path(dir_okay=False),
    help="Text: WordPiece vocab.txt or tokenizer.json. Default: <model>.vocab.txt beside the model.",
)
@click.option("--max-length", type=click.IntRange(min=2), help="Text: tokens per line. Default: the longest line.")
def data_command(
    model: str,
    inputs: str,
    out: str,
    kind: str | None,
    input_name: str | None,
    max_samples: int | None,
    fill: tuple[str, ...],
    preset: str | None,
    size: str | None,
    resize: int | None,
    layout: str | None,
    channels: str | None,
    mean: str | None,
    std: str | None,
    scale: float | None,
    sample_rate: int,
    frame: int | None,
    hop: int | None,
    tokenizer: str | None,
    max_length: int | None,
) -> None:
    """Build MODEL's calibration data from INPUTS (a folder of images or WAV files, or a text file of
    lines) and write it as an .npz for --data; prints what it built."""
    images = image_options(
        preset,
        size=_size(size),
        resize=resize,
        layout=layout,
        channels=channels,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        scale=scale,
    )
    options = api.BuildOptions(
        input_name=input_name,
        limit=max_samples,
        fill=parse_fill(fill),
        images=images,
        audio=AudioOptions(sample_rate=sample_rate, frame=frame, hop=hop),
        tokenizer=tokenizer,
        max_length=max_length,
    )
    built = api.build_data(model, inputs, kind=kind, options=options, out=out)
    click.echo(preview(built))
    n = built.dataset.num_samples
    if n < ADVISED_SAMPLES:
        note(
            f"{n} samples; rankings often settle from about {ADVISED_SAMPLES} (score's ranking stability says "
            "whether these are enough)"
        )
    info(f"wrote {out}")
