"""`fitonnx data` from images, WAV files and text lines, and data-loader scripts, end to end."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli
from fitonnx.errors import DataError
from fitonnx.model.graph import InputSpec
from fitonnx.model.sources.audio import frames, read_wav, resample
from fitonnx.model.sources.images import build_images, image_options
from fitonnx.model.sources.script import LoaderScript
from fitonnx.model.sources.text import WordPiece, load_tokenizer

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
Image = pytest.importorskip("PIL.Image")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def make_jpegs(folder: Path, n: int = 6, size: tuple[int, int] = (40, 52)) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(sub / f"{i}.jpg")
    return folder


def make_wavs(folder: Path, rates: tuple[int, ...] = (16000, 8000), seconds: float = 0.5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for rate in rates:
        with wave.open(str(folder / f"speech_{rate}.wav"), "wb") as f:
            f.setnchannels(2)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes((rng.standard_normal((int(rate * seconds), 2)) * 3000).astype("<i2").tobytes())
    return folder


def make_lines(path: Path) -> Path:
    path.write_text("the quick brown fox jumps over the lazy dog.\n\nhello world, this is a test!\n")
    return path


def test_image_folder_to_npz_with_imagenet_preset(tmp_path: Path) -> None:
    folder = make_jpegs(tmp_path / "imgs")
    (folder / "broken.jpg").write_text("not an image")
    out = tmp_path / "calib.npz"
    code, stdout, err = run("data", ZOO / "mbv3_small_ts.onnx", folder, "-o", out, "--preset", "imagenet")
    assert code == 0, err
    assert "images: 6 samples" in stdout and "skipped" in stdout and "shape [6, 3, 96, 96] float32" in stdout
    x = np.load(out)["input"]
    assert x.shape == (6, 3, 96, 96) and x.dtype == np.float32
    assert -2.2 < x.min() < -1.5 and 2.0 < x.max() < 2.7  # ImageNet-normalised pixels of noise images


def test_image_pipeline_matches_a_hand_computation(tmp_path: Path) -> None:
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2
    Image.fromarray(img).save(tmp_path / "x.png")
    specs = {"x": InputSpec("x", np.dtype(np.float32), (None, 4, 4, 3))}  # NHWC, crop 4x4 of a 4x6 image
    opts = image_options("symmetric", channels="BGR")
    built = build_images(specs, tmp_path, opts)
    want = (img[:, 1:5, ::-1].astype(np.float64) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(built.dataset.arrays["x"][0], want, atol=1e-6)


def test_wav_folder_to_npz_resampled_and_framed(tmp_path: Path) -> None:
    folder = make_wavs(tmp_path / "wav")
    out = tmp_path / "calib.npz"
    code, stdout, err = run("data", ZOO / "silero_vad_16k_sequence.onnx", folder, "-o", out)
    assert code == 0, err
    data = np.load(out)
    # 0.5 s at 16 kHz twice (the 8 kHz file resampled): 8000 // 576 = 13 frames each
    assert data["input"].shape == (26, 576) and data["h"].shape == (26, 1, 1, 128)
    assert "resampled 8000 → 16000 Hz" in stdout and "filled with 0" in stdout


def test_wav_reading_resampling_and_framing_by_hand(tmp_path: Path) -> None:
    with wave.open(str(tmp_path / "a.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)
        f.writeframes(np.array([0, 16384, -16384, 32767], "<i2").tobytes())
    x, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and np.allclose(x, [0, 0.5, -0.5, 32767 / 32768])
    np.testing.assert_allclose(resample(np.array([0.0, 1.0, 0.0]), 1, 2), [0, 0.5, 1, 0.5, 0, 0])
    assert frames(np.arange(10.0), 4, 3).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert frames(np.arange(2.0), 4, 4).tolist() == [[0, 1, 0, 0]]


def test_text_lines_with_the_models_vocab(tmp_path: Path) -> None:
    lines = make_lines(tmp_path / "lines.txt")
    out = tmp_path / "calib.npz"
    code, _, err = run("data", ZOO / "tiny_bert_dynamo.onnx", lines, "-o", out, "--max-length", "16")
    assert code == 0, err
    data = np.load(out)
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int64
    vocab = (ZOO / "tiny_bert_dynamo.vocab.txt").read_text().splitlines()
    assert ids[0, 0] == vocab.index("[CLS]") and ids[0, mask[0].sum() - 1] == vocab.index("[SEP]")
    assert (ids[mask == 0] == vocab.index("[PAD]")).all()


def test_wordpiece_splits_like_bert() -> None:
    tok = WordPiece({t: i for i, t in enumerate(["[UNK]", "un", "##aff", "##able", "hello", ",", "!"])})
    assert tok.words("Héllo, UNAFFABLE!") == ["hello", ",", "unaffable", "!"]
    assert tok.encode("Héllo, UNAFFABLE!") == [4, 5, 1, 2, 3, 6]
    assert tok.encode("xyz") == [0]


def test_tokenizer_json_wordpiece(tmp_path: Path) -> None:
    import json

    spec = {
        "model": {"type": "WordPiece", "vocab": {"[UNK]": 0, "hi": 1}, "unk_token": "[UNK]"},
        "normalizer": {"lowercase": False},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.encode("hi Hi") == [1, 0] and not tok.lowercase
    spec["model"]["type"] = "BPE"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="WordPiece"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_data_errors_are_one_line(tmp_path: Path) -> None:
    code, _, err = run("data", ZOO / "mbv3_small_ts.onnx", tmp_path, "-o", tmp_path / "c.npz")
    assert code == 2 and "expected a folder of images or of WAV files" in err
    lines = make_lines(tmp_path / "l.txt")
    code, _, err = run("data", ZOO / "mbv3_small_ts.onnx", lines, "-o", tmp_path / "c.npz")
    assert code == 2 and "tokenizer" in err


LOADER = """
import numpy as np

