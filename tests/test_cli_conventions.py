"""The command line's habits: -h, -o, -v/-q, python -m fitonnx, '-' for stdout, the terminal's
width, one rule for optional plots, and progress without a terminal."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli
from fitonnx.cli.progress import QUIET, BarProgress

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "mnist_cnn.onnx"
BERT = ROOT / "models" / "zoo" / "tiny_bert_dynamo.onnx"
SUBCOMMANDS = ("data", "score", "inspect", "validate", "recommend", "export", "compare")


def invoke(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_dash_h_is_help_everywhere(sub: str) -> None:
    result = invoke(sub, "-h")
    assert result.exit_code == 0 and "Usage:" in result.stdout


def test_python_dash_m_fitonnx() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fitonnx", "--version"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0 and "fitonnx" in done.stdout


def test_json_and_csv_on_stdout_with_the_table_on_stderr(tmp_path: Path) -> None:
    result = invoke("score", CNN, "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 256
    assert "total FIT" in result.stderr and "wrote" not in result.stdout
    result = invoke("score", CNN, "--csv", "-", "--json", tmp_path / "r.json")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][0] == "name" and len(rows) > 8 and (tmp_path / "r.json").is_file()
    assert invoke("score", CNN, "--csv", "-", "--json", "-").exit_code == 2


def test_quiet_says_only_the_results_and_progress_is_one_line_per_stage(tmp_path: Path) -> None:
    result = invoke("score", CNN, "--json", tmp_path / "r.json")
    assert result.exit_code == 0
    stages = result.stderr.splitlines()
    assert [s.split(":")[0] for s in stages] == [
        "Loading and preparing the model",
        "Building the gradient model",
        "Fisher samples",
    ]
    assert "Fisher samples: 256/256" in result.stderr and "wrote" in result.stdout
    result = invoke("-q", "score", CNN, "--json", tmp_path / "r.json")
    assert result.exit_code == 0 and result.stderr == "" and "wrote" not in result.stdout
    assert invoke("-q", "-v", "score", CNN).exit_code == 2


def test_progress_lines_without_a_terminal_and_none_when_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    for level, expected in ((0, "Fisher samples: 3/3"), (QUIET, "")):
        bar = BarProgress(tty=False, level=level)
        bar.start(1, "Loading")
        bar.start(3, "Fisher samples")
        bar.advance(3)
        bar.close()
        err = capsys.readouterr().err
        assert (expected in err) if expected else err == ""


def test_tables_fit_the_terminal_and_wide_shows_whole_names() -> None:
    narrow = invoke("score", BERT, "--max-samples", "4", env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.stderr
    table = narrow.stdout.split("\n\n")[0].splitlines()[1:]
    assert max(map(len, table)) <= 80
    long_names = invoke(
        "score", ROOT / "models" / "zoo" / "ppocr_cls_mbv3.onnx", "--max-samples", "2", env={"COLUMNS": "60"}
    )
    assert "…" in long_names.stdout
    wide = invoke(
        "score", ROOT / "models" / "zoo" / "ppocr_cls_mbv3.onnx", "--max-samples", "2", "--wide", env={"COLUMNS": "60"}
    )
    assert "…" not in wide.stdout.split("\n\n")[0]


def test_recommend_and_export_take_dash_o(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("recommend", CNN, "--avg-bits", "5", "--target", "ort", "-o", out).exit_code == 0
    result = invoke(
        "export",
        CNN,
        "--recommendation",
        out / "recommendation.json",
        "--format",
        "annotated",
        "-o",
        tmp_path / "a.onnx",
    )
    assert result.exit_code == 0 and (tmp_path / "a.onnx").is_file()


def test_act_bits_is_the_same_list_type_everywhere() -> None:
    for sub in ("score", "validate", "recommend", "compare"):
        assert "--act-bits BITS" in invoke(sub, "-h").stdout, sub


def test_missing_matplotlib_is_a_note_in_recommend_and_compare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = invoke("recommend", CNN, "--avg-bits", "5", "-o", tmp_path / "r")
    assert result.exit_code == 0 and "note: no pareto.png: matplotlib is not installed" in result.stderr
    assert (tmp_path / "r" / "pareto.json").is_file() and not (tmp_path / "r" / "pareto.png").exists()
    pair = ROOT / "models" / "pair"
    result = invoke(
        "compare",
        pair / "cnn_torch.onnx",
        pair / "cnn_jax.onnx",
        "--max-samples",
        "4",
        "--plot",
        tmp_path / "p.png",
        "--json",
        tmp_path / "c.json",
    )
    assert result.exit_code == 0 and "note: no " in result.stderr and "matplotlib is not installed" in result.stderr
    assert (tmp_path / "c.json").is_file()


def test_a_signal_inside_a_class_body_still_exits_143() -> None:
    """A SIGTERM landing in a descriptor's ``__set_name__`` (e.g. while matplotlib is imported) reaches
    the CLI wrapped in a RuntimeError on Python 3.11; it must still exit 143 with one line."""
    import signal

    import click

    from fitonnx.cli.main import FitonnxGroup
    from fitonnx.files import Interrupted

    class Trap:
        def __set_name__(self, owner: type, name: str) -> None:
            raise Interrupted(signal.SIGTERM)

    @click.group(cls=FitonnxGroup)
    def group() -> None:
        pass

    @group.command("boom")
    def boom() -> None:
        type("Imported", (), {"field": Trap()})

    result = CliRunner().invoke(group, ["boom"])
    assert result.exit_code == 143, result.output
    assert "interrupted by SIGTERM" in result.output and "Traceback" not in result.output
