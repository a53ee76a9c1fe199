"""Shared helpers of the model-zoo scripts: paths, real text, real photos, text rendering, .npz writing.

Everything here is deterministic given a seed: the text comes from Python's own standard library
(the Zen of Python and module docstrings), the photos from scikit-learn's two sample images, the
glyphs from the font embedded in Pillow (``ImageFont.load_default(size=...)``, Pillow >= 10.1), so
a rebuild on another machine needs no fonts, no downloads and no data sets.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "models" / "zoo"

# Modules whose docstrings are plain English prose (checked on CPython 3.11).
_DOC_MODULES = (
    "argparse",
    "bisect",
    "collections",
    "difflib",
    "fractions",
    "heapq",
    "json",
    "pickle",
    "random",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "tokenize",
    "zipfile",
)


def zen_of_python() -> list[str]:
    """The 19 aphorisms of ``import this`` (stored ROT13 in the module), without printing them."""
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    text = codecs.decode(this.s, "rot13")
    return [line.strip() for line in text.splitlines()[2:] if line.strip()]


def english_sentences() -> list[str]:
    """Real English sentences: the Zen of Python, then sentences of standard-library docstrings."""
    sentences = zen_of_python()
    for name in _DOC_MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        flat = re.sub(r"\s+", " ", doc)
        for sentence in re.split(r"(?<=[.!?])\s+", flat):
            sentence = sentence.strip()
            if 20 <= len(sentence) <= 200 and sentence.isascii() and re.search(r"[a-z]{3}", sentence):
                sentences.append(sentence)
    return sentences


def text_snippets(max_chars: int, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` word-boundary snippets of at most ``max_chars`` characters from ``english_sentences``."""
    snippets: list[str] = []
    sentences = english_sentences()
    for index in rng.permutation(len(sentences)):
        words = sentences[index].split()
        start = int(rng.integers(0, max(1, len(words) - 2)))
        line = ""
        for word in words[start:]:
            if len(line) + len(word) + 1 > max_chars:
                break
            line = f"{line} {word}".strip()
        if len(line) >= 6:
            snippets.append(line)
        if len(snippets) == count:
            return snippets
    raise ValueError(f"expected {count} snippets; found only {len(snippets)}")


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two sample photographs (china.jpg, flower.jpg), uint8 RGB, 427x640."""
    from sklearn.datasets import load_sample_images

    return [np.asarray(img, dtype=np.uint8) for img in load_sample_images().images]


def photo_crop(size: tuple[int, int], rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A random crop of a sample photo covering ``scale`` times ``size`` pixels, resized to ``size`` (h, w)."""
    photos = sample_photos()
    photo = photos[int(rng.integers(len(photos)))]
    height, width = size
    crop_h = min(photo.shape[0], round(height * scale))
    crop_w = min(photo.shape[1], round(width * scale))
    top = int(rng.integers(0, photo.shape[0] - crop_h + 1))
    left = int(rng.integers(0, photo.shape[1] - crop_w + 1))
    crop = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    return np.asarray(crop.resize((width, height), Image.BILINEAR), dtype=np.uint8)


@dataclass(frozen=True)
class RenderedLine:
    """One rendered text line: the uint8 RGB image and the text drawn on it."""

    image: np.ndarray
    text: str


def render_text_line(text: str, height: int, rng: np.random.Generator) -> RenderedLine:
    """Dark text on a light, slightly textured background (a faded photo crop), like a scanned or photographed line."""
    font = ImageFont.load_default(size=round(height * rng.uniform(0.55, 0.7)))
    left, top, right, bottom = font.getbbox(text)
    margin = int(rng.integers(2, max(3, height // 4)))
    width = right - left + 2 * margin
    background = photo_crop((height, width), rng, scale=rng.uniform(0.5, 2.0)).astype(np.float32)
    paper = rng.uniform(190, 250, size=3)
    fade = rng.uniform(0.75, 0.95)
    canvas = Image.fromarray(np.clip(fade * paper + (1 - fade) * background, 0, 255).astype(np.uint8))
    ink = tuple(int(v) for v in rng.uniform(0, 80, size=3))
    y = (height - (bottom - top)) // 2 - top
    ImageDraw.Draw(canvas).text((margin - left, y), text, font=font, fill=ink)
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 3, size=(height, width, 3))
    return RenderedLine(image=np.clip(pixels, 0, 255).astype(np.uint8), text=text)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 HxWxC image (Pillow; the deployed pipelines use cv2.resize)."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), dtype=np.uint8)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` with ``np.savez_compressed`` and check that they load back without pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    with np.load(path, allow_pickle=False) as loaded:
        for key, array in arrays.items():
            if loaded[key].dtype != array.dtype or loaded[key].shape != array.shape:
                raise RuntimeError(
                    f"expected {key} {array.dtype}{array.shape} in {path}; found {loaded[key].dtype}{loaded[key].shape}"
                )
    print(
        f"  wrote {path.relative_to(REPO)} ({path.stat().st_size / 1e3:.0f} kB): "
        + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
    )


def espeak_utterance(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """``text`` spoken by espeak-ng (Debian package espeak-ng), float32 mono in [-1, 1] at 16 kHz."""
    import shutil
    import subprocess
    import tempfile

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("expected the espeak-ng program (apt-get install espeak-ng); found none on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "utterance.wav"
        # Text on stdin: a sentence starting with "-" would otherwise be read as an option.
        command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), "--stdin"]
        subprocess.run(command, input=text.encode(), check=True)
        rate, samples = wavfile.read(wav)
    if rate != 22050 or samples.dtype != np.int16:
        raise RuntimeError(f"expected 22050 Hz int16 from espeak-ng; found {rate} Hz {samples.dtype}")
    return resample_poly(samples.astype(np.float32) / 32768.0, 320, 441).astype(np.float32)


def speech_stream(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """About ``seconds`` of 16 kHz audio: espeak-ng sentences (several voices, speeds, loudness) separated
    by 0.2-1.5 s pauses, over low coloured background noise, like a microphone recording of speech."""
    voices = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp", "en-us+m4")
    pieces: list[np.ndarray] = []
    total = 0
    sentences = english_sentences()
    while total < seconds * 16000:
        pause = np.zeros(int(rng.uniform(0.2, 1.5) * 16000), dtype=np.float32)
        voice = voices[int(rng.integers(len(voices)))]
        utterance = espeak_utterance(
            sentences[int(rng.integers(len(sentences)))], voice, int(rng.integers(130, 200)), int(rng.integers(30, 70))
        )
        utterance *= rng.uniform(0.1, 0.8) / max(1e-6, float(np.abs(utterance).max()))
        pieces += [pause, utterance]
        total += pause.size + utterance.size
    audio = np.concatenate(pieces)[: int(seconds * 16000)]
    white = rng.normal(0, 1, audio.size).astype(np.float32)
    coloured = np.convolve(white, np.ones(8, dtype=np.float32) / 8, mode="same")  # low-passed: room/fan-like noise
    return (audio + rng.uniform(0.002, 0.01) * coloured / coloured.std()).astype(np.float32)
