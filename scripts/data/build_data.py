"""Build small realistic calibration AND held-out sets for the zoo's models with their authors' weights.

Written to ``models/zoo/data/<model>.calib.npz`` and ``models/zoo/data/<model>.heldout.npz``; the two
sets of each model are drawn from disjoint sentences (the first and second halves of
``sentences.SENTENCES`` after a seeded shuffle) and different random renderings or voices, so the
held-out damage is measured on samples the calibration never saw.

* ``ppocr_cls_mbv3`` (PaddleOCR text-direction classifier): English text lines rendered with Pillow
  (its embedded font at 32-64 px, dark ink on plain paper colours, slight blur),
  half of them rotated by 180 degrees, with RapidOCR's preprocessing (BGR, height 48 keeping the aspect
  ratio, width capped at 192 and zero-padded on the right, ``(x/255 - 0.5)/0.5``); ``labels`` 0 upright,
  1 rotated.
* ``ppocrv4_rec_svtr`` (PaddleOCR recogniser): the same kind of lines at 48x320 (RapidOCR's rec shape);
  the script prints how many lines the model reads exactly (greedy CTC).
* ``ppocrv4_det_dbnet`` (PaddleOCR DBNet text detector, 128x128): scenes of text lines, each line
  fitted to the width in Pillow's font at 11-18 px; about 40% of the scenes are crops of
  scikit-learn's two sample photos (the calibration set cuts its crops from the left half of each
  photo, the held-out set from the right half) with most lines on light sign boxes and the rest
  inked directly on the photo in a contrasting colour, the others plain paper; slight blur;
  RapidOCR's detector normalisation (BGR, ``(x/255 - 0.5)/0.5``). Needs scikit-learn for the photos.
  The script prints the mean probability on the lines' cores (each box shrunk by 0.3 of its height,
  about what DBNet's shrunk training targets cover) and on the background (beyond 3 px of every box).
* ``silero_vad_16k_op15`` (Silero VAD): 16 kHz speech synthesised by espeak-ng (when installed; else
  voiced synthetic formant signals, and the script says so) in several English voices, speeds and
  pitches, with pauses and low background noise; the model is run over the whole stream with its state
  carried and each sample is one 512-sample chunk (plus 64 samples of context) with the state the model
  carried into it, as the streaming wrapper feeds it.
* ``tiny_bert_dynamo`` (random weights, an encoder's layout): the sentences word-tokenised with its
  vocabulary, [CLS] ... [SEP], 15% of words masked, padded to 32.

Needs numpy, Pillow and onnxruntime (the project's /work/venv-ort has them) and, for real speech, the
espeak-ng program. Run from the repository root::

    python scripts/data/build_data.py [model ...]                     # the shipped sets
    python scripts/data/build_data.py --scale 4 --out /tmp/data       # 4x the samples, for studies
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "zoo"))
import zoo_common
from sentences import SENTENCES

ZOO = zoo_common.ZOO
OUT = ZOO / "data"
SEED = 17
CALIB_SEED, HELD_SEED = SEED + 1, SEED + 2  # each builder's seed for the calibration and held-out sets
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp", "en-us+m4", "en-029", "en-gb-x-gbclan")


def split_sentences() -> tuple[list[str], list[str]]:
    """Disjoint halves of the sentences: calibration and held-out."""
    order = np.random.default_rng(SEED).permutation(len(SENTENCES))
    half = len(order) // 2
    return [SENTENCES[i] for i in order[:half]], [SENTENCES[i] for i in order[half:]]


def snippets(sentences: list[str], max_chars: int, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` word-boundary pieces of at most ``max_chars`` characters (cycling through the sentences)."""
    out: list[str] = []
    while len(out) < count:
        line = zoo_common.word_snippet(sentences[int(rng.integers(len(sentences)))], max_chars, rng)
        if len(line) >= 5:
            out.append(line)
    return out


PLAIN_LINE = zoo_common.LineStyle(font_share=(0.55, 0.72), ink_max=90, blur_max=0.9)


def line_renderer(rng: np.random.Generator) -> Callable[[str, int], np.ndarray]:
    """Dark ink on a plain paper colour, slightly blurred (uint8 RGB). Plain paper keeps the shipped
    files small: RapidOCR's bilinear resize already gives every line many distinct float values."""

    def paper(height: int, width: int) -> Image.Image:
        return Image.new("RGB", (width, height), tuple(int(v) for v in rng.uniform(175, 250, size=3)))

    return lambda text, height: np.asarray(zoo_common.draw_text_line(text, height, rng, PLAIN_LINE, paper), np.uint8)


