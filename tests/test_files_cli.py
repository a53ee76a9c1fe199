"""The output layer and the bounded readers as every subcommand uses them, end to end through click."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from numpy.lib import format as npy_format
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.cli import score as score_cli
from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError, InternalError, ModelError
from fitonnx.files import MARKER, Limit
from fitonnx.fisher.losses import Likelihood, OutputTarget
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.load import load_model
from fitonnx.score.run import check_traces
from tests.conftest import tiny_classifier

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), path)
    rng = np.random.default_rng(1)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=rng.normal(size=(24, 4)).astype(np.float32), labels=rng.integers(0, 3, 24))
    return path, data


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring fails the test: refusals must come before any computation."""

    def computed(*args: object, **kwargs: object) -> None:
        raise AssertionError("the command computed before refusing its output")

    monkeypatch.setattr(score_cli.api, "score", computed)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("option", "target", "role"),
    [
        ("--json", "tiny.onnx", "the model"),
        ("--csv", "tiny.npz", "the calibration data"),
        ("--json", "sub/../tiny.onnx", "the model"),
        ("--json", "hard.json", "the model"),
    ],
)
def test_score_refuses_an_input_as_output_before_any_work(
    tiny: tuple[Path, Path], no_work: None, option: str, target: str, role: str
) -> None:
    model, data = tiny
    (model.parent / "sub").mkdir()
    os.link(model, model.parent / "hard.json")
    before = model.read_bytes(), data.read_bytes()
    code, _, err = run("score", str(model), "--data", str(data), option, str(model.parent / target))
    assert code == 2 and f"refusing to overwrite an input of this command ({role})" in err
    assert len(err.strip().splitlines()) == 1
    assert (model.read_bytes(), data.read_bytes()) == before


def test_bundled_calibration_file_is_an_input(tmp_path: Path, no_work: None) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes((MODELS / "digits_mlp.onnx").read_bytes())
    (tmp_path / "m.calib.npz").write_bytes((MODELS / "digits_mlp.calib.npz").read_bytes())
    code, _, err = run("score", str(model), "--json", str(tmp_path / "m.calib.npz"))
    assert code == 2 and "(the model's bundled calibration data)" in err


def test_json_dash_is_stdout_and_the_table_moves_to_stderr(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    code, out, err = run("score", str(model), "--data", str(data), "--max-samples", "4", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["samples"] == 4 and "total FIT" in err
    assert not (tmp_path / "-").exists() and not Path("-").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json", ""], "expected a path; found an empty string"),
        (["--json", "r", "--csv", "r"], "is also the output of --json"),
    ],
)
def test_empty_and_doubled_outputs_are_refused(
    tiny: tuple[Path, Path], no_work: None, args: list[str], message: str
) -> None:
    model, data = tiny
    code, _, err = run(
        "score",
        str(model),
        "--data",
        str(data),
        *[a if a in ("", "--json", "--csv") else str(model.parent / a) for a in args],
    )
    assert code == 2 and message in err


def test_outputs_get_the_users_umask(tiny: tuple[Path, Path]) -> None:
    model, data = tiny
    old = os.umask(0o027)
    try:
        code, _, err = run(
            "score", str(model), "--data", str(data), "--max-samples", "2", "--json", str(model.parent / "r.json")
        )
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((model.parent / "r.json").stat().st_mode) == 0o640


def test_symlink_output_needs_force(tiny: tuple[Path, Path]) -> None:
    model, data = tiny
    real = model.parent / "real.json"
    real.write_text("keep")
    (model.parent / "link.json").symlink_to(real)
    base = ["score", str(model), "--data", str(data), "--max-samples", "2", "--json", str(model.parent / "link.json")]
    code, _, err = run(*base)
    assert code == 2 and "--force" in err and real.read_text() == "keep"
    code, _, err = run(*base, "--force")
    assert code == 0, err
    assert (model.parent / "link.json").is_symlink() and json.loads(real.read_text())["samples"] == 2


def test_fifo_as_data_is_refused_without_hanging(tiny: tuple[Path, Path]) -> None:
    model, _ = tiny
    fifo = model.parent / "fifo.npz"
    os.mkfifo(fifo)
    start = time.monotonic()
    code, _, err = run("score", str(model), "--data", str(fifo))
    assert code == 2 and "to be a regular file; found a FIFO" in err and time.monotonic() - start < 10


