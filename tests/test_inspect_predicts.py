"""inspect predicts what score does (issue 14): the same outputs in the loss read the same way, the
same tensors, and no blocker for what score handles (Resize/LSTM without --input-shape)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fitonnx import api
from fitonnx.analysis.inspection import inspect_model
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
MODELS = [
    "detector_two_heads",
    "encoder_two_outputs",
    "ctc_stale_shape",
    "shared_layernorm",
    "qdq_mlp",
    "silero_vad_16k_sequence",  # LSTM, state outputs left out
    "gru_charlm_dynamo",
    "ppocrv4_det_dbnet",  # Resize: needs the data's sizes, not a blocker
]


@pytest.mark.parametrize("name", MODELS)
def test_inspect_agrees_with_score(name: str) -> None:
    insp = inspect_model(ZOO / f"{name}.onnx")
    data = Dataset(arrays=dict(np.load(ZOO / f"{name}.calib.npz")), source=name)
    traces, _, _ = api.fisher_traces(api.open_model(ZOO / f"{name}.onnx", data), FisherOptions(max_samples=2))
    assert insp.unsupported == () and insp.problems == ()
    predicted = [(t.output, t.likelihood, t.class_axis) for t in insp.loss_outputs]
    assert predicted == [(t.output, t.likelihood, t.class_axis) for t in traces.targets]
    scored = {t.name for t in traces.tensors}
    inspected = {t.name for t in (*insp.weights, *insp.activations)}
    assert scored <= inspected
    assert traces.trace().sum() > 0  # single zero traces (a dead SE block on 2 samples) get a note


def test_resize_is_not_unsupported_without_input_shape() -> None:
    insp = inspect_model(ZOO / "ppocrv4_det_dbnet.onnx")
    assert {b.op_type for b in insp.shape_dependent} == {"Resize"} and not insp.unsupported
