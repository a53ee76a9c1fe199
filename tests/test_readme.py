"""The README's commands: the set-up lines match CI, and its `fitonnx` examples on bundled models run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _code_blocks() -> list[str]:
    return re.findall(r"```(?:bash)?\n(.*?)```", README, flags=re.S)


def _setup_lines() -> list[str]:
    return [line for line in _code_blocks()[0].splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands() -> None:
    lines = _setup_lines()
    assert len(lines) == 2
    install_and_score, install_and_test = lines
    assert "pip install ." in install_and_score and "fitonnx score models/" in install_and_score
    assert 'pip install ".[test]"' in install_and_test and "pytest" in install_and_test


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _setup_lines()[1] in ci.splitlines()


def _fitonnx_commands() -> list[list[str]]:
    """`fitonnx ...` invocations in the README that need only files the repository has."""
    commands = []
    for block in _code_blocks():
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(".venv/bin/fitonnx "):
                    part = part[len(".venv/bin/") :]
                if not part.startswith("fitonnx "):
                    continue
                argv = shlex.split(part)[1:]
                paths = [a for a in argv if a.endswith((".onnx", ".npz"))]
                if all((ROOT / p).exists() for p in paths):
                    commands.append(argv)
    return commands


@pytest.mark.parametrize("argv", _fitonnx_commands(), ids=lambda a: " ".join(a))
def test_readme_fitonnx_command_runs(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    # Outputs the example names go to tmp_path, never into the repository.
    fixed = [str(tmp_path / Path(a).name) if a.endswith((".json", ".csv", ".png")) else a for a in argv]
    for i, a in enumerate(fixed[:-1]):
        if a == "--out":
            fixed[i + 1] = str(tmp_path / "out")
    result = CliRunner().invoke(cli, fixed)
    assert result.exit_code == 0, result.stderr + result.stdout


def test_readme_has_runnable_examples() -> None:
    assert any(argv[:2] == ["score", "models/mnist_cnn.onnx"] for argv in _fitonnx_commands())


def test_readme_python_examples_run(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    runnable = [b for b in blocks if "models/" in b]  # the ones on bundled models
    assert runnable
    monkeypatch.chdir(ROOT)
    for block in runnable:
        namespace: dict[str, object] = {}
        exec(compile(block, "README.md", "exec"), namespace)  # our own README, bundled models only
        report = namespace.get("report")
        assert report is not None and len(report.tensors) > 0  # type: ignore[attr-defined]