def test_negative_seed_is_refused_by_click(tiny: tuple[Path, Path]) -> None:
    model, _ = tiny
    code, _, err = run("score", str(model), "--random-data", "4", "--seed", "-1")
    assert code == 2 and "Invalid value for '--seed'" in err and "Traceback" not in err


def test_read_limit_names_its_option_and_lasts_one_command(tiny: tuple[Path, Path]) -> None:
    model, data = tiny
    code, _, err = run("score", str(model), "--data", str(data), "--max-data-mb", "0.0001")
    assert code == 2 and "exceeds the" in err and "--max-data-mb" in err
    assert Limit.current() == Limit()  # the next caller (the Python API here) gets the default again


def test_bug_messages_say_how_to_report_them() -> None:
    assert "please report it" in str(InternalError("an assumption failed"))


def _recommend(model: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run("recommend", str(model), "--data", str(data), "--avg-bits", "4", "--out", str(out), *extra)


def test_recommend_rerun_replaces_the_folder_whole(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    out = tmp_path / "nested" / "out"
    code, _, err = _recommend(model, data, out, "--target", "qnn")
    assert code == 0, err
    assert "tiny.encodings" in listing(out) and MARKER in listing(out)
    code, _, err = _recommend(model, data, out, "--target", "generic")
    assert code == 0, err
    assert "tiny.encodings" not in listing(out) and "recommendation.json" in listing(out)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".staging", ".old", ".tmp"))]