def ppocr_cls(sentences: list[str], count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = zoo_common.ocr_lines(snippets(sentences, 26, count, rng), 192, rng, line_renderer(rng), turn_odd=True)
    y = np.arange(count, dtype=np.int64) % 2
    p = zoo_common.session("ppocr_cls_mbv3").run(None, {"x": x})[0]
    print(
        f"  direction classifier accuracy {np.mean(p.argmax(1) == y):.3f}, mean max probability {p.max(1).mean():.3f}"
    )
    return {"x": x, "labels": y}


def ppocr_rec(sentences: list[str], count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    texts = snippets(sentences, 28, count, rng)
    x = zoo_common.ocr_lines(texts, 320, rng, line_renderer(rng), turn_odd=False)
    exact, _ = zoo_common.ctc_read(zoo_common.session("ppocrv4_rec_svtr"), x, texts)
    print(f"  recogniser reads {exact}/{count} lines exactly (spaces ignored)")
    return {"x": x}


DET_SIZE = 128
DET_PHOTO_SHARE = 0.4


def photo_half_crop(size: int, half: int, rng: np.random.Generator) -> Image.Image:
    """A square crop (``size`` to 2.5 ``size`` pixels wide, resized to ``size``) of the left (``half``
    0) or right (1) half of one of scikit-learn's sample photos: calibration and held-out crops never
    overlap."""
    photos = zoo_common.sample_photos()
    photo = photos[int(rng.integers(len(photos)))]
    width = photo.shape[1] // 2
    region = photo[:, half * width : (half + 1) * width]
    side = min(region.shape[0], width, round(size * rng.uniform(1.0, 2.5)))
    top = int(rng.integers(0, region.shape[0] - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return Image.fromarray(region[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)


def fitted_line(sentence: str, font: ImageFont.FreeTypeFont, width: int, rng: np.random.Generator) -> str:
    """The words of ``sentence`` from a random one on, as many as fit in ``width`` pixels."""
    words = sentence.split()
    start = int(rng.integers(0, max(1, len(words) - 2)))
    line = ""
    for word in words[start:]:
        longer = f"{line} {word}".strip()
        if font.getlength(longer) > width:
            break
        line = longer
    return line


def _ink(canvas: Image.Image, box: tuple[int, int, int, int], photo: bool, rng: np.random.Generator) -> tuple:
    """The ink of one line: on a photo, 3 in 4 lines get a light sign box and dark ink, the others
    dark or light ink against the photo under them; on paper, dark ink."""
    if not photo:
        return tuple(int(v) for v in rng.uniform(0, 90, 3))
    left, top, right, bottom = box
    if rng.uniform() < 0.75:
        paper = tuple(int(v) for v in rng.uniform(190, 255, 3))
        ImageDraw.Draw(canvas).rectangle([left - 3, top - 3, right + 3, bottom + 3], fill=paper)
        return tuple(int(v) for v in rng.uniform(0, 70, 3))
    under = np.asarray(canvas)[top:bottom, left:right].mean()
    return tuple(int(v) for v in (rng.uniform(0, 50, 3) if under > 110 else rng.uniform(210, 255, 3)))


def text_scene(
    sentences: list[str], half: int, rng: np.random.Generator, size: int = DET_SIZE
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """One detector input [3, size, size] and the boxes (left, top, right, bottom) of its lines."""
    photo = rng.uniform() < DET_PHOTO_SHARE
    if photo:
        canvas = photo_half_crop(size, half, rng)
    else:
        canvas = Image.new("RGB", (size, size), tuple(int(v) for v in rng.uniform(175, 250, 3)))
    boxes = []
    y = int(rng.integers(2, 12))
    while True:
        font = ImageFont.load_default(size=int(rng.integers(11, 19)))
        x = int(rng.integers(3, 20))
        text = fitted_line(sentences[int(rng.integers(len(sentences)))], font, size - x - 4, rng)
        left, top, right, bottom = font.getbbox(text)
        if y + bottom + 4 > size:
            break
        if len(text) >= 3:
            box = (x + left, y + top, x + right, y + bottom)
            ImageDraw.Draw(canvas).text((x, y), text, font=font, fill=_ink(canvas, box, photo, rng))
            boxes.append(box)
        y += bottom + int(rng.integers(3, 14))
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.6))))
    return zoo_common.ocr_normalize(np.asarray(canvas)[:, :, ::-1]), boxes


def text_masks(size: int, boxes: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The lines' cores (each box shrunk by 0.3 of its height) and the background (3 px clear of every box)."""
    core = np.zeros((size, size), dtype=bool)
    near = np.zeros((size, size), dtype=bool)
    for left, top, right, bottom in boxes:
        s = round(0.3 * (bottom - top))
        core[top + s : bottom - s, left + s : right - s] = True
        near[max(0, top - 3) : bottom + 3, max(0, left - 3) : right + 3] = True
    return core, ~near


def ppocr_det(sentences: list[str], count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    half = 0 if seed == CALIB_SEED else 1  # calibration crops from the photos' left halves, held-out from the right
    scenes = [text_scene(sentences, half, rng) for _ in range(count)]
    x = np.stack([s[0] for s in scenes])
    masks = [text_masks(DET_SIZE, s[1]) for s in scenes]
    core, background = np.stack([m[0] for m in masks]), np.stack([m[1] for m in masks])
    p = zoo_common.session("ppocrv4_det_dbnet").run(None, {"x": x})[0][:, 0]
    lines = sum(len(s[1]) for s in scenes)
    print(
        f"  {lines} lines on {count} scenes: detector probability {p[core].mean():.3f} on the lines' cores, "
        f"{p[background].mean():.4f} on the background; {np.mean(p > 0.5):.3f} of pixels above 0.5"
    )
    return {"x": x}


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by FFT (numpy only)."""
    n = round(x.size * target / rate)
    spectrum = np.fft.rfft(x)
    keep = n // 2 + 1
    out = np.zeros(keep, dtype=complex)
    out[: min(keep, spectrum.size)] = spectrum[: min(keep, spectrum.size)]
    return (np.fft.irfft(out, n) * n / x.size).astype(np.float32)


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """``text`` spoken by espeak-ng, float32 mono at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "u.wav"
        command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), "--stdin"]
        subprocess.run(command, input=text.encode(), check=True, capture_output=True)
        with wave.open(str(path)) as w:
            rate, frames = w.getframerate(), w.readframes(w.getnframes())
    return _resample(np.frombuffer(frames, np.int16).astype(np.float32) / 32768.0, rate, 16000)


def formant_voice(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A voiced synthetic signal: a glottal pulse train (100-220 Hz, drifting) through three formant
    resonators whose frequencies move syllable by syllable (the fallback without espeak-ng)."""
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = np.cumsum(f0) / 16000
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    out = np.zeros(n)
    syllable = int(0.2 * 16000)
    for start in range(0, n, syllable):
        seg = source[start : start + syllable]
        for f, bw in zip(rng.uniform([300, 900, 2200], [900, 2200, 3200]), (80, 120, 160), strict=True):
            r = np.exp(-np.pi * bw / 16000)
            a1, a2 = -2 * r * np.cos(2 * np.pi * f / 16000), r * r
            y = np.zeros(seg.size)
            for i in range(seg.size):
                y[i] = seg[i] - a1 * (y[i - 1] if i else 0) - a2 * (y[i - 2] if i > 1 else 0)
            out[start : start + seg.size] += y * np.hanning(seg.size)
    return (out / max(1e-9, np.abs(out).max())).astype(np.float32)


def speech_stream(sentences: list[str], seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """About ``seconds`` of 16 kHz audio: utterances separated by 0.2-1.5 s pauses, over low noise."""
    real = shutil.which("espeak-ng") is not None

    def speak() -> np.ndarray:
        if not real:
            return formant_voice(rng.uniform(0.8, 2.5), rng)
        voice = VOICES[int(rng.integers(len(VOICES)))]
        text = sentences[int(rng.integers(len(sentences)))]
        return espeak(text, voice, int(rng.integers(130, 200)), int(rng.integers(25, 75)))

    audio = zoo_common.utterances(seconds, rng, speak)
    noise = np.convolve(rng.normal(0, 1, audio.size), np.ones(8) / 8, mode="same")
    audio = audio + rng.uniform(0.002, 0.01) * noise / noise.std()
    return audio.astype(np.float32), ("espeak-ng speech" if real else "voiced synthetic formant signals (no espeak-ng)")


def silero(
    sentences: list[str], count: int, seed: int, name: str = "silero_vad_16k_op15", seconds: float = 0.0
) -> dict[str, np.ndarray]:
    """``count`` chunks evenly spaced over a stream of at least ``seconds`` (else 1.6x the chunks' length)."""
    rng = np.random.default_rng(seed)
    audio, kind = speech_stream(sentences, max(count * 0.032 * 1.6 + 2.0, seconds), rng)
    chunks = zoo_common.vad_chunks(audio)
    arrays, kept = zoo_common.vad_samples(name, chunks, count)
    print(
        f"  {kind}: {len(chunks)} chunks, kept {count}: {np.mean(kept > 0.5):.2f} called speech, p {kept.min():.3f}..{kept.max():.3f}"
    )
    return arrays


def tiny_bert(sentences: list[str], count: int, seed: int, length: int = 32) -> dict[str, np.ndarray]:
    vocab = (ZOO / "tiny_bert_dynamo.vocab.txt").read_text().splitlines()
    index = {token: i for i, token in enumerate(vocab)}
    rng = np.random.default_rng(seed)
    ids = np.zeros((count, length), dtype=np.int64)
    mask = np.zeros((count, length), dtype=np.int64)
    unknown = total = 0
    for row in range(count):
        words = zoo_common.bert_words(sentences[row % len(sentences)], index)
        unknown += sum(w == index["[UNK]"] for w in words)
        total += len(words)
        zoo_common.bert_row(words, index, rng, ids[row], mask[row])
    print(f"  {total} words, {unknown / max(total, 1):.0%} unknown to the 512-token vocabulary")
    return {"input_ids": ids, "attention_mask": mask}


BUILDERS: dict[str, tuple[Callable[[list[str], int, int], dict[str, np.ndarray]], int, int]] = {
    # model: (builder, calibration samples, held-out samples)
    "ppocr_cls_mbv3": (ppocr_cls, 16, 40),
    "ppocrv4_rec_svtr": (ppocr_rec, 8, 24),
    "ppocrv4_det_dbnet": (ppocr_det, 8, 20),
    "silero_vad_16k_op15": (silero, 48, 256),
    "tiny_bert_dynamo": (tiny_bert, 64, 96),
}
# Held-out sets built otherwise than the calibration set. The VAD's KL lives in the few chunks near
# a speech onset, so its held-out chunks must span many utterances (BENCHMARKS.md, "The VAD's
# calibration and held-out data"): 256 chunks over 4 minutes rank like 8192 (0.98).
HELD_OUT: dict[str, Callable[[list[str], int, int], dict[str, np.ndarray]]] = {
    "silero_vad_16k_op15": functools.partial(silero, seconds=240.0),
}


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    with np.load(tmp, allow_pickle=False) as loaded:
        assert all(loaded[k].shape == v.shape and loaded[k].dtype == v.dtype for k, v in arrays.items())
    tmp.replace(path)
    print(f"  wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


def main(argv: list[str]) -> None:
    """``[--scale K --out DIR] [model ...]``: K times the shipped sample counts (the same recipe and
    seeds; the first samples differ), for studies that need more held-out samples than are shipped."""
    scale, out = 1, OUT
    if "--scale" in argv:
        k = argv.index("--scale")
        scale, argv = int(argv[k + 1]), argv[:k] + argv[k + 2 :]
    if "--out" in argv:
        k = argv.index("--out")
        out, argv = Path(argv[k + 1]), argv[:k] + argv[k + 2 :]
    calib_text, held_text = split_sentences()
    for name in argv or list(BUILDERS):
        if name not in BUILDERS:
            raise SystemExit(f"expected one of {sorted(BUILDERS)}; found {name!r}")
        build, n_calib, n_held = BUILDERS[name]
        print(f"{name}: calibration")
        save(out / f"{name}.calib.npz", build(calib_text, n_calib * scale, CALIB_SEED))
        print(f"{name}: held-out")
        save(out / f"{name}.heldout.npz", HELD_OUT.get(name, build)(held_text, n_held * scale, HELD_SEED))


if __name__ == "__main__":
    main(sys.argv[1:])
