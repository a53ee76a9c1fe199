"""Write realistic calibration data ``models/zoo/<model>.calib.npz`` for the zoo's models.

Each file holds one array per model input, named after the input. Two layouts (see the zoo README):

* batch axis: a model whose inputs all have a batch axis 0 gets arrays ``[N, ...]``;
* one extra axis: a model with a state input whose batch axis is not axis 0, a scalar input, or no batch
  axis at all gets arrays with one more axis than the model input, axis 0 indexing samples, each slice
  fed whole (so ``input [N, 1, 576]`` feeds ``[1, 576]`` N times, ``sr [N]`` feeds a scalar).

The data imitates what each model sees in deployment, with the deployed pre-processing:

* OCR models (RapidOCR's conventions: BGR, ``(x/255 - 0.5)/0.5``, height 48, right zero padding): English
  text lines (the Zen of Python, standard-library docstrings) drawn with Pillow's embedded font on faded
  crops of scikit-learn's sample photos; for the detector, text boxes pasted onto photo crops; the
  direction classifier gets half of its lines rotated by 180 degrees and ``labels`` (0 = upright, 1 = 180).
* Silero VAD models: 16 kHz speech synthesised by espeak-ng (several voices and speeds, pauses,
  background noise); the model is run over the whole stream and each sample is one chunk with the
  recurrent state the model itself carried into it (what the streaming wrapper feeds).
* mbv3_small_ts: ImageNet-normalised crops of the sample photos (not the crops its BN statistics saw).
* tiny_bert_dynamo: the English sentences, word-tokenised with its vocabulary, [CLS] ... [SEP], 15% of the
  words replaced by [MASK], padded to 32 with an attention mask.
* gru_charlm_dynamo: 24-character snippets of the text with the GRU state carried in from the text before.

Each file is checked by running the model in onnxruntime on every sample; the script prints what the real
models make of the data (OCR accuracy, share of chunks the VAD calls speech), so the data can be trusted.

Needs: /work/zoovenv (torch is not needed here; numpy, scipy, scikit-learn, pillow, onnxruntime) and the
espeak-ng program (``apt-get install espeak-ng``). Run after fetch_wheels.py and export_torch.py::

    /work/zoovenv/bin/python scripts/zoo/make_calib.py [model ...]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_common

SEED = 0
ZOO = zoo_common.ZOO


def _photo_line(rng: np.random.Generator) -> Callable[[str, int], np.ndarray]:
    return lambda text, height: zoo_common.render_text_line(text, height, rng).image


def calib_ppocr_cls(count: int = 32) -> dict[str, np.ndarray]:
    """Text lines at 3x48x192, every other one rotated by 180 degrees; labels 0 (upright) / 1 (rotated)."""
    rng = np.random.default_rng(SEED)
    x = zoo_common.ocr_lines(zoo_common.text_snippets(24, count, rng), 192, rng, _photo_line(rng), turn_odd=True)
    y = np.arange(count, dtype=np.int64) % 2
    probabilities = zoo_common.session("ppocr_cls_mbv3").run(None, {"x": x})[0]
    print(f"  direction classifier accuracy on these lines: {np.mean(probabilities.argmax(1) == y):.3f}")
    return {"x": x, "labels": y}


def calib_ppocrv4_rec(count: int = 32) -> dict[str, np.ndarray]:
    """Text lines at 3x48x320 (RapidOCR's rec shape); prints the greedy CTC read-out accuracy."""
    rng = np.random.default_rng(SEED + 1)
    texts = zoo_common.text_snippets(28, count, rng)
    x = zoo_common.ocr_lines(texts, 320, rng, _photo_line(rng), turn_odd=False)
    correct, probabilities = zoo_common.ctc_read(zoo_common.session("ppocrv4_rec_svtr"), x, texts)
    print(f"  recogniser reads {correct}/{count} lines exactly (spaces ignored); output {list(probabilities.shape)}")
    return {"x": x}


def calib_ppocrv4_det(count: int = 16, size: int = 160) -> dict[str, np.ndarray]:
    """Photo crops (size x size) with 1-4 light text boxes; prints mean probability on and off the text."""
    rng = np.random.default_rng(SEED + 2)
    images, masks = [], []
    for _ in range(count):
        canvas = Image.fromarray(zoo_common.photo_crop((size, size), rng, scale=rng.uniform(1.0, 3.0)))
        draw = ImageDraw.Draw(canvas)
        mask = np.zeros((size, size), dtype=bool)
        y = int(rng.integers(4, 30))
        for text in zoo_common.text_snippets(18, int(rng.integers(1, 5)), rng):
            font = ImageFont.load_default(size=int(rng.integers(12, 24)))
            left, top, right, bottom = font.getbbox(text)
            x = int(rng.integers(2, 24))
            draw.rectangle(
                [x + left - 3, y + top - 3, x + right + 3, y + bottom + 3],
                fill=tuple(int(v) for v in rng.uniform(190, 255, 3)),
            )
            draw.text((x, y), text, font=font, fill=tuple(int(v) for v in rng.uniform(0, 70, 3)))
            mask[y + top : y + bottom, x + left : min(size, x + right)] = True
            y += bottom + int(rng.integers(6, 24))
            if y > size - 26:
                break
        images.append(zoo_common.ocr_normalize(np.asarray(canvas)[:, :, ::-1]))
        masks.append(mask)
    x = np.stack(images)
    maps = zoo_common.session("ppocrv4_det_dbnet").run(None, {"x": x})[0][:, 0]
    on, off = maps[np.stack(masks)].mean(), maps[~np.stack(masks)].mean()
    print(f"  detector probability: {on:.3f} on text boxes, {off:.4f} elsewhere; output {list(maps.shape)}")
    return {"x": x}


def vad_stream() -> np.ndarray:
    """The shared 20 s speech stream of the VAD calibration sets (deterministic)."""
    return zoo_common.speech_stream(20.0, np.random.default_rng(SEED + 3))


def calib_silero_streaming(name: str, count: int = 32) -> dict[str, np.ndarray]:
    """Run the streaming model over the stream (state carried), keep ``count`` evenly spaced chunks."""
    chunks = zoo_common.vad_chunks(vad_stream())
    arrays, kept = zoo_common.vad_samples(name, chunks, count)
    print(
        f"  {len(chunks)} chunks; kept {count}: {np.mean(kept > 0.5):.2f} called speech (p > 0.5), p from {kept.min():.3f} to {kept.max():.3f}"
    )
    return arrays


def calib_silero_sequence(count: int = 16, frames: int = 16) -> dict[str, np.ndarray]:
    """Blocks of ``frames`` chunks, each with the LSTM (h, c) the model carried in from the blocks before."""
    model = zoo_common.session("silero_vad_16k_sequence")
    chunks = zoo_common.vad_chunks(vad_stream())
    blocks = chunks[: len(chunks) // frames * frames].reshape(-1, frames, chunks.shape[1])
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    hs, cs, probabilities = [], [], []
    for block in blocks:
        hs.append(h)
        cs.append(c)
        p, h, c = model.run(None, {"input": block, "h": h, "c": c})
        probabilities.append(p)
    keep = np.linspace(1, len(blocks) - 1, count).round().astype(int)
    kept = np.concatenate([probabilities[i] for i in keep])
    print(
        f"  {len(blocks)} blocks of {frames} chunks; kept {count}: {np.mean(kept > 0.5):.2f} of their chunks called speech"
    )
    return {
        "input": blocks[keep].astype(np.float32),
        "h": np.stack([hs[i] for i in keep]),
        "c": np.stack([cs[i] for i in keep]),
    }


def calib_mbv3(count: int = 32, size: int = 96) -> dict[str, np.ndarray]:
    """ImageNet-normalised photo crops (seeds disjoint from the BN-statistics crops of export_torch.py)."""
    rng = np.random.default_rng(SEED + 100)
    crops = np.stack([zoo_common.photo_crop((size, size), rng, scale=rng.uniform(1.0, 4.0)) for _ in range(count)])
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    x = ((crops.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy()
    logits = zoo_common.session("mbv3_small_ts").run(None, {"input": x})[0]
    print(f"  logits std {logits.std():.3f}, {len(set(logits.argmax(1).tolist()))} distinct argmax classes")
    return {"input": x}


def calib_tiny_bert(count: int = 32, length: int = 32) -> dict[str, np.ndarray]:
    """Word-tokenised sentences with 15% [MASK], [CLS]/[SEP], padded to ``length``."""
    vocab = (ZOO / "tiny_bert_dynamo.vocab.txt").read_text().splitlines()
    index = {token: i for i, token in enumerate(vocab)}
    rng = np.random.default_rng(SEED + 4)
    ids = np.zeros((count, length), dtype=np.int64)
    mask = np.zeros((count, length), dtype=np.int64)
    sentences = zoo_common.english_sentences()
    for row, pick in enumerate(rng.permutation(len(sentences))[:count]):
        zoo_common.bert_row(zoo_common.bert_words(sentences[pick], index), index, rng, ids[row], mask[row])
    logits = zoo_common.session("tiny_bert_dynamo").run(None, {"input_ids": ids, "attention_mask": mask})[0]
    print(f"  {int(mask.sum())} real tokens of {mask.size}; logits {list(logits.shape)} std {logits.std():.3f}")
    return {"input_ids": ids, "attention_mask": mask}


def calib_char_gru(count: int = 32, length: int = 24) -> dict[str, np.ndarray]:
    """``length``-character windows of the running text, with the GRU state carried in from the text before.

    24 is the sequence length the dynamo exporter baked into the declared output shape (see the README).
    """
    text = " ".join(zoo_common.english_sentences())
    codes = np.array([ord(ch) - 31 if 32 <= ord(ch) < 127 else 0 for ch in text], dtype=np.int64)
    windows = codes[: codes.size // length * length].reshape(-1, length)
    model = zoo_common.session("gru_charlm_dynamo")
    h = np.zeros((1, 1, 64), np.float32)
    states = []
    for window in windows:
        states.append(h)
        _, h = model.run(None, {"tokens": window[None], "h0": h})
    keep = np.linspace(1, len(windows) - 1, count).round().astype(int)
    print(
        f"  {len(windows)} windows of the text; kept {count}; state norm {np.mean([np.linalg.norm(states[i]) for i in keep]):.2f}"
    )
    return {"tokens": windows[keep][:, None, :], "h0": np.stack([states[i] for i in keep])}


CALIBRATIONS: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "ppocr_cls_mbv3": calib_ppocr_cls,
    "ppocrv4_det_dbnet": calib_ppocrv4_det,
    "ppocrv4_rec_svtr": calib_ppocrv4_rec,
    "silero_vad": lambda: calib_silero_streaming("silero_vad"),
    "silero_vad_16k_op15": lambda: calib_silero_streaming("silero_vad_16k_op15"),
    "silero_vad_16k_sequence": calib_silero_sequence,
    "mbv3_small_ts": calib_mbv3,
    "tiny_bert_dynamo": calib_tiny_bert,
    "gru_charlm_dynamo": calib_char_gru,
}


def check_runs(name: str, arrays: dict[str, np.ndarray]) -> None:
    """Every sample runs in onnxruntime and gives finite outputs (extra-axis layout when ranks say so)."""
    model = zoo_common.session(name)
    ranks = {i.name: len(i.shape) for i in model.get_inputs()}
    count = len(next(iter(arrays.values())))
    for sample in range(count):
        feeds = {}
        for key, array in arrays.items():
            if key == "labels":
                continue
            feeds[key] = np.asarray(array[sample]) if array.ndim == ranks[key] + 1 else array[sample : sample + 1]
        for output in model.run(None, feeds):
            if not np.all(np.isfinite(output)):
                raise RuntimeError(f"expected finite outputs of {name} on sample {sample}; found non-finite values")


def main(names: list[str]) -> None:
    for name in names or list(CALIBRATIONS):
        if name not in CALIBRATIONS:
            raise SystemExit(f"expected one of {sorted(CALIBRATIONS)}; found {name!r}")
        print(f"{name}:")
        arrays = CALIBRATIONS[name]()
        check_runs(name, arrays)
        zoo_common.save_npz(ZOO / f"{name}.calib.npz", arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
