"""Exports fitonnx used to misread (issue 14): a stale declared output shape, already-quantized models.

- ctc_stale_shape declares its output [1, seqlen] while it is [20, 1, 50]: scored by its real
  shape, with traces equal to the same model with the true shape declared, and --class-axis 2 taken.
- qdq_mlp (int8 weights behind DequantizeLinear, activations through Q/DQ): traces equal to the
  float MLP whose weights are the dequantized values (numpy), activation Q/DQ removed with a note.
- integer-op models are refused (tests/test_zoo.py), inspect says so too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"


def _data(name: str) -> Dataset:
    return Dataset(arrays=dict(np.load(ZOO / f"{name}.calib.npz")), source=name)


def _per_sample(model: onnx.ModelProto | Path, data: Dataset, **options: object) -> dict[str, np.ndarray]:
    traces, _, _ = api.fisher_traces(api.open_model(model, data), FisherOptions(fisher="mc", **options))
    return {t.name: traces.per_sample[:, j] for j, t in enumerate(traces.tensors)}


def test_stale_declared_shape_scores_like_the_true_one() -> None:
    stale = onnx.load(ZOO / "ctc_stale_shape.onnx")
    true = onnx.ModelProto()
    true.CopyFrom(stale)
    true.graph.output[0].CopyFrom(helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, [20, 1, 50]))
    data = _data("ctc_stale_shape")
    got, want = _per_sample(stale, data), _per_sample(true, data)
    assert got.keys() == want.keys() == {"features", "enc.w", "hr", "ctc.w"}
    for name in got:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
        assert np.all(got[name] > 0)
    axis2 = _per_sample(stale, data, class_axis=2)
    for name in got:
        np.testing.assert_allclose(axis2[name], got[name], rtol=1e-6, err_msg=name)


def _dequantized_float_mlp(qdq: onnx.ModelProto) -> onnx.ModelProto:
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    w = {
        k: ((inits[f"{k}_q"].astype(np.int32) - inits[f"{k}_zp"]) * inits[f"{k}_scale"]).astype(np.float32)
        for k in ("w1", "w2")
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1_dq"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("MatMul", ["h", "w2_dq"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "float_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(w["w1"], "w1_dq"), numpy_helper.from_array(w["w2"], "w2_dq")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def test_qdq_model_scores_its_float_weights() -> None:
    qdq = onnx.load(ZOO / "qdq_mlp.onnx")
    data = _data("qdq_mlp")
    got, want = _per_sample(qdq, data), _per_sample(_dequantized_float_mlp(qdq), data)
    assert got.keys() == want.keys() == {"x", "w1_dq", "h", "w2_dq"}
    for name in got:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    report = api.score(qdq, data)
    assert any("activation QuantizeLinear/DequantizeLinear pair(s) removed" in n for n in report.notes)
    assert {t.name: t.kind.value for t in report.tensors}["w1_dq"] == "weight"