def test_recommend_refuses_folders_it_did_not_write(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, _, err = _recommend(model, data, mine)
    assert code == 2 and "expected a new or empty folder" in err and listing(mine) == ["notes.txt"]
    code, _, err = run("recommend", str(model), "--data", str(data), "--avg-bits", "4", "--out", "")
    assert code == 2 and "expected a folder path" in err


def test_recommend_failure_leaves_nothing(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    before = listing(tmp_path)
    code, _, err = _recommend(model, data, tmp_path / "a" / "b" / "out", "--max-fit", "1")  # two budgets
    assert code == 2 and err.startswith("error: ") and listing(tmp_path) == before


def test_recommend_sigterm_exits_143_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes((MODELS / "mnist_cnn.onnx").read_bytes())
    (tmp_path / "c.npz").write_bytes((MODELS / "mnist_cnn.calib.npz").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["recommend", "m.onnx", "--data", "c.npz", "--avg-bits", "4", "--out", "out"]
    code = "from fitonnx.cli.main import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".out.*.staging")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "interrupted by SIGTERM" in err and "Traceback" not in err
    assert listing(tmp_path) == ["c.npz", "m.onnx"]


def test_export_trailing_slash_makes_a_folder(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    code, _, err = _recommend(model, data, tmp_path / "rec")
    assert code == 0, err
    rec = tmp_path / "rec" / "recommendation.json"
    code, _, err = run(
        "export",
        str(model),
        "--recommendation",
        str(rec),
        "--format",
        "overrides",
        "--out",
        str(tmp_path / "new") + "/",
    )
    assert code == 0, err
    assert listing(tmp_path / "new") == ["ort_overrides.json"]
    code, _, err = run("export", str(model), "--recommendation", str(rec), "--format", "overrides", "--out", str(rec))
    assert code == 2 and "(the recommendation)" in err


def _with_output_times_zero(tmp_path: Path) -> Path:
    model = tiny_classifier()
    model.graph.output[0].name = "z"
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    model.graph.initializer.append(zero)
    model.graph.node.append(helper.make_node("Mul", ["logits", "zero"], ["z"], name="times0"))
    path = tmp_path / "zero.onnx"
    onnx.save(model, path)
    return path


def test_all_zero_traces_are_an_error_saying_why(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Issue 14: no all-zero result is ever reported with exit 0 (the Fisher stage refuses it)."""
    _, data = tiny
    model = _with_output_times_zero(tmp_path)
    code, _, err = run(
        "score", str(model), "--data", str(data), "--max-samples", "4", "--json", str(tmp_path / "r.json")
    )
    assert code == 2, err
    assert "every Fisher trace is 0" in err and "constant output" in err
    assert not (tmp_path / "r.json").exists()


def test_non_finite_traces_are_an_error(tiny: tuple[Path, Path]) -> None:
    """Overflowing gradients stop the engine; traces that still end up NaN stop the report."""
    model, data = tiny
    report = api.score(model, data, options=FisherOptions(max_samples=4))
    target = OutputTarget(output="logits", tap="logits", likelihood=Likelihood.CATEGORICAL, class_axis=1, rank=2)
    assert check_traces(report, target) == ()
    first = dataclasses.replace(report.tensors[0], ef_trace=float("nan"))
    broken = dataclasses.replace(report, tensors=(first, *report.tensors[1:]))
    with pytest.raises(FitonnxError, match=rf"expected finite Fisher traces; 1 of {len(report.tensors)} tensors"):
        check_traces(broken, target)
    huge = data.parent / "huge.npz"
    np.savez(huge, x=np.full((4, 4), 3e38, np.float32), labels=np.zeros(4, np.int64))
    code, _, err = run("score", str(model), "--data", str(huge), "--json", str(data.parent / "r.json"))
    assert code == 2 and "expected finite gradients" in err and not (data.parent / "r.json").exists()


def test_onnxruntime_failure_is_one_line_naming_the_node(tmp_path: Path) -> None:
    proto = onnx.load_model(str(MODELS / "mnist_cnn.onnx"))
    conv = proto.graph.node[0]
    next(a for a in conv.attribute if a.name == "group").i = 3
    onnx.save(proto, tmp_path / "g3.onnx")
    code, _, err = run(
        "score", str(tmp_path / "g3.onnx"), "--data", str(MODELS / "mnist_cnn.calib.npz"), "--max-samples", "2"
    )
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("error: onnxruntime failed running node '/conv1/Conv'")
    assert [ln for ln in lines if ln.startswith("error:")] == lines[:1] and "Traceback" not in err


def test_window_larger_than_its_input_is_refused_before_onnxruntime(tmp_path: Path) -> None:
    proto = onnx.load_model(str(MODELS / "mnist_cnn.onnx"))
    conv2 = proto.graph.node[3]
    strides = next(a for a in conv2.attribute if a.name == "strides")
    strides.ints[:] = [1000, 1000]  # conv2 gives 1x1; the 2x2 MaxPool after it would crash onnxruntime
    onnx.save(proto, tmp_path / "s.onnx")
    code, _, err = run(
        "score", str(tmp_path / "s.onnx"), "--data", str(MODELS / "mnist_cnn.calib.npz"), "--max-samples", "2"
    )
    assert code == 2 and "'/pool_1/MaxPool' (MaxPool): expected a window that fits its input" in err


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.graph.ClearField("output"), "at least one graph output"),
        (lambda p: setattr(p.graph.input[0].type.tensor_type, "elem_type", 0), None),
        (
            lambda p: next(a for a in p.graph.node[0].attribute if a.name == "pads").ints.__setitem__(0, -5),
            "expected pads between 0",
        ),
    ],
)
def test_malformed_models_are_one_line(tmp_path: Path, mutate, message: str | None) -> None:
    proto = onnx.load_model(str(MODELS / "mnist_cnn.onnx"))
    mutate(proto)
    path = tmp_path / "bad.onnx"
    path.write_bytes(proto.SerializeToString())
    code, _, err = run("score", str(path), "--data", str(MODELS / "mnist_cnn.calib.npz"), "--max-samples", "2")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert message is None or message in err


def test_non_utf8_names_and_bad_external_fields_are_refused(tmp_path: Path) -> None:
    raw = (MODELS / "mnist_cnn.onnx").read_bytes().replace(b"conv1.weight", b"conv1.w\xffight")
    (tmp_path / "u.onnx").write_bytes(raw)
    with pytest.raises(ModelError, match=r"the tensor name 'conv1\.w\\\\xffight' is not valid UTF-8"):
        load_model(tmp_path / "u.onnx")
    proto = onnx.load_model(str(MODELS / "mnist_cnn.onnx"))
    t = proto.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="w.bin")
    t.external_data.add(key="length", value="abc")
    (tmp_path / "e.onnx").write_bytes(proto.SerializeToString())
    code, _, err = run("inspect", str(tmp_path / "e.onnx"))
    assert code == 2 and "malformed external-data fields" in err


def _zeros_npz(path: Path, n_samples: int) -> None:
    """An npz with ``n_samples`` all-zero MNIST inputs, streamed through zlib (4 GiB of zeros is ~4 MB)."""
    header = io.BytesIO()
    npy_format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False, "shape": (n_samples, 1, 28, 28)})
    chunk = bytes(3136 * 4096)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("input.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            for start in range(0, n_samples, 4096):
                f.write(chunk[: 3136 * min(4096, n_samples - start)])
        z.writestr("labels.npy", _npy(np.zeros(n_samples, np.int64)))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _peak_rss_mb(cwd: Path, *args: str) -> int:
    script = textwrap.dedent(
        """
        import resource, sys
        from click.testing import CliRunner
        from fitonnx.cli.main import cli
        result = CliRunner().invoke(cli, sys.argv[1:])
        assert result.exit_code == 0, result.output
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_data(tmp_path: Path) -> None:
    """Scoring 4 samples: a 4 GiB-of-zeros npz and --random-data 5000000 cost what 8 samples cost."""
    (tmp_path / "m.onnx").write_bytes((MODELS / "mnist_cnn.onnx").read_bytes())
    n_big = 4 * 2**30 // 3136 + 1  # 4 GiB of float32 inputs
    _zeros_npz(tmp_path / "big.npz", n_big)
    _zeros_npz(tmp_path / "small.npz", 8)
    assert (tmp_path / "big.npz").stat().st_size < 64 * 2**20
    score = ["score", "m.onnx", "--max-samples", "4", "--fisher", "mc"]
    small = _peak_rss_mb(tmp_path, *score, "--data", "small.npz")
    big = _peak_rss_mb(tmp_path, *score, "--data", "big.npz")
    random = _peak_rss_mb(tmp_path, *score, "--random-data", "5000000")
    assert big - small < 100 and random - small < 100, (small, big, random)


def test_export_eval_refuses_labels_out_of_range(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    code, _, err = _recommend(model, data, tmp_path / "rec")
    assert code == 0, err
    held = tmp_path / "held.npz"
    np.savez(held, x=np.zeros((4, 4), np.float32), labels=np.array([0, 1, 7, 2]))
    args = ["export", str(model), "--recommendation", str(tmp_path / "rec" / "recommendation.json")]
    code, out, err = run(*args, "--format", "annotated", "--out", str(tmp_path / "a.onnx"), "--eval", str(held))
    assert code == 2 and "expected labels in [0, 3)" in err and "0.00%" not in out
    assert not (tmp_path / "a.onnx").exists()  # refused before anything was written


def _with_loop_and_sparse() -> onnx.ModelProto:
    """The tiny classifier plus an off-path Loop whose body adds a weight, and a sparse initializer."""
    m = tiny_classifier()
    scalar = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
    ]
    body = helper.make_graph(
        [  # the body computes its own condition (an early exit): prepare cannot unroll the Loop
            helper.make_node("Add", ["v", "w_body"], ["v_out"]),
            helper.make_node("ReduceSum", ["v_out"], ["total"], keepdims=0),
            helper.make_node("Less", ["total", "limit"], ["c_out"]),
        ],
        "body",
        [*scalar, helper.make_tensor_value_info("v", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2]),
        ],
        [numpy_helper.from_array(np.ones(2, np.float32), "w_body"), numpy_helper.from_array(np.float32(100), "limit")],
    )
    consts = [np.array(3, np.int64), np.array(True), np.zeros(2, np.float32)]
    m.graph.initializer.extend(
        numpy_helper.from_array(v, n) for v, n in zip(consts, ["trip", "cond0", "v0"], strict=True)
    )
    m.graph.node.append(helper.make_node("Loop", ["trip", "cond0", "v0"], ["v_final"], body=body, name="loop"))
    m.graph.output.append(helper.make_tensor_value_info("v_final", TensorProto.FLOAT, [2]))
    values = numpy_helper.from_array(np.array([1.5], np.float32), "sp")
    m.graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([3], np.int64)), [8])
    )
    onnx.checker.check_model(m)
    return m


def test_weights_left_out_are_noted(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, data = tiny
    onnx.save(_with_loop_and_sparse(), tmp_path / "loop.onnx")
    code, _, err = run(
        "score",
        str(tmp_path / "loop.onnx"),
        "--data",
        str(data),
        "--max-samples",
        "4",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == 0, err
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("inside Loop/Scan bodies are not scored" in n and "'w_body'" in n for n in notes)
    assert any("1 sparse initializer(s) are not scored, e.g. 'sp'" in n for n in notes)
