"""If specialization: the branch every calibration sample takes is inlined, checked and scored."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.errors import UnsupportedError
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from fitonnx.prepare.passes.specialize import specialize_if


def _branch(name: str, weight: np.ndarray) -> onnx.GraphProto:
    """MatMul(x, W) -> Tanh, with W a Constant inside the branch (as exporters write it)."""
    return helper.make_graph(
        [
            helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(weight, f"{name}_w")),
            helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_h"]),
            helper.make_node("Tanh", [f"{name}_h"], [f"{name}_out"]),
        ],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
    )


def if_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]:
    """y = (sr == 16000 ? tanh(x W16) : tanh(x W8)) W_out: the weights that matter live in branches."""
    rng = np.random.default_rng(0)
    w16, w8 = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    w_out = rng.normal(size=(5, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Equal", ["sr", "k16000"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["h"], then_branch=_branch("then", w16), else_branch=_branch("else", w8)),
        helper.make_node("MatMul", ["h", "w_out"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "if_model",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array(16000, np.int64), "k16000"), numpy_helper.from_array(w_out, "w_out")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model, w16, w8, w_out


def _data(sr: list[int]) -> Dataset:
    rng = np.random.default_rng(1)
    n = len(sr)
    # sr is a scalar input: one more axis than the model input, so each sample's value is fed whole.
    return Dataset({"x": rng.normal(size=(n, 4)).astype(np.float32), "sr": np.array(sr, np.int64)})


def test_taken_branch_is_inlined_and_scored() -> None:
    model, w16, _, w_out = if_model()
    data = _data([16000] * 12)
    session = api.open_model(model, data)
    names = {t.name for t in session.tensors}
    assert "then_w" in names and "w_out" in names and "else_w" not in names
    change = next(c for c in session.prepared.changes if c.kind == "specialize")
    assert "True on all 12 calibration samples" in change.detail and "other branch's 1 weight-like" in change.detail
    traces, _, _ = api.fisher_traces(session, options=FisherOptions(fisher="mc"))
    assert np.all(np.isfinite(traces.per_sample)) and np.all(traces.trace() > 0) and traces.samples == 12
    # The inlined twin computes the taken branch, as numpy does:
    x = data.arrays["x"][:1]
    from fitonnx.model.runtime import make_session

    out = make_session(session.prepared.model.SerializeToString()).run(["logits"], {"x": x, "sr": np.array(16000)})[0]
    np.testing.assert_allclose(out, np.tanh(x @ w16) @ w_out, rtol=1e-5)


def test_else_branch_when_every_sample_takes_it() -> None:
    model, _, _, _ = if_model()
    session = api.open_model(model, _data([8000] * 5))
    assert {"else_w", "w_out"} <= {t.name for t in session.tensors}


def test_mixed_conditions_are_an_error() -> None:
    model, _, _, _ = if_model()
    with pytest.raises(UnsupportedError, match="take one branch on all calibration samples"):
        specialize_if(model, [_data([16000, 8000]).sample(i, _specs(model)) for i in range(2)])


def _specs(model: onnx.ModelProto):
    from fitonnx.model.graph import input_specs

    return input_specs(model)


def test_input_model_is_not_modified() -> None:
    model, _, _, _ = if_model()
    before = model.SerializeToString()
    specialize_if(model, [_data([16000]).sample(0, _specs(model))])
    assert model.SerializeToString() == before


def test_score_report_names_the_untaken_branch(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from fitonnx.cli.main import cli

    model, _, _, _ = if_model()
    onnx.save(model, tmp_path / "if.onnx")
    data = _data([16000] * 6)
    np.savez(tmp_path / "d.npz", **data.arrays)
    args = ["score", str(tmp_path / "if.onnx"), "--data", str(tmp_path / "d.npz"), "--json", str(tmp_path / "r.json")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    assert "note:" in result.stdout and "then branch inlined" in result.stdout
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]  # (why it runs at batch 1: batch_note)
    assert len(notes) == 1 and "other branch's 1 weight-like constants are not scored" in notes[0]
