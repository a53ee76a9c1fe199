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
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

if TYPE_CHECKING:
    import onnxruntime as ort

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


def word_snippet(sentence: str, max_chars: int, rng: np.random.Generator) -> str:
    """The words of ``sentence`` from a random one on, as many as fit in ``max_chars`` characters."""
    words = sentence.split()
    start = int(rng.integers(0, max(1, len(words) - 2)))
    line = ""
    for word in words[start:]:
        if len(line) + len(word) + 1 > max_chars:
            break
        line = f"{line} {word}".strip()
    return line


def text_snippets(max_chars: int, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` word-boundary snippets of at most ``max_chars`` characters from ``english_sentences``."""
    snippets: list[str] = []
    sentences = english_sentences()
    for index in rng.permutation(len(sentences)):
        line = word_snippet(sentences[index], max_chars, rng)
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


@dataclass(frozen=True)
class LineStyle:
    """How ``draw_text_line`` draws: the glyphs' share of the line height (a range), the darkest ink
    channel's upper bound and the largest Gaussian blur radius."""

    font_share: tuple[float, float]
    ink_max: float
    blur_max: float


def draw_text_line(
    text: str, height: int, rng: np.random.Generator, style: LineStyle, paper: Callable[[int, int], Image.Image]
) -> Image.Image:
    """``text`` in Pillow's embedded font, dark ink on ``paper(height, width)``, between random margins,
    then blurred: the steps of every rendered text line, in the order they draw from ``rng``."""
    font = ImageFont.load_default(size=round(height * rng.uniform(*style.font_share)))
    left, top, right, bottom = font.getbbox(text)
    margin = int(rng.integers(2, max(3, height // 4)))
    canvas = paper(height, right - left + 2 * margin)
    ink = tuple(int(v) for v in rng.uniform(0, style.ink_max, size=3))
    y = (height - (bottom - top)) // 2 - top
    ImageDraw.Draw(canvas).text((margin - left, y), text, font=font, fill=ink)
    return canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, style.blur_max))))


PHOTO_LINE = LineStyle(font_share=(0.55, 0.7), ink_max=80, blur_max=0.8)


def render_text_line(text: str, height: int, rng: np.random.Generator) -> RenderedLine:
    """Dark text on a light, slightly textured background (a faded photo crop), like a scanned or photographed line."""

    def faded_photo(height: int, width: int) -> Image.Image:
        background = photo_crop((height, width), rng, scale=rng.uniform(0.5, 2.0)).astype(np.float32)
        paper = rng.uniform(190, 250, size=3)
        fade = rng.uniform(0.75, 0.95)
        return Image.fromarray(np.clip(fade * paper + (1 - fade) * background, 0, 255).astype(np.uint8))

    canvas = draw_text_line(text, height, rng, PHOTO_LINE, faded_photo)
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 3, size=(height, canvas.width, 3))
    return RenderedLine(image=np.clip(pixels, 0, 255).astype(np.uint8), text=text)


def ocr_lines(
    texts: list[str], width: int, rng: np.random.Generator, render: Callable[[str, int], np.ndarray], turn_odd: bool
) -> np.ndarray:
    """RapidOCR cls/rec inputs [N, 3, 48, width] of ``texts``, each rendered by ``render(text, height)``
    32-63 px high; with ``turn_odd`` every other line is turned by 180 degrees."""
    lines = []
    for k, text in enumerate(texts):
        image = render(text, int(rng.integers(32, 64)))
        lines.append(ocr_line_tensor(image[::-1, ::-1] if turn_odd and k % 2 else image, 48, width))
    return np.stack(lines)


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


def utterances(seconds: float, rng: np.random.Generator, speak: Callable[[], np.ndarray]) -> np.ndarray:
    """``seconds`` of 16 kHz audio: ``speak()``'s utterances at random loudness, each after a 0.2-1.5 s pause."""
    pieces: list[np.ndarray] = []
    total = 0
    while total < seconds * 16000:
        pause = np.zeros(int(rng.uniform(0.2, 1.5) * 16000), dtype=np.float32)
        utterance = speak()
        utterance *= rng.uniform(0.1, 0.8) / max(1e-6, float(np.abs(utterance).max()))
        pieces += [pause, utterance]
        total += pause.size + utterance.size
    return np.concatenate(pieces)[: int(seconds * 16000)]


def speech_stream(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """About ``seconds`` of 16 kHz audio: espeak-ng sentences (several voices, speeds, loudness) separated
    by 0.2-1.5 s pauses, over low coloured background noise, like a microphone recording of speech."""
    voices = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp", "en-us+m4")
    sentences = english_sentences()

    def speak() -> np.ndarray:
        voice = voices[int(rng.integers(len(voices)))]
        text = sentences[int(rng.integers(len(sentences)))]
        return espeak_utterance(text, voice, int(rng.integers(130, 200)), int(rng.integers(30, 70)))

    audio = utterances(seconds, rng, speak)
    white = rng.normal(0, 1, audio.size).astype(np.float32)
    coloured = np.convolve(white, np.ones(8, dtype=np.float32) / 8, mode="same")  # low-passed: room/fan-like noise
    return (audio + rng.uniform(0.002, 0.01) * coloured / coloured.std()).astype(np.float32)


def session(name: str) -> ort.InferenceSession:
    """The zoo model ``name`` in onnxruntime on the CPU, its log quiet."""
    import onnxruntime as ort  # only the scripts that run models need it

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(ZOO / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])


def ocr_normalize(bgr: np.ndarray) -> np.ndarray:
    """RapidOCR's normalisation: uint8 HWC -> float32 CHW in [-1, 1]."""
    return ((bgr.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)


def ocr_line_tensor(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """RapidOCR's cls/rec input: BGR, resized to ``height`` keeping the aspect ratio (width capped at
    ``width``), normalised, zero-padded on the right."""
    h, w = rgb.shape[:2]
    resized_w = min(width, math.ceil(height * w / h))
    chw = ocr_normalize(resize(np.ascontiguousarray(rgb[:, :, ::-1]), height, resized_w))
    padded = np.zeros((3, height, width), dtype=np.float32)
    padded[:, :, :resized_w] = chw
    return padded


def ctc_read(rec: ort.InferenceSession, x: np.ndarray, texts: list[str]) -> tuple[int, np.ndarray]:
    """How many of ``texts`` the PaddleOCR recogniser reads exactly from ``x`` by greedy CTC (spaces
    ignored), and its output probabilities."""
    characters = ["<blank>", *rec.get_modelmeta().custom_metadata_map["character"].splitlines(), " "]
    probabilities = rec.run(None, {"x": x})[0]
    exact = 0
    for text, row in zip(texts, probabilities.argmax(-1), strict=True):
        keep = [int(c) for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        exact += "".join(characters[c] for c in keep).replace(" ", "") == text.replace(" ", "")
    return exact, probabilities


def vad_chunks(audio: np.ndarray, frame: int = 512, context: int = 64) -> np.ndarray:
    """Streaming frames with the previous frame's last ``context`` samples prepended: [chunks, context + frame]."""
    frames = audio[: audio.size // frame * frame].reshape(-1, frame)
    contexts = np.concatenate([np.zeros((1, context), np.float32), frames[:-1, -context:]])
    return np.concatenate([contexts, frames], axis=1)


def vad_samples(name: str, chunks: np.ndarray, count: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run the streaming Silero model ``name`` over ``chunks`` (state carried) and keep ``count`` evenly
    spaced chunks with the state it carried into each; also their speech probabilities."""
    model = session(name)
    state = np.zeros((2, 1, 128), np.float32)
    states, probabilities = [], []
    for chunk in chunks:
        states.append(state)
        probability, state = model.run(None, {"input": chunk[None], "state": state, "sr": np.array(16000, np.int64)})
        probabilities.append(float(probability[0, 0]))
    keep = np.linspace(8, len(chunks) - 1, count).round().astype(int)
    arrays = {
        "input": chunks[keep][:, None, :].astype(np.float32),
        "state": np.stack([states[i] for i in keep]).astype(np.float32),
        "sr": np.full(count, 16000, dtype=np.int64),
    }
    return arrays, np.array(probabilities)[keep]


def bert_words(text: str, index: dict[str, int]) -> list[int]:
    """``text`` word-tokenised (lower case, words and single punctuation marks) into vocabulary ids."""
    return [index.get(t, index["[UNK]"]) for t in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())]


def bert_row(
    words: list[int], index: dict[str, int], rng: np.random.Generator, ids: np.ndarray, mask: np.ndarray
) -> None:
    """Write ``words`` into the rows ``ids``/``mask`` (in place) as [CLS] ... [SEP], 15% of them [MASK]ed,
    cut to the row's length."""
    words = [index["[MASK]"] if rng.random() < 0.15 else w for w in words[: ids.size - 2]]
    tokens = [index["[CLS]"], *words, index["[SEP]"]]
    ids[: len(tokens)] = tokens
    mask[: len(tokens)] = 1
