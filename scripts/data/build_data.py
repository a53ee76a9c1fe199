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

import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "zoo"))
import zoo_common
from sentences import SENTENCES

ZOO = zoo_common.ZOO
OUT = ZOO / "data"
SEED = 17
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


def silero(sentences: list[str], count: int, seed: int, name: str = "silero_vad_16k_op15") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    audio, kind = speech_stream(sentences, count * 0.032 * 1.6 + 2.0, rng)
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
    "silero_vad_16k_op15": (silero, 48, 128),
    "tiny_bert_dynamo": (tiny_bert, 64, 96),
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
        save(out / f"{name}.calib.npz", build(calib_text, n_calib * scale, SEED + 1))
        print(f"{name}: held-out")
        save(out / f"{name}.heldout.npz", build(held_text, n_held * scale, SEED + 2))


if __name__ == "__main__":
    main(sys.argv[1:])
