"""Two distributions providing the onnxruntime module are refused with one line naming both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fitonnx.errors import FitonnxError
from fitonnx.model.distributions import Provider, check_single_runtime, runtime_providers

ROOT = Path(__file__).resolve().parent.parent


def test_this_environment_has_exactly_one_runtime() -> None:
    found = runtime_providers()
    assert len(found) == 1, found
    assert found[0].name.lower().startswith("onnxruntime")
    check_single_runtime()


def test_two_runtimes_are_refused_naming_both_and_the_fix() -> None:
    both = (Provider("onnxruntime", "1.32.0"), Provider("onnxruntime-training-cpu", "1.19.2"))
    with pytest.raises(FitonnxError) as info:
        check_single_runtime(both)
    text = str(info.value)
    assert "\n" not in text
    assert "onnxruntime 1.32.0" in text and "onnxruntime-training-cpu 1.19.2" in text
    assert "pip uninstall -y onnxruntime onnxruntime-training-cpu" in text


def _fake_second_runtime(root) -> str:
    """A folder holding the metadata of a second distribution that installs ``onnxruntime/``."""
    info = root / "onnxruntime_gpu-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 9.9.9\n")
    (info / "RECORD").write_text("onnxruntime/__init__.py,,\n")
    (info / "top_level.txt").write_text("onnxruntime\n")
    return str(root)


def _run(args, extra_path: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([extra_path, str(ROOT)])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_the_command_refuses_two_runtimes_in_one_line(tmp_path) -> None:
    script = tmp_path / "bin" / "fitonnx"  # what the console script is called
    script.parent.mkdir()
    script.write_text("from fitonnx.cli.main import main\nmain()\n")
    done = _run([str(script), "score", str(ROOT / "models" / "mnist_cnn.onnx")], _fake_second_runtime(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: expected one distribution providing the onnxruntime")
    assert "onnxruntime-gpu 9.9.9" in lines[0] and "Traceback" not in done.stderr


def test_importing_refuses_two_runtimes_with_an_import_error(tmp_path) -> None:
    done = _run(["-c", "import fitonnx"], _fake_second_runtime(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("ImportError: expected one distribution")
