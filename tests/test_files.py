"""fitonnx.files: the output layer (checks, atomic writes, staged folders) and the bounded readers."""

from __future__ import annotations

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
from numpy.lib import format as npy_format
from onnx import TensorProto, helper, numpy_helper

from fitonnx.errors import DataError, FitonnxError
from fitonnx.files import (
    MARKER,
    Interrupted,
    LazyNpz,
    Limit,
    OutputPlan,
    RandomSamples,
    StagedFolder,
    json_text,
    model_inputs,
    nonfinite_paths,
    open_regular,
    read_regular_file,
    read_tensor_pb,
    write_atomic,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model bytes")
    return path


def plan_for(*inputs: Path, force: bool = False) -> OutputPlan:
    return OutputPlan([("the model", inputs[0]), *[("the calibration data", p) for p in inputs[1:]]], force=force)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- the output checker -------------------------------------------------------------------------


def test_output_equal_to_an_input_is_refused_with_one_line(model: Path) -> None:
    with pytest.raises(FitonnxError) as err:
        plan_for(model).file("--json", str(model))
    assert (
        str(err.value)
        == f"--json {model}: refusing to overwrite an input of this command (the model); choose another path"
    )
    assert "\n" not in str(err.value)


def test_output_onto_calibration_data_names_its_role(model: Path, tmp_path: Path) -> None:
    calib = tmp_path / "c.npz"
    calib.write_bytes(b"x")
    with pytest.raises(FitonnxError, match=r"\(the calibration data\)"):
        plan_for(model, calib).file("--csv", str(calib))


def test_dotdot_path_resolving_to_an_input_is_refused(model: Path, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(FitonnxError, match="refusing to overwrite an input"):
        plan_for(model).file("--json", str(tmp_path / "sub" / ".." / "m.onnx"))


def test_symlink_to_an_input_is_refused_even_with_force(model: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(model)
    with pytest.raises(FitonnxError, match="symbolic link"):
        plan_for(model).file("--json", str(link))
    with pytest.raises(FitonnxError, match="refusing to overwrite an input"):
        plan_for(model, force=True).file("--json", str(link))


def test_folder_symlink_in_the_path_resolving_to_an_input_is_refused(model: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(FitonnxError, match="refusing to overwrite an input"):
        plan_for(model).file("--json", str(tmp_path / "alias" / "m.onnx"))


def test_hard_link_of_an_input_is_refused(model: Path, tmp_path: Path) -> None:
    hard = tmp_path / "hard.json"
    os.link(model, hard)
    with pytest.raises(FitonnxError, match=r"refusing to overwrite an input of this command \(the model\)"):
        plan_for(model).file("--json", str(hard))


def test_external_data_files_are_inputs(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    proto = helper.make_model(graph)
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    roles = dict((p.name, role) for role, p in model_inputs(path))
    assert roles == {"ext.onnx": "the model", "ext.bin": "the model's external data 'ext.bin'"}
    with pytest.raises(FitonnxError, match=r"external data 'ext\.bin'"):
        OutputPlan(model_inputs(path)).file("--out", str(tmp_path / "ext.bin"), default_name="x.json")


def test_existing_symlink_is_refused_unless_forced_then_written_through(model: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(FitonnxError, match=r"found a symbolic link to .*real\.json.*--force"):
        plan_for(model).file("--json", str(link))
    target = plan_for(model, force=True).file("--json", str(link))
    assert target is not None
    target.write("{}\n")
    assert link.is_symlink() and real.read_text() == "{}\n"


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (lambda p: os.mkfifo(p), "a FIFO"),
        (lambda p: p.mkdir(), "a folder"),
    ],
)
def test_special_files_are_refused(model: Path, tmp_path: Path, make, found: str) -> None:
    special = tmp_path / "special"
    make(special)
    with pytest.raises(FitonnxError, match=f"expected a (regular file|file path); found {found}"):
        plan_for(model).file("--json", str(special))
    assert not stat.S_ISREG(special.lstat().st_mode)


def test_device_is_refused_and_left_alone(model: Path) -> None:
    with pytest.raises(FitonnxError, match="expected a regular file; found a device"):
        plan_for(model).file("--json", "/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_socket_is_refused(model: Path, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(FitonnxError, match="found a socket"):
            plan_for(model).file("--json", str(path))


def test_empty_path_and_dash(model: Path) -> None:
    with pytest.raises(FitonnxError, match="--json '': expected a path; found an empty string"):
        plan_for(model).file("--json", "")
    with pytest.raises(FitonnxError, match="standard output is only for JSON and CSV"):
        plan_for(model).file("--plot", "-")
    plan = plan_for(model)
    target = plan.file("--json", "-", stdout_ok=True)
    assert target is not None and target.stdout
    with pytest.raises(FitonnxError, match="standard output is already the output of --json"):
        plan.file("--csv", "-", stdout_ok=True)
    with pytest.raises(FitonnxError, match="expected a folder path"):
        plan_for(model).folder("--out", "")


def test_dash_writes_standard_output(model: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = plan_for(model).file("--json", "-", stdout_ok=True)
    assert target is not None
    target.write('{"a": 1}\n')
    assert capsys.readouterr().out == '{"a": 1}\n'
    assert not (tmp_path / "-").exists() and not Path("-").exists()


def test_missing_or_unwritable_folder_is_found_before_any_work(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FitonnxError, match="expected an existing folder"):
        plan_for(model).file("--json", str(tmp_path / "nope" / "r.json"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: let the access check say what it would
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, m: real_access(p, m) and Path(p) != locked)
        with pytest.raises(FitonnxError, match="is not writable"):
            plan_for(model).file("--json", str(locked / "r.json"))
        with pytest.raises(FitonnxError, match="is not writable"):
            plan_for(model).folder("--out", str(locked / "out"))
    finally:
        locked.chmod(0o700)


def test_two_outputs_on_one_path_are_refused(model: Path, tmp_path: Path) -> None:
    plan = plan_for(model)
    plan.file("--json", str(tmp_path / "r"))
    with pytest.raises(FitonnxError, match="is also the output of --json"):
        plan.file("--csv", str(tmp_path / "r"))


def test_trailing_slash_means_a_folder_created_at_write_time(model: Path, tmp_path: Path) -> None:
    target = plan_for(model).file("--out", str(tmp_path / "newdir") + "/", default_name="model.qdq.onnx")
    assert target is not None and target.path == tmp_path / "newdir" / "model.qdq.onnx"
    assert not (tmp_path / "newdir").exists()  # nothing on disk before the work is done
    target.write(b"q")
    assert (tmp_path / "newdir" / "model.qdq.onnx").read_bytes() == b"q"
    with pytest.raises(FitonnxError, match="expected a file path; found a folder"):
        plan_for(model).file("--json", str(tmp_path / "other") + "/")


def test_existing_folder_means_default_name_inside(model: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    target = plan_for(model).file("--out", str(tmp_path / "out"), default_name="a.json")
    assert target is not None and target.path == tmp_path / "out" / "a.json"


# --- atomic writes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_users_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        write_atomic(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~mask


def test_failed_write_removes_the_temporary_file_and_keeps_the_old(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("old")

    with pytest.raises(TypeError):
        write_atomic(tmp_path / "r.json", lambda f: f.write(42))  # type: ignore[arg-type]
    assert listing(tmp_path) == ["r.json"] and (tmp_path / "r.json").read_text() == "old"


def test_write_error_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FitonnxError, match="could not create a file"):
        write_atomic(tmp_path / "missing" / "r.json", "{}")


# --- staged output folders ------------------------------------------------------------------------


def test_staged_folder_appears_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StagedFolder(out) as staging:
        (staging / "a.json").write_text("1")
        assert not out.exists()
    assert listing(tmp_path) == ["out", f"out/{MARKER}", "out/a.json"]


def test_staged_folder_is_cleaned_on_an_exception_and_the_old_output_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StagedFolder(out) as staging:
        (staging / "old.json").write_text("1")
    with pytest.raises(RuntimeError), StagedFolder(out) as staging:
        (staging / "new.json").write_text("2")
        raise RuntimeError("computation failed")
    assert listing(tmp_path) == ["out", f"out/{MARKER}", "out/old.json"]


def test_rerun_replaces_the_folder_whole_no_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StagedFolder(out) as staging:
        (staging / "qnn.encodings").write_text("old target")
    with StagedFolder(out) as staging:
        (staging / "overrides.json").write_text("new target")
    assert listing(tmp_path) == ["out", f"out/{MARKER}", "out/overrides.json"]


def test_folder_not_written_by_fitonnx_is_refused(model: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(
        FitonnxError, match=f"expected a new or empty folder, or one fitonnx wrote \\(it has {MARKER}\\)"
    ):
        plan_for(model).folder("--out", str(mine))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plan_for(model).folder("--out", str(empty)) is not None


def test_folder_holding_an_input_is_refused(model: Path, tmp_path: Path) -> None:
    with pytest.raises(FitonnxError, match=r"the folder holds an input of this command \(the model\)"):
        plan_for(model).folder("--out", str(tmp_path))


def test_folder_output_that_is_a_file_is_refused(model: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(FitonnxError, match="expected a folder; found a regular file"):
        plan_for(model).folder("--out", str(tmp_path / "f"))


def test_handlers_are_restored_after_staging(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StagedFolder(tmp_path / "o"):
        assert signal.getsignal(signal.SIGTERM) not in before[:1]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sigint_inside_staging_raises_interrupted_and_cleans(tmp_path: Path) -> None:
    with pytest.raises(Interrupted) as err, StagedFolder(tmp_path / "o") as staging:
        (staging / "part.json").write_text("1")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert err.value.exit_code == 130
    assert listing(tmp_path) == []


def test_a_signal_just_after_the_staging_folder_is_made_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """The signal lands once the folder exists but before its maker has returned its name (a CLI
    run under load was once SIGTERMed there and left the folder)."""
    mkdir = os.mkdir

    def mkdir_then_signal(path, *args, **kwargs) -> None:
        mkdir(path, *args, **kwargs)
        if str(path).endswith(".staging"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises here

    monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    with pytest.raises(Interrupted) as err, StagedFolder(tmp_path / "o"):
        pass
    assert err.value.exit_code == 143
    assert listing(tmp_path) == []


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_real_signal_to_a_subprocess_cleans_the_staging(tmp_path: Path, sig: int, code: int) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from fitonnx.files import Interrupted, StagedFolder
        try:
            with StagedFolder(Path({str(tmp_path / "out")!r})) as staging:
                (staging / "half.json").write_text("1")
                print("staged", flush=True)
                time.sleep(30)
        except Interrupted as exc:
            sys.exit(exc.exit_code)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
    assert any(p.name.endswith(".staging") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == code
    assert listing(tmp_path) == []


# --- JSON that is always valid --------------------------------------------------------------------


def test_json_nulls_non_finite_and_escapes_surrogates() -> None:
    bad_name = b"conv\xff".decode("utf-8", "surrogateescape")
    value = {"a": float("nan"), "b": [np.float32("inf"), 1.5, np.int64(3)], bad_name: np.array([1.0, -np.inf])}
    assert nonfinite_paths(value) == ["$.a", "$.b[0]"]
    text = json_text(value)
    text.encode("utf-8")  # encodable: no lone surrogates
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == {
        "a": None,
        "b": [None, 1.5, 3],
        "conv\\udcff": [1.0, None],
    }


# --- readers --------------------------------------------------------------------------------------


def test_reader_refuses_fifo_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "input_0.pb"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(DataError, match="to be a regular file; found a FIFO"):
        read_tensor_pb(fifo)
    assert time.monotonic() - start < 5


def test_reader_refuses_devices_and_folders(tmp_path: Path) -> None:
    link = tmp_path / "input_0.pb"
    link.symlink_to("/dev/zero")
    with pytest.raises(DataError, match="found a character device"):
        read_tensor_pb(link)
    with pytest.raises(DataError, match="found a folder"):
        open_regular(tmp_path, "a calibration .npz")


def test_size_limit_is_checked_before_reading_and_names_the_option(tmp_path: Path) -> None:
    sparse = tmp_path / "big.pb"
    with open(sparse, "wb") as f:
        f.truncate(2 * 2**30)  # a 2 GiB sparse file: refused from its size, never read
    with pytest.raises(DataError) as err:
        read_regular_file(sparse, Limit.megabytes(1), "a TensorProto file")
    assert "2.00 GiB exceeds the 1.00 MiB read limit" in str(err.value)
    assert "--max-data-mb 2048" in str(err.value)


def _npz_declaring(path: Path, shape: tuple[int, ...], dtype: str = "<f4", fortran: bool = False) -> None:
    """A tiny zip whose member's .npy header declares ``shape`` (the payload is a few bytes)."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": fortran, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("input.npy", header.getvalue() + b"\0" * 16)


def test_npz_declaring_a_huge_array_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.npz"
    _npz_declaring(path, (2**20, 1024))  # declares 4 GiB; holds 16 bytes
    assert path.stat().st_size < 1000
    with pytest.raises(DataError, match=r"declares shape \[1048576, 1024\] float32 \(4.00 GiB\) but holds 16 bytes"):
        LazyNpz(path)


def test_npz_huge_but_honest_member_is_refused_by_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, input=np.zeros((64, 1024, 256), np.float32))  # 64 MiB of zeros, tiny on disk
    with LazyNpz(path, Limit.megabytes(8)) as npz:
        m = npz.members["input"]
        assert (m.shape, m.dtype) == ((64, 1024, 256), np.dtype(np.float32))
        with pytest.raises(DataError, match=r"64\.00 MiB exceeds the 8\.00 MiB read limit"):
            npz.read("input")
        rows = npz.read_rows("input", 0, 4)  # 4 MiB: within the limit, read without the rest
        assert rows.shape == (4, 1024, 256) and not rows.any()


def test_npz_rows_match_numpy(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x = np.arange(5 * 3 * 2, dtype=np.float64).reshape(5, 3, 2)
    f = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(4, 3))
    np.savez(path, input=x, f=f, labels=np.arange(5), s=np.float32(7))
    with LazyNpz(path) as npz:
        assert sorted(npz.members) == ["f", "input", "labels", "s"]
        np.testing.assert_array_equal(npz.read_rows("input", 1, 3), x[1:3])
        np.testing.assert_array_equal(npz.read_rows("input", 3, 99), x[3:])
        np.testing.assert_array_equal(npz.read("input"), x)
        np.testing.assert_array_equal(npz.read_rows("f", 1, 3), f[1:3])
        assert npz.read("s") == np.float32(7) and npz.num_rows("s") == 0
        assert npz.num_rows("labels") == 5


def test_npz_object_array_refused_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"holds an object array .* needs pickle"):
        LazyNpz(path)


def test_npy_or_other_file_where_an_npz_is_expected(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(DataError, match=r"found a single \.npy array \(save it with np\.savez"):
        LazyNpz(tmp_path / "x.npy")
    (tmp_path / "t.npz").write_text("hello")
    with pytest.raises(DataError, match="found a file that is not a zip archive"):
        LazyNpz(tmp_path / "t.npz")


def test_truncated_npz_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, input=np.ones((8, 8), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        LazyNpz(path)
    assert "\n" not in str(err.value)


def _pb(tmp_path: Path, tensor: TensorProto, name: str = "input_0.pb") -> Path:
    path = tmp_path / name
    path.write_bytes(tensor.SerializeToString())
    return path


def test_tensor_pb_round_trip(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    np.testing.assert_array_equal(read_tensor_pb(_pb(tmp_path, numpy_helper.from_array(x))), x)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (TensorProto(), "the file is empty"),
        (TensorProto(dims=[1, 2], name="t"), "with an element type; found none"),
        (TensorProto(dims=[1, 2], data_type=999), "expected a known element type; found data_type 999"),
        (TensorProto(dims=[2, 3], data_type=TensorProto.FLOAT), "declares dims \\[2, 3\\] but holds no data"),
        (numpy_helper.from_array(np.float32(3)), "at least 1 axes"),
    ],
)
def test_malformed_tensor_pb_is_one_line(tmp_path: Path, tensor: TensorProto, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        read_tensor_pb(_pb(tmp_path, tensor), min_rank=1)
    assert "\n" not in str(err.value)


def test_tensor_pb_declaring_huge_dims_refused_before_decoding(tmp_path: Path) -> None:
    t = TensorProto(dims=[2**20, 2**20], data_type=TensorProto.FLOAT)
    with pytest.raises(DataError, match="exceeds the"):
        read_tensor_pb(_pb(tmp_path, t))


def test_tensor_pb_external_data_resolves_against_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = tmp_path / "test_data_set_0"
    sets.mkdir()
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    (sets / "x.bin").write_bytes(x.tobytes())
    t = TensorProto(dims=[1, 4], data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value="x.bin")
    pb = _pb(sets, t)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "x.bin").write_bytes(np.zeros(4, np.float32).tobytes())  # the wrong file, in the cwd
    monkeypatch.chdir(elsewhere)
    np.testing.assert_array_equal(read_tensor_pb(pb), x)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", ""])
def test_tensor_pb_external_data_may_not_escape(tmp_path: Path, location: str) -> None:
    sets = tmp_path / "set"
    sets.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    t = TensorProto(dims=[1, 4], data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=location)
    with pytest.raises(DataError, match="expected a file inside"):
        read_tensor_pb(_pb(sets, t))


def test_random_samples_are_lazy_and_deterministic() -> None:
    specs = {"x": ((1, 28, 28), np.dtype(np.float32)), "ids": ((7,), np.dtype(np.int64))}
    rs = RandomSamples(specs, 5_000_000, seed=3)  # 5e6 * 3 KiB would be 15 GiB if built up front
    head = rs.head(4)
    assert head["x"].shape == (4, 1, 28, 28) and head["ids"].shape == (4, 7)
    assert head["x"].dtype == np.float32 and set(np.unique(head["ids"])) <= {0, 1}
    np.testing.assert_array_equal(rs.sample(2)["x"], head["x"][2])
    np.testing.assert_array_equal(RandomSamples(specs, 10, seed=3).sample(2)["x"], head["x"][2])
    assert not np.array_equal(RandomSamples(specs, 10, seed=4).sample(2)["x"], head["x"][2])
    assert len(rs) == 5_000_000


def test_random_samples_refuse_negative_seed() -> None:
    with pytest.raises(FitonnxError, match="expected a seed of 0 or more; found -1"):
        RandomSamples({"x": ((2,), np.dtype(np.float32))}, 4, seed=-1)


def test_lazy_npz_peak_memory_is_independent_of_the_member_size(tmp_path: Path) -> None:
    """Reading 4 rows of a 512 MiB (compressed, all-zero) member stays far below its size."""
    path = tmp_path / "zeros.npz"
    row = np.zeros((1024, 1024), np.float32).tobytes()  # 4 MiB per sample, 128 samples
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (128, 1024, 1024)})
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z,
        z.open("input.npy", "w", force_zip64=True) as f,
    ):
        f.write(header.getvalue())
        for _ in range(128):
            f.write(row)
    script = textwrap.dedent(
        f"""
        import resource
        from fitonnx.files import LazyNpz
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with LazyNpz({str(path)!r}) as npz:
            assert npz.read_rows("input", 0, 4).shape == (4, 1024, 1024)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert int(out.stdout.strip()) < 64  # MiB grown while reading: the 16 MiB of rows, not the 512 MiB member
