"""WAV files → a model's audio input: PCM decoded with the standard library, mixed to mono, resampled
linearly to the model's rate and cut into frames of the input's length."""

from __future__ import annotations

import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitonnx.errors import DataError
from fitonnx.model.data import Dataset
from fitonnx.model.graph import InputSpec
from fitonnx.model.sources.common import Built, collect_files, complete, pick_input

AUDIO_SUFFIXES = (".wav", ".wave")
DEFAULT_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class AudioOptions:
    """``sample_rate`` the model expects; ``frame`` samples per input (None: the input's last axis);
    ``hop`` between frame starts (None: ``frame``, no overlap)."""

    sample_rate: int = DEFAULT_SAMPLE_RATE
    frame: int | None = None
    hop: int | None = None


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float64 samples in [−1, 1] and the file's sample rate (8/16/24/32-bit integer PCM)."""
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as exc:
        raise DataError(f"expected integer PCM WAV in {str(path)!r}: {exc}") from None
    if width == 1:
        x = np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float64)
    elif width in (2, 4):
        x = np.frombuffer(raw, np.dtype(f"<i{width}")).astype(np.float64)
    else:
        raise DataError(f"expected 8-, 16-, 24- or 32-bit PCM in {str(path)!r}; found {8 * width}-bit")
    x = x / float(2 ** (8 * width - 1))
    return x.reshape(-1, channels).mean(axis=1), rate


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear interpolation from ``rate`` to ``target`` samples per second."""
    if rate == target or x.size == 0:
        return x
    n = max(1, round(x.size * target / rate))
    return np.interp(np.arange(n) * (rate / target), np.arange(x.size), x)


def frames(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
    """Frames [k, frame] starting every ``hop`` samples; a signal shorter than a frame is zero-padded."""
    if x.size < frame:
        x = np.pad(x, (0, frame - x.size))
    starts = range(0, x.size - frame + 1, hop)
    return np.stack([x[s : s + frame] for s in starts])


def _frame_shape(spec: InputSpec, frame: int | None) -> tuple[int, ...]:
    """One sample's shape: the frame on the last axis, every other axis 1 (batch axis dropped)."""
    if spec.rank < 1:
        raise DataError(f"expected an audio input with a time axis; {spec.name!r} is a scalar")
    last = spec.shape[-1] if frame is None else frame
    if last is None:
        raise DataError(
            f"expected a fixed length on the last axis of {spec.name!r} {spec.display()}",
            hint="pass --frame N (samples per input)",
        )
    if spec.shape[-1] is not None and spec.shape[-1] != last:
        raise DataError(f"expected --frame {spec.shape[-1]} for {spec.name!r} {spec.display()}; found {frame}")
    middle = spec.shape[1:-1]
    if any(d not in (None, 1) for d in middle):
        raise DataError(
            f"expected an audio input [batch, ..., time] with 1s between; {spec.name!r} is {spec.display()}"
        )
    return (*[1] * len(middle), int(last)) if spec.rank > 1 else ()


def build_audio(
    specs: Mapping[str, InputSpec],
    root: str | Path,
    opts: AudioOptions,
    *,
    input_name: str | None = None,
    limit: int | None = None,
    fill: Mapping[str, float] | None = None,
) -> Built:
    """Frames of every WAV under ``root`` (a folder or one file) as the model's audio input."""
    # the signal has a symbolic (batch or time) axis; recurrent states [1, 1, 128] have none
    spec = pick_input(specs, input_name, "audio", lambda s: np.issubdtype(s.dtype, np.floating) and None in s.shape)
    shape = _frame_shape(spec, opts.frame)
    frame = shape[-1] if shape else (opts.frame or 1)
    chunks, skipped, notes = [], [], []
    for path in collect_files(root, AUDIO_SUFFIXES, "WAV files"):
        if limit is not None and sum(len(c) for c in chunks) >= limit:
            break
        try:
            x, rate = read_wav(path)
        except DataError as exc:
            skipped.append((str(path), exc.message))
            continue
        if rate != opts.sample_rate:
            notes.append(f"{path.name}: resampled {rate} → {opts.sample_rate} Hz")
        chunks.append(frames(resample(x, rate, opts.sample_rate), frame, opts.hop or frame))
    if not chunks:
        raise DataError(f"expected readable WAV files under {str(root)!r}; none could be decoded")
    batch = np.concatenate(chunks)[:limit]
    batch = batch.reshape(len(batch), *shape) if shape else batch[:, 0]
    arrays, filled = complete({spec.name: batch.astype(spec.dtype)}, specs, fill or {})
    head = f"frames of {frame} samples at {opts.sample_rate} Hz, hop {opts.hop or frame}"
    ds = Dataset(arrays=arrays, source=str(root))
    return Built(ds, "audio", len(chunks) + len(skipped), tuple(skipped), (head, *notes[:5], *filled))
