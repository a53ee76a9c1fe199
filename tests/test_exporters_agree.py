"""One network, two PyTorch exporters (issue 14): the TorchScript export (LayerNorm parameters merged
through Identity nodes) and the dynamo export (one initializer read by all three LayerNormalization
nodes), both with two outputs, give the same Fisher traces. Weights are matched by their values
(the exporters name and lay them out differently), activations by their traces' order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fitonnx import api
from fitonnx.fisher.engines import ENGINES
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
ENGINE_PARAMS = [
    pytest.param(
        "ort-training",
        marks=pytest.mark.skipif(not ENGINES["ort-training"].available(), reason="needs onnxruntime-training"),
    ),
    "onnx",
]


def _scored(name: str, engine: str) -> tuple[dict[bytes, float], list[float], list[str]]:
    path = ZOO / f"{name}.onnx"
    data = Dataset(arrays=dict(np.load(ZOO / f"{name}.calib.npz")), source=name)
    traces, _, _ = api.fisher_traces(api.open_model(path, data), FisherOptions(engine=engine))
    s = api.open_model(path, data)
    values = {t.name: numpy_helper.to_array(t) for t in s.prepared.model.graph.initializer}
    trace = traces.trace()
    weights = {
        np.sort(values[t.name].ravel()).tobytes(): float(v)
        for t, v in zip(traces.tensors, trace, strict=True)
        if t.kind.value == "weight"
    }
    acts = sorted(float(v) for t, v in zip(traces.tensors, trace, strict=True) if t.kind.value == "activation")
    return weights, acts, [t.output for t in traces.targets]


def test_dynamo_export_shares_one_layernorm_initializer() -> None:
    model = onnx.load(ZOO / "encoder_shared_ln_dynamo.onnx")
    scales = [n.input[1] for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(scales) == 3 and len(set(scales)) == 1


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_torchscript_and_dynamo_exports_agree(engine: str) -> None:
    w_ts, a_ts, out_ts = _scored("encoder_shared_ln_ts", engine)
    w_dy, a_dy, out_dy = _scored("encoder_shared_ln_dynamo", engine)
    assert out_ts == out_dy == ["last_hidden_state", "pooler_output"]
    assert w_ts.keys() == w_dy.keys() and len(w_ts) == 6
    for key, value in w_ts.items():
        assert value > 0
        np.testing.assert_allclose(w_dy[key], value, rtol=1e-4)
    np.testing.assert_allclose(a_dy, a_ts, rtol=1e-4)
