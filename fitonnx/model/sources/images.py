"""Images → a model's image input: resize, centre crop, channel order, layout, mean/std.

Pillow decodes the files (``pip install 'fitonnx[images]'``); it is imported only when images are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fitonnx.errors import DataError
from fitonnx.model.data import Dataset
from fitonnx.model.graph import InputSpec
from fitonnx.model.sources.common import Built, collect_files, complete, pick_input

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class ImageOptions:
    """How pixels become the input: ``x = (pixel · scale − mean) / std`` per channel, after resizing the
    shorter side to ``resize`` and cropping the centre ``size`` (height, width); None: from the model."""

    size: tuple[int, int] | None = None
    resize: int | None = None
    resize_ratio: float = 1.0  # resize = ratio × the crop's shorter side when ``resize`` is None
    layout: str | None = None
    channels: str = "RGB"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


IMAGE_PRESETS: dict[str, ImageOptions] = {
    # torchvision's ImageNet evaluation transform: resize 256, crop 224, RGB, ImageNet mean/std
    "imagenet": ImageOptions(
        resize_ratio=256 / 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels="RGB"
    ),
    "unit": ImageOptions(),  # pixels / 255 in [0, 1]
    "symmetric": ImageOptions(mean=(0.5,), std=(0.5,)),  # (pixels / 255 − 0.5) / 0.5 in [−1, 1]
    "raw": ImageOptions(scale=1.0),  # 0–255
    # OpenCV-style models (Caffe, PaddleOCR's BGR): BGR, ImageNet mean/std in BGR order
    "imagenet-bgr": ImageOptions(
        resize_ratio=256 / 224, mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229), channels="BGR"
    ),
}
PRESET_HELP = {
    "imagenet": "resize 256/224 × crop, RGB, ImageNet mean/std",
    "unit": "pixels/255",
    "symmetric": "(pixels/255 − 0.5)/0.5",
    "raw": "0–255",
    "imagenet-bgr": "as imagenet in BGR",
}


def image_options(preset: str | None, **overrides) -> ImageOptions:
    """A preset (default ``unit``) with the options given (not None) replacing its values."""
    if preset is not None and preset not in IMAGE_PRESETS:
        raise DataError(f"expected an image preset among {sorted(IMAGE_PRESETS)}; found {preset!r}")
    base = IMAGE_PRESETS[preset or "unit"]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _layout(spec: InputSpec, layout: str | None) -> str:
    if layout is not None:
        if layout not in LAYOUTS:
            raise DataError(f"expected a layout among {LAYOUTS}; found {layout!r}")
        return layout
    if spec.rank != 4:
        raise DataError(f"expected a rank-4 image input; {spec.name!r} is {spec.display()}")
    if spec.shape[1] in (1, 3):
        return "NCHW"
    if spec.shape[3] in (1, 3):
        return "NHWC"
    raise DataError(
        f"expected 1 or 3 channels on axis 1 or 3 of {spec.name!r} {spec.display()}; cannot tell the layout",
        hint="pass --layout NCHW or NHWC",
    )


def _geometry(spec: InputSpec, opts: ImageOptions, layout: str) -> tuple[int, int, int]:
    """(channels, height, width) of one image as the model reads it."""
    c, h, w = (spec.shape[1], spec.shape[2], spec.shape[3]) if layout == "NCHW" else spec.shape[3:] + spec.shape[1:3]
    if opts.size is not None:
        h, w = opts.size
    if h is None or w is None:
        raise DataError(f"expected a fixed height and width for {spec.name!r} {spec.display()}", hint="pass --size HxW")
    if c not in (1, 3):
        raise DataError(f"expected 1 or 3 channels for {spec.name!r}; found {c}")
    return int(c), int(h), int(w)


def _per_channel(values: Sequence[float], c: int, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.size == c or v.size == 1:
        return np.broadcast_to(v, (c,)).copy()
    if c == 1:
        return np.array([v.mean()])  # a colour preset on a grey model: the mean of its channels
    raise DataError(f"expected 1 or {c} values for {what}; found {list(values)}")


def _pixels(path: Path, c: int, h: int, w: int, opts: ImageOptions) -> np.ndarray:
    """One image as float64 [h, w, c] in the requested channel order, resized and centre-cropped."""
    # Pillow is an optional dependency (fitonnx[images]), needed only to decode images
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if c == 1 else "RGB")
        short = opts.resize or round(opts.resize_ratio * min(h, w))
        factor = max(short / min(img.size), h / img.size[1], w / img.size[0])
        size = (max(w, round(img.size[0] * factor)), max(h, round(img.size[1] * factor)))
        img = img.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        img = img.crop((left, top, left + w, top + h))
        a = np.asarray(img, dtype=np.float64).reshape(h, w, c)
    return a[..., ::-1] if opts.channels == "BGR" and c == 3 else a


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def build_images(
    specs: Mapping[str, InputSpec],
    root: str | Path,
    opts: ImageOptions,
    *,
    input_name: str | None = None,
    limit: int | None = None,
    fill: Mapping[str, float] | None = None,
) -> Built:
    """Every image under ``root`` (a folder, searched recursively, or one file) as the model's image input."""
    spec = pick_input(specs, input_name, "images", lambda s: s.rank == 4 and np.issubdtype(s.dtype, np.floating))
    layout = _layout(spec, opts.layout)
    c, h, w = _geometry(spec, opts, layout)
    if opts.channels not in CHANNEL_ORDERS:
        raise DataError(f"expected a channel order among {CHANNEL_ORDERS}; found {opts.channels!r}")
    mean, std = _per_channel(opts.mean, c, "--mean"), _per_channel(opts.std, c, "--std")
    if np.any(std == 0):
        raise DataError("expected non-zero --std values")
    files = collect_files(root, IMAGE_SUFFIXES, "images")
    images, skipped = [], []
    for path in files:
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append((_pixels(path, c, h, w, opts) * opts.scale - mean) / std)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            skipped.append((str(path), str(exc).splitlines()[0][:120]))
    if not images:
        raise DataError(f"expected readable images under {str(root)!r}; none could be decoded")
    batch = np.stack(images)  # [n, h, w, c]
    if layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    arrays, notes = complete({spec.name: batch.astype(spec.dtype)}, specs, fill or {})
    geometry = f"{layout} {c}×{h}×{w}, {'grey' if c == 1 else opts.channels}, x = (pixel·{opts.scale:g} − mean)/std, mean {_fmt(mean)}, "
    notes = (geometry + f"std {_fmt(std)}", *notes)
    read = len(images) + len(skipped)
    return Built(Dataset(arrays=arrays, source=str(root)), "images", read, tuple(skipped), notes)
