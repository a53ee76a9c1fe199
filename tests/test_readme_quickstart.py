"""The README's quick start and toolchain recipes, run as written on small files the test makes.

A user with a folder of JPEGs, of WAVs, or a text file reaches `fitonnx recommend` and a model
onnxruntime runs with the README's commands alone: each quick-start block is run in a folder
holding `my_model.onnx` (a bundled model of that modality) and the user's files."""

from __future__ import annotations

import re
import shlex
import shutil
import wave
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli
from fitonnx.model.data import load_npz
from fitonnx.model.graph import input_specs

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "models" / "zoo"
README = (ROOT / "README.md").read_text(encoding="utf-8")
Image = pytest.importorskip("PIL.Image")


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def blocks(text: str, lang: str = "bash") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


COMMAND = re.compile(r'^python -c "(?P<code>.*?)"$|^(?P<line>.+?)$', flags=re.S | re.M)


def run_block(block: str) -> list[str]:
    """Run, in order, each `fitonnx` line through click and each `python -c "..."` (one or more lines)
    in-process."""
    ran = []
    for m in COMMAND.finditer(block.replace("\\\n", " ")):
        if m.group("code") is not None:
            exec(m.group("code").replace("\\\\", "\\").replace('\\"', '"'), {})  # as bash reads "..."
            ran.append("python -c")
            continue
        line = m.group("line").split("  #", 1)[0].strip()
        if line.startswith("fitonnx "):
            result = CliRunner().invoke(cli, shlex.split(line)[1:])
            assert result.exit_code == 0, f"{line}\n{result.stderr}{result.stdout}"
            ran.append(line)
    return ran


def make_jpegs(folder: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (120, 100 + 10 * i, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def make_wavs(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, rate in enumerate((16000, 44100, 8000)):
        n = int(0.25 * rate)
        x = np.sin(np.arange(n) * 0.05) * 8000 + rng.standard_normal(n) * 500
        with wave.open(str(folder / f"{i}.wav"), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(x.astype("<i2").tobytes())


def make_lines(path: Path) -> None:
    path.write_text("the cat sat on the mat.\nwe went to the park and the sun was out.\na dog ran after the ball!\n")


CASES = {
    "images": (ZOO / "mbv3_small_ts.onnx", 0),
    "wavs": (ZOO / "silero_vad_16k_sequence.onnx", 1),
    "text": (ZOO / "tiny_bert_dynamo.onnx", 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quick_start_from_my_files_to_a_deployable_model(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, index = CASES[case]
    shutil.copy(model, tmp_path / "my_model.onnx")
    monkeypatch.chdir(tmp_path)
    if case == "images":
        make_jpegs(tmp_path / "my_images")
    elif case == "wavs":
        make_wavs(tmp_path / "my_wavs")
    else:
        make_lines(tmp_path / "my_lines.txt")
        shutil.copy(ZOO / "tiny_bert_dynamo.vocab.txt", tmp_path / "vocab.txt")
    ran = run_block(blocks(section("Quick start: my model and my data"))[index])
    assert any(r.startswith("fitonnx data ") for r in ran) and any(r.startswith("fitonnx recommend") for r in ran)
    deployable = tmp_path / "out" / "my_model.qdq.onnx"
    session = ort.InferenceSession(str(deployable))
    feed = load_npz(tmp_path / "calib.npz").sample(0, input_specs(onnx.load(str(deployable))))
    assert all(np.isfinite(o).all() for o in session.run(None, feed) if o.dtype.kind == "f")
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(deployable)).graph.node)


def _recipes() -> str:
    return section("Toolchain recipes")


def test_onnxruntime_recipe_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / "models" / "mnist_cnn.onnx", tmp_path / "my_model.onnx")
    shutil.copy(ROOT / "models" / "mnist_cnn.calib.npz", tmp_path / "calib.npz")
    monkeypatch.chdir(tmp_path)
    run_block("fitonnx recommend my_model.onnx --data calib.npz --avg-bits 6 --target ort -o out")
    code = blocks(_recipes(), "python")[0]
    assert "load_overrides" in code and "quantize_static" in code
    exec(code, {})
    qdq = onnx.load(str(tmp_path / "my_model.ort.qdq.onnx"))
    assert any(t.data_type == onnx.TensorProto.INT4 for t in qdq.graph.initializer)
    held = np.load(ROOT / "models" / "mnist_cnn.heldout.npz")
    logits = ort.InferenceSession(str(tmp_path / "my_model.ort.qdq.onnx")).run(None, {"input": held["input"]})[0]
    assert (logits.argmax(1) == held["labels"]).mean() > 0.9


def test_matmulnbits_recipe_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer", reason="onnxruntime >= 1.20's quantizer")
    shutil.copy(ROOT / "models" / "zoo" / "tiny_bert_dynamo.onnx", tmp_path / "my_model.onnx")
    shutil.copy(ROOT / "models" / "zoo" / "tiny_bert_dynamo.calib.npz", tmp_path / "calib.npz")
    monkeypatch.chdir(tmp_path)
    recipe = blocks(_recipes())[0]
    assert "--formats" in recipe and "--target ort" in recipe
    run_block(recipe)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "my_model.qdq.onnx")).graph.node]
    assert ops.count("MatMulNBits") > 0


def test_qnn_input_list_snippet_runs_and_the_commands_use_documented_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(ROOT / "models" / "mnist_cnn.calib.npz", tmp_path / "calib.npz")
    monkeypatch.chdir(tmp_path)
    qnn, trt = blocks(_recipes())[1:3]
    run_block(qnn)  # the python -c part; qnn-onnx-converter is not installed here
    lines = (tmp_path / "input_list.txt").read_text().splitlines()
    assert len(lines) == 256 and lines[0] == "input:=input_0.raw"
    assert np.fromfile(tmp_path / "input_0.raw", np.float32).size == 28 * 28
    converter = shlex.split(qnn.replace("\\\n", " ").split("qnn-onnx-converter", 1)[1])
    # qnn-onnx-converter --help (QNN SDK 2.x): these flags take a value each
    assert set(converter[::2]) <= {"--input_network", "--quantization_overrides", "--input_list", "--output_path"}
    trtexec = shlex.split(trt.split("trtexec", 1)[1])
    assert {a.split("=")[0] for a in trtexec} <= {"--onnx", "--int8", "--fp16", "--saveEngine", "--stronglyTyped"}
