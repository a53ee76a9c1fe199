"""One entry for every builder: which kind of files, and the options every kind shares."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fitonnx.errors import DataError
from fitonnx.model.graph import InputSpec
from fitonnx.model.sources.audio import AUDIO_SUFFIXES, AudioOptions, build_audio
from fitonnx.model.sources.common import Built
from fitonnx.model.sources.images import IMAGE_SUFFIXES, ImageOptions, build_images
from fitonnx.model.sources.text import build_text, load_tokenizer

TOKENIZER_SIDECARS = (".vocab.txt", ".tokenizer.json")


class DataKind(str, enum.Enum):
    IMAGES = "images"
    AUDIO = "audio"
    TEXT = "text"


@dataclass(frozen=True)
class BuildOptions:
    """What every kind shares: the model input to fill (None: found from the model), at most ``limit``
    samples, constants for the other inputs; and the per-kind options."""

    input_name: str | None = None
    limit: int | None = None
    fill: Mapping[str, float] = field(default_factory=dict)
    images: ImageOptions = field(default_factory=ImageOptions)
    audio: AudioOptions = field(default_factory=AudioOptions)
    tokenizer: str | None = None
    max_length: int | None = None


def detect_kind(inputs: str | Path) -> DataKind:
    """Images or WAVs by the files under a folder; a single file by its suffix (.txt and others: text)."""
    path = Path(inputs)
    if path.is_file():
        suffix = path.suffix.lower()
        return (
            DataKind.IMAGES
            if suffix in IMAGE_SUFFIXES
            else DataKind.AUDIO
            if suffix in AUDIO_SUFFIXES
            else (DataKind.TEXT)
        )
    if not path.is_dir():
        raise DataError(f"expected a folder of images or WAV files, or a text file, at {str(path)!r}; no such path")
    suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
    found = [k for k, s in ((DataKind.IMAGES, IMAGE_SUFFIXES), (DataKind.AUDIO, AUDIO_SUFFIXES)) if suffixes & set(s)]
    if len(found) != 1:
        raise DataError(
            f"expected a folder of images or of WAV files at {str(path)!r}; found "
            + ("both" if found else f"files ending {sorted(suffixes)[:8]}"),
            hint="pass --kind images|audio",
        )
    return found[0]


def _tokenizer_path(opts: BuildOptions, model_path: Path | None) -> str:
    if opts.tokenizer is not None:
        return opts.tokenizer
    for suffix in TOKENIZER_SIDECARS:
        if model_path is not None and (side := model_path.with_name(model_path.stem + suffix)).is_file():
            return str(side)
    raise DataError(
        "expected a tokenizer for text data", hint="pass --tokenizer vocab.txt (WordPiece) or tokenizer.json"
    )


def build(
    specs: Mapping[str, InputSpec],
    inputs: str | Path,
    kind: DataKind | str | None = None,
    opts: BuildOptions | None = None,
    model_path: Path | None = None,
) -> Built:
    """Calibration data for a model with inputs ``specs`` from the files at ``inputs``."""
    opts = opts or BuildOptions()
    kind = detect_kind(inputs) if kind is None else DataKind(kind)
    common = {"input_name": opts.input_name, "limit": opts.limit, "fill": opts.fill}
    if kind is DataKind.IMAGES:
        return build_images(specs, inputs, opts.images, **common)
    if kind is DataKind.AUDIO:
        return build_audio(specs, inputs, opts.audio, **common)
    tokenizer = load_tokenizer(_tokenizer_path(opts, model_path))
    return build_text(specs, inputs, tokenizer, max_length=opts.max_length, **common)
