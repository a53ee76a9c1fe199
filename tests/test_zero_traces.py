"""No all-zero Fisher is ever reported with exit 0 (issue 14): the error says why the loss cannot
change (a saturated softmax, a constant output), and a zero trace among non-zero ones is noted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fitonnx.cli.main import cli

RNG = np.random.default_rng(5)


def _model(tmp_path: Path, scale: float, dead: bool = False) -> tuple[Path, Path]:
    """x → MatMul w → Mul scale → logits [N, 4] (plus a second branch through a Relu that never fires)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"]),
        helper.make_node("Mul", ["z", "scale"], ["logits"] if not dead else ["a"]),
    ]
    inits = [
        numpy_helper.from_array(RNG.normal(size=(3, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
    ]
    if dead:  # logits = a + MatMul(Relu(−|big|), v): v's gradient is 0 on every sample
        nodes += [
            helper.make_node("Abs", ["x"], ["ax"]),
            helper.make_node("Neg", ["ax"], ["nx"]),
            helper.make_node("Relu", ["nx"], ["r"]),
            helper.make_node("MatMul", ["r", "v"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["logits"]),
        ]
        inits.append(numpy_helper.from_array(RNG.normal(size=(3, 4)).astype(np.float32), "v"))
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(m, path)
    np.savez(data, x=(RNG.normal(size=(6, 3)) + 3).astype(np.float32))
    return path, data


def _score(path: Path, data: Path):
    return CliRunner().invoke(cli, ["score", str(path), "--data", str(data), "--engine", "onnx"])


def test_saturated_softmax_is_an_error(tmp_path: Path) -> None:
    result = _score(*_model(tmp_path, 1e4))
    assert result.exit_code == 2, result.output
    assert "every Fisher trace is 0" in result.stderr and "saturated softmax" in result.stderr


def test_constant_output_is_an_error(tmp_path: Path) -> None:
    result = _score(*_model(tmp_path, 0.0))
    assert result.exit_code == 2, result.output
    assert "every Fisher trace is 0" in result.stderr and "constant output" in result.stderr


def test_one_zero_trace_is_noted(tmp_path: Path) -> None:
    result = _score(*_model(tmp_path, 1.0, dead=True))
    assert result.exit_code == 0, result.output
    assert "have a trace of exactly 0" in result.output and "'v'" in result.output