def load_data():
    rng = np.random.default_rng(0)
    for i in range(6):
        yield {"input": rng.random((1, 1, 28, 28), dtype=np.float32), "labels": np.array([i % 10])}

def other():
    return [{"input": np.zeros((1, 1, 28, 28), np.float32)}] * 3
"""


def test_data_loader_script_feeds_score(tmp_path: Path, cnn_path: Path) -> None:
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    code, out, err = run("score", cnn_path, "--data-loader-script", script, "--top", "2")
    assert code == 0, err
    assert "6 samples" in out and "empirical" in out
    code, out, err = run("score", cnn_path, "--data", f"{script}:other", "--top", "2")
    assert code == 0, err
    assert "3 samples" in out and "mc Fisher" in out
    code, _, err = run("score", cnn_path, "--data-loader-script", f"{script}:missing")
    assert code == 2 and "expected a function 'missing'" in err


def test_loader_script_parse() -> None:
    assert LoaderScript.parse("a/b.py:fn") == LoaderScript("a/b.py", "fn")
    assert LoaderScript.parse("C:\\x\\b.py") == LoaderScript("C:\\x\\b.py", "load_data")


def test_one_hot_float_labels_are_named_in_a_warning(tmp_path: Path, cnn_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 28, 28), dtype=np.float32)
    np.savez(tmp_path / "c.npz", input=x, labels=np.eye(10, dtype=np.float32)[[1, 2, 3, 4]])
    code, _, err = run("score", cnn_path, "--data", tmp_path / "c.npz", "--top", "1")
    assert code == 0 and "look one-hot" in err and "labels.argmax(-1)" in err
    np.savez(tmp_path / "d.npz", input=x, labels=np.array([1, 2, 3, 4]))
    code, _, err = run("score", cnn_path, "--data", tmp_path / "d.npz", "--top", "1")
    assert code == 0 and "one-hot" not in err
