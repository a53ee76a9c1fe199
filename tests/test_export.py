"""The exporters of ``fitonnx export``: ONNX Runtime overrides and QDQ, QNN/AIMET encodings, TensorRT QDQ.

Recommendations are built by hand for the bundled MNIST CNN, with the ranges of its score report.
Every check reads the written files back independently: onnxruntime's own overrides helper, an
InferenceSession and the held-out accuracy for the models, and plain numpy for the encodings' grids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.tensor_quant_overrides import TensorQuantOverridesHelper

import fitonnx
from fitonnx.allocate.recommendation import Recommendation
from fitonnx.allocate.recommendation import save as save_rec
from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError
from fitonnx.export import EXPORTERS, export_recommendation, get_exporter
from fitonnx.export.qnn import encoding_from_range
from fitonnx.model.data import load_npz

from .conftest import MODELS, tiny_classifier

WEIGHTS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")
ACTIVATIONS = ("input", "/pool/MaxPool_output_0", "/flatten/Flatten_output_0", "/relu_2/Relu_output_0")
CONSUMER = {  # tensor -> (node, input slot) of the op that reads it
    "conv1.weight": ("/conv1/Conv", 1),
    "conv2.weight": ("/conv2/Conv", 1),
    "fc1.weight": ("/fc1/Gemm", 1),
    "fc2.weight": ("/fc2/Gemm", 1),
    "input": ("/conv1/Conv", 0),
    "/pool/MaxPool_output_0": ("/conv2/Conv", 0),
    "/flatten/Flatten_output_0": ("/fc1/Gemm", 0),
    "/relu_2/Relu_output_0": ("/fc2/Gemm", 0),
}
BITS_OF = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.INT8: 8,
    TensorProto.UINT8: 8,
    TensorProto.INT16: 16,
    TensorProto.UINT16: 16,
}
MIXED_WEIGHTS = {"conv1.weight": 8, "conv2.weight": 4, "fc1.weight": 4, "fc2.weight": 8}
MIXED_ACTS = {**dict.fromkeys(ACTIVATIONS, 8), "/relu_2/Relu_output_0": 16}


@pytest.fixture(scope="module")
def cnn_ranges() -> dict[str, tuple[float, float]]:
    report = fitonnx.score(MODELS / "mnist_cnn.onnx")
    return {t.name: (t.min, t.max) for t in report.tensors}


@pytest.fixture(scope="module")
def heldout() -> fitonnx.Dataset:
    return load_npz(MODELS / "mnist_cnn.heldout.npz")


def make_rec(
    ranges: dict[str, tuple[float, float]], weights: dict[str, int], acts: dict[str, int], target: str = "ort"
) -> Recommendation:
    return Recommendation(
        model="mnist_cnn.onnx",
        target=target,
        weight_bits=weights,
        activation_bits=acts,
        fit=0.0,
        weight_bytes=0,
        ranges={k: v for k, v in ranges.items() if k in weights or k in acts},
    )


def accuracy(model: Path, data: fitonnx.Dataset) -> float:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data.arrays["input"]})[0]
    return float(np.mean(np.argmax(logits, axis=1) == data.labels))


def read_site(model: onnx.ModelProto, tensor: str) -> tuple[str, int | None, onnx.NodeProto | None]:
    """What the consumer of ``tensor`` reads now: the input name, its Q/DQ width, and the DequantizeLinear."""
    node_name, slot = CONSUMER[tensor]
    node = next(n for n in model.graph.node if n.name == node_name)
    name = node.input[slot]
    dq = next((n for n in model.graph.node if name in n.output), None)
    if dq is None or dq.op_type != "DequantizeLinear":
        return name, None, None
    inits = {t.name: t for t in model.graph.initializer}
    return name, BITS_OF[inits[dq.input[2]].data_type], dq


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- registry -------------------------------------------------------------------------------


def test_registry_has_the_formats_and_rejects_unknown_ones() -> None:
    assert {"overrides", "qdq", "qnn", "qnn-1.0.0", "tensorrt"} <= set(EXPORTERS)
    assert EXPORTERS["qdq"].needs_data and EXPORTERS["tensorrt"].needs_data
    assert not EXPORTERS["qnn"].needs_data and not EXPORTERS["overrides"].needs_data
    with pytest.raises(FitonnxError, match="expected an export format among"):
        get_exporter("onnx-int3")


# --- ONNX Runtime ---------------------------------------------------------------------------


def test_overrides_json_loads_with_onnxruntimes_own_helper(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, MIXED_WEIGHTS, MIXED_ACTS)
    result = export_recommendation(MODELS / "mnist_cnn.onnx", rec, "overrides", tmp_path)
    assert result.path == tmp_path / "ort_overrides.json"
    raw = json.loads(result.path.read_text())
    assert set(raw) == set(WEIGHTS) | set(ACTIVATIONS)
    # Olive-style: enum names as strings; weights symmetric signed, activations unsigned
    assert raw["conv2.weight"] == [{"quant_type": "QInt4", "symmetric": True}]
    assert raw["conv1.weight"] == [{"quant_type": "QInt8", "symmetric": True}]
    assert raw["/relu_2/Relu_output_0"] == [{"quant_type": "QUInt16"}]
    assert raw["input"] == [{"quant_type": "QUInt8"}]
    model = onnx.load(MODELS / "mnist_cnn.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    tensors = {v.name for v in model.graph.input} | {o for n in model.graph.node for o in n.output}
    for name, entries in raw.items():
        converted = [{**e, "quant_type": QuantType[e["quant_type"]]} for e in entries]
        # one tensor per helper: this onnxruntime's is_valid stops after the first tensor of a dict
        ok, why = TensorQuantOverridesHelper({name: converted}).is_valid(inits, tensors, QuantType.QUInt8)
        assert ok, why
    helper = TensorQuantOverridesHelper(
        {n: [{**e[0], "quant_type": QuantType[e[0]["quant_type"]]}] for n, e in raw.items()}
    )
    assert helper.get_per_tensor_overrides("fc1.weight")["quant_type"] is QuantType.QInt4


def test_overrides_per_channel_carry_the_axis_onnxruntime_expects(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, MIXED_WEIGHTS, {})
    result = export_recommendation(MODELS / "mnist_cnn.onnx", rec, "overrides", tmp_path / "o.json", per_channel=True)
    raw = json.loads(result.path.read_text())
    assert {name: entries[0]["axis"] for name, entries in raw.items()} == dict.fromkeys(WEIGHTS, 0)  # Gemm transB=1
    assert set(result.kept_float) == set(ACTIVATIONS)


@pytest.mark.parametrize(
    ("weights", "acts", "min_accuracy"),
    [(dict.fromkeys(WEIGHTS, 8), dict.fromkeys(ACTIVATIONS, 8), 0.97), (MIXED_WEIGHTS, MIXED_ACTS, 0.95)],
    ids=["int8", "mixed-4-8-16"],
)
def test_qdq_model_runs_with_the_recommended_widths(
    cnn_ranges: dict, heldout: fitonnx.Dataset, tmp_path: Path, weights: dict, acts: dict, min_accuracy: float
) -> None:
    source = MODELS / "mnist_cnn.onnx"
    before = sha(source)
    result = export_recommendation(source, make_rec(cnn_ranges, weights, acts), "qdq", tmp_path)
    assert result.path == tmp_path / "mnist_cnn.qdq.onnx" and sha(source) == before
    assert result.quantized == {**weights, **acts}
    qdq = onnx.load(result.path)
    for tensor, bits in {**weights, **acts}.items():
        _, width, _ = read_site(qdq, tensor)
        assert width == bits, tensor
    # nothing else is rounded: a Q on another tensor is an exact copy (same scale and zero point) of a
    # recommended activation's, added on the op output that reaches it through Relu/MaxPool/Flatten
    # so that onnxruntime fuses the op (issue 15; test_export_fusion checks the outputs are unchanged)
    quantizers = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert {n.input[0] for n in quantizers if not n.name.endswith("_fuse_quantize")} == set(acts)
    params = {tuple(n.input[1:]) for n in quantizers if not n.name.endswith("_fuse_quantize")}
    assert all(tuple(n.input[1:]) in params for n in quantizers)
    float_acc, q_acc = accuracy(source, heldout), accuracy(result.path, heldout)
    assert float_acc == pytest.approx(0.974)
    assert q_acc >= min_accuracy


def test_qdq_weights_are_symmetric_grids_of_the_float_weights(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, dict.fromkeys(WEIGHTS, 8), dict.fromkeys(ACTIVATIONS, 8))
    qdq = onnx.load(export_recommendation(MODELS / "mnist_cnn.onnx", rec, "qdq", tmp_path / "q.onnx").path)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(MODELS / "mnist_cnn.onnx").graph.initializer}
    for w in WEIGHTS:
        _, _, dq = read_site(qdq, w)
        q, scale, zero = (inits[i].astype(np.float64) for i in dq.input)
        assert zero == 0  # symmetric
        assert scale == pytest.approx(np.abs(original[w]).max() / 127, rel=1e-6)  # int8 narrow range
        np.testing.assert_array_less(np.abs((q - zero) * scale - original[w]), scale / 2 + 1e-7)


def test_qdq_leaves_unlisted_tensors_in_float(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, {"fc1.weight": 4}, {"/pool/MaxPool_output_0": 8})
    result = export_recommendation(MODELS / "mnist_cnn.onnx", rec, "qdq", tmp_path / "q.onnx")
    qdq = onnx.load(result.path)
    assert read_site(qdq, "fc1.weight")[1] == 4 and read_site(qdq, "/pool/MaxPool_output_0")[1] == 8
    for tensor in set(CONSUMER) - {"fc1.weight", "/pool/MaxPool_output_0"}:
        name, width, _ = read_site(qdq, tensor)
        assert width is None and name == tensor, tensor  # read directly, in float
    assert set(result.kept_float) == set(CONSUMER) - {"fc1.weight", "/pool/MaxPool_output_0"}


def test_qdq_on_a_model_with_unnamed_nodes_and_a_matmul_weight(tmp_path: Path) -> None:
    model = tiny_classifier()
    for node in model.graph.node:
        node.name = ""
    src = tmp_path / "tiny.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(0)
    data = fitonnx.Dataset(arrays={"x": rng.normal(size=(32, 4)).astype(np.float32)})
    rec = Recommendation(
        model="tiny.onnx", target="ort", weight_bits={"w1": 8}, activation_bits={"x": 8}, fit=0.0, weight_bytes=0,
        ranges={"x": (-3.0, 3.0)},
    )  # fmt: skip
    result = export_recommendation(src, rec, "qdq", tmp_path / "t.qdq.onnx", data=data, per_channel=True)
    qdq = onnx.load(result.path)
    matmul = next(n for n in qdq.graph.node if n.op_type == "MatMul")
    gemm = next(n for n in qdq.graph.node if n.op_type == "Gemm")
    producers = {o: n for n in qdq.graph.node for o in n.output}
    assert producers[matmul.input[0]].op_type == "DequantizeLinear"
    dq_w = producers[matmul.input[1]]
    assert dq_w.op_type == "DequantizeLinear" and next(a.i for a in dq_w.attribute if a.name == "axis") == 1
    assert gemm.input[0] == "r" and gemm.input[1] == "w2"  # not recommended: float
    x = data.arrays["x"]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.max(np.abs(got - ref)) < 0.1 * np.max(np.abs(ref))


# --- TensorRT -------------------------------------------------------------------------------


def test_tensorrt_model_is_symmetric_with_16_bit_tensors_in_float(
    cnn_ranges: dict, heldout: fitonnx.Dataset, tmp_path: Path
) -> None:
    weights = {"conv1.weight": 8, "conv2.weight": 4, "fc1.weight": 4, "fc2.weight": 16}
    acts = {**dict.fromkeys(ACTIVATIONS, 8), "/relu_2/Relu_output_0": 16}
    rec = make_rec(cnn_ranges, weights, acts, target="tensorrt")
    result = export_recommendation(MODELS / "mnist_cnn.onnx", rec, "tensorrt", tmp_path)
    assert result.path.name.endswith(".qdq.onnx")
    assert set(result.kept_float) == {"fc2.weight", "/relu_2/Relu_output_0"}
    trt = onnx.load(result.path)
    assert {o.domain for o in trt.opset_import} == {""} and trt.opset_import[0].version == 21  # int4 DQ, no contrib
    assert all(n.domain == "" for n in trt.graph.node)
    inits = {t.name: t for t in trt.graph.initializer}
    for n in trt.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not numpy_helper.to_array(inits[n.input[2]]).astype(np.int32).any(), n.name  # zero point 0
            assert inits[n.input[2]].data_type in (TensorProto.INT8, TensorProto.INT4)
    for tensor, bits in {"conv1.weight": 8, "conv2.weight": 4, "fc1.weight": 4, "input": 8}.items():
        assert read_site(trt, tensor)[1] == bits, tensor
    assert read_site(trt, "fc2.weight") == ("fc2.weight", None, None)
    assert read_site(trt, "/relu_2/Relu_output_0") == ("/relu_2/Relu_output_0", None, None)
    assert inits["fc2.weight"].data_type == TensorProto.FLOAT
    biases = [n.input[2] for n in trt.graph.node if n.op_type in ("Conv", "Gemm")]
    assert all(inits[b].data_type == TensorProto.FLOAT for b in biases)  # TensorRT quantizes biases itself
    assert accuracy(result.path, heldout) >= 0.95


def test_qdq_format_follows_a_tensorrt_recommendation(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, dict.fromkeys(WEIGHTS, 8), dict.fromkeys(ACTIVATIONS, 8), target="tensorrt")
    qdq = onnx.load(export_recommendation(MODELS / "mnist_cnn.onnx", rec, "qdq", tmp_path / "m.onnx").path)
    _, _, dq = read_site(qdq, "input")
    zero = next(t for t in qdq.graph.initializer if t.name == dq.input[2])
    assert zero.data_type == TensorProto.INT8 and numpy_helper.to_array(zero) == 0  # symmetric, unlike ORT's uint8


def test_tensorrt_refuses_int16_and_int4_activations(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, dict.fromkeys(WEIGHTS, 8), {"input": 4})
    with pytest.raises(FitonnxError, match=r"expected activation bit widths in \[8, 16\] for TensorRT; found 4"):
        export_recommendation(MODELS / "mnist_cnn.onnx", rec, "tensorrt", tmp_path / "t.onnx")


# --- QNN / AIMET encodings ------------------------------------------------------------------

ENTRY_061 = {
    "bitwidth": int,
    "dtype": str,
    "is_symmetric": str,
    "max": float,
    "min": float,
    "offset": int,
    "scale": float,
}
ENTRY_100 = {"name": str, "enc_type": str, "dtype": str, "bw": int, "is_sym": bool, "scale": list, "offset": list}


def check_schema_061(doc: dict[str, Any]) -> None:
    """AIMET's 0.6.1 layout: tensor → list of encodings, is_symmetric as the strings "True"/"False"."""
    assert doc["version"] == "0.6.1"
    assert isinstance(doc["excluded_layers"], list) and isinstance(doc["quantizer_args"], dict)
    for section in ("activation_encodings", "param_encodings"):
        assert isinstance(doc[section], dict)
        for name, entries in doc[section].items():
            assert isinstance(name, str) and isinstance(entries, list) and entries
            for e in entries:
                if e["dtype"] == "float":
                    assert set(e) == {"bitwidth", "dtype"} and e["bitwidth"] in (16, 32)
                    continue
                assert set(e) == set(ENTRY_061), name
                for key, typ in ENTRY_061.items():
                    assert isinstance(e[key], typ) and not isinstance(e[key], bool), (name, key)
                assert e["dtype"] == "int" and 4 <= e["bitwidth"] <= 32
                assert e["is_symmetric"] in ("True", "False")
                assert e["scale"] > 0 and e["min"] <= 0 <= e["max"]


def check_schema_100(doc: dict[str, Any]) -> None:
    assert doc["version"] == "1.0.0" and isinstance(doc["excluded_layers"], list)
    for section in ("activation_encodings", "param_encodings"):
        assert isinstance(doc[section], list)
        for e in doc[section]:
            if e["dtype"] == "FLOAT":
                assert set(e) == {"name", "enc_type", "dtype", "bw"}
                continue
            assert set(e) == set(ENTRY_100)
            for key, typ in ENTRY_100.items():
                assert isinstance(e[key], typ), key
            assert e["dtype"] == "INT" and e["enc_type"] in ("PER_TENSOR", "PER_CHANNEL")
            assert len(e["scale"]) == len(e["offset"]) >= 1
            assert (e["enc_type"] == "PER_TENSOR") == (len(e["scale"]) == 1)


def roundtrip(x: np.ndarray, scale: float, offset: int, bits: int) -> np.ndarray:
    """AIMET/QNN: q = clamp(round(x/scale) − offset, 0, 2^b − 1), x' = (q + offset)·scale."""
    q = np.clip(np.round(x / scale) - offset, 0, 2**bits - 1)
    return (q + offset) * scale


def test_qnn_061_matches_the_schema_and_reproduces_the_ranges(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, MIXED_WEIGHTS, MIXED_ACTS, target="qnn")
    result = export_recommendation(MODELS / "mnist_cnn.onnx", rec, "qnn", tmp_path)
    assert result.path == tmp_path / "mnist_cnn.encodings"
    doc = json.loads(result.path.read_text())
    check_schema_061(doc)
    assert set(doc["param_encodings"]) == set(WEIGHTS) and set(doc["activation_encodings"]) == set(ACTIVATIONS)
    for section, bits_of in (("param_encodings", MIXED_WEIGHTS), ("activation_encodings", MIXED_ACTS)):
        for name, (e,) in doc[section].items():
            lo, hi = cnn_ranges[name]
            b = bits_of[name]
            assert e["bitwidth"] == b
            if section == "param_encodings":  # qnn: symmetric weights, offset −2^(b−1), step max|w|/(2^(b−1)−1)
                assert e["is_symmetric"] == "True" and e["offset"] == -(2 ** (b - 1))
                assert e["scale"] == pytest.approx(max(-lo, hi) / (2 ** (b - 1) - 1), rel=1e-12)
            else:  # asymmetric over [min(lo, 0), max(hi, 0)], grid moved so 0 is on it
                assert e["is_symmetric"] == "False" and e["offset"] <= 0
                assert e["scale"] == pytest.approx((max(hi, 0) - min(lo, 0)) / (2**b - 1), rel=1e-12)
            x = np.linspace(lo, hi, 10_001)
            err = np.abs(roundtrip(x, e["scale"], e["offset"], b) - x)
            assert err.max() <= e["scale"] / 2 * (1 + 1e-9), name
            assert roundtrip(np.zeros(1), e["scale"], e["offset"], b)[0] == 0.0  # 0 exactly representable
            assert e["min"] == pytest.approx(e["offset"] * e["scale"])
            assert e["max"] == pytest.approx((e["offset"] + 2**b - 1) * e["scale"] if e["is_symmetric"] == "False"
                                             else (2 ** (b - 1) - 1) * e["scale"])  # fmt: skip


def test_qnn_per_channel_has_one_encoding_per_output_channel(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, MIXED_WEIGHTS, {}, target="qnn")
    doc = json.loads(
        export_recommendation(
            MODELS / "mnist_cnn.onnx", rec, "qnn", tmp_path / "e.json", per_channel=True
        ).path.read_text()
    )
    check_schema_061(doc)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(MODELS / "mnist_cnn.onnx").graph.initializer}
    for name in WEIGHTS:
        entries = doc["param_encodings"][name]
        assert len(entries) == weights[name].shape[0]
        for channel, e in zip(weights[name], entries, strict=True):
            err = np.abs(roundtrip(channel.astype(np.float64), e["scale"], e["offset"], e["bitwidth"]) - channel)
            assert err.max() <= e["scale"] / 2 * (1 + 1e-6)


def test_qnn_100_holds_the_same_numbers_as_061(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, MIXED_WEIGHTS, MIXED_ACTS, target="qnn")
    old = json.loads(export_recommendation(MODELS / "mnist_cnn.onnx", rec, "qnn", tmp_path / "a").path.read_text())
    new = json.loads(
        export_recommendation(MODELS / "mnist_cnn.onnx", rec, "qnn-1.0.0", tmp_path / "b").path.read_text()
    )
    check_schema_100(new)
    for section in ("activation_encodings", "param_encodings"):
        # AIMET's own 0.6.1 → 1.0.0 mapping, written out here
        expected = [
            {
                "name": name,
                "enc_type": "PER_TENSOR" if len(es) == 1 else "PER_CHANNEL",
                "dtype": "INT",
                "bw": es[0]["bitwidth"],
                "is_sym": es[0]["is_symmetric"] == "True",
                "scale": [e["scale"] for e in es],
                "offset": [e["offset"] for e in es],
            }
            for name, es in old[section].items()
        ]
        assert sorted(new[section], key=lambda e: e["name"]) == sorted(expected, key=lambda e: e["name"])


def test_qnn_writes_float_entries_for_a_tensorrt_recommendation(cnn_ranges: dict, tmp_path: Path) -> None:
    rec = make_rec(cnn_ranges, {"fc2.weight": 16, "fc1.weight": 8}, {"input": 8}, target="tensorrt")
    doc = json.loads(export_recommendation(MODELS / "mnist_cnn.onnx", rec, "qnn", tmp_path / "e").path.read_text())
    check_schema_061(doc)
    assert doc["param_encodings"]["fc2.weight"] == [{"bitwidth": 16, "dtype": "float"}]
    assert doc["activation_encodings"]["input"][0]["is_symmetric"] == "True"  # tensorrt's grid is symmetric
    new = json.loads(
        export_recommendation(MODELS / "mnist_cnn.onnx", rec, "qnn-1.0.0", tmp_path / "f").path.read_text()
    )
    check_schema_100(new)
    assert {"name": "fc2.weight", "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw": 16} in new["param_encodings"]


def test_encoding_grid_against_a_worked_example() -> None:
    e = encoding_from_range(-0.3, 1.2, 8, symmetric=False)  # (1.5/255, round(-0.3/Δ) = -51)
    assert e.scale == pytest.approx(1.5 / 255) and e.offset == -51
    assert e.min == pytest.approx(-51 * 1.5 / 255) and e.max == pytest.approx(204 * 1.5 / 255)
    s = encoding_from_range(-0.8, 0.7, 4, symmetric=True)
    assert s.offset == -8 and s.scale == pytest.approx(0.8 / 7) and s.max == pytest.approx(0.8)
    tiny = encoding_from_range(0.0, 0.001, 8, symmetric=False)  # AIMET widens ranges below 0.01
    assert tiny.scale == pytest.approx(0.01 / 255) and tiny.offset == 0


# --- errors and the CLI ---------------------------------------------------------------------


def test_unknown_tensors_and_misfiled_names_are_one_line_errors(cnn_ranges: dict, tmp_path: Path) -> None:
    bad = make_rec(cnn_ranges, {"fc9.weight": 8, "fc1.weight": 8}, {})
    with pytest.raises(FitonnxError, match=r"found 1 it does not have: 'fc9\.weight'") as info:
        export_recommendation(MODELS / "mnist_cnn.onnx", bad, "qnn", tmp_path / "e")
    assert "\n" not in str(info.value)
    swapped = make_rec(cnn_ranges, {"input": 8}, {})
    with pytest.raises(FitonnxError, match="expected weight_bits to name initializers"):
        export_recommendation(MODELS / "mnist_cnn.onnx", swapped, "overrides", tmp_path / "o.json")
    three = make_rec(cnn_ranges, {"fc1.weight": 3}, {})
    with pytest.raises(FitonnxError, match=r"expected weight bit widths in \[4, 8, 16\] for ONNX Runtime; found 3"):
        export_recommendation(MODELS / "mnist_cnn.onnx", three, "qdq", tmp_path / "q.onnx")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_exports_qdq_and_reports_accuracy(cnn_ranges: dict, tmp_path: Path) -> None:
    rec_path = tmp_path / "recommendation.json"
    save_rec(make_rec(cnn_ranges, MIXED_WEIGHTS, MIXED_ACTS), rec_path)
    out = tmp_path / "model.qdq.onnx"
    code, stdout, stderr = run(
        "export", str(MODELS / "mnist_cnn.onnx"), "--recommendation", str(rec_path), "--format", "qdq",
        "--out", str(out), "--eval", str(MODELS / "mnist_cnn.heldout.npz"),
    )  # fmt: skip
    assert code == 0, stderr
    assert out.is_file() and f"wrote {out}" in stdout
    assert "2 at 4 bits, 5 at 8 bits, 1 at 16 bits" in stdout
    assert "held-out top-1 accuracy on 1000 labels" in stdout and "float 97.40%" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.qdq.onnx", "recommendation.json"]


def test_cli_refuses_to_overwrite_the_model_and_reports_bad_names(cnn_ranges: dict, tmp_path: Path) -> None:
    src = tmp_path / "mnist_cnn.onnx"
    src.write_bytes((MODELS / "mnist_cnn.onnx").read_bytes())
    before = sha(src)
    rec_path = tmp_path / "rec.json"
    save_rec(make_rec(cnn_ranges, MIXED_WEIGHTS, MIXED_ACTS), rec_path)
    code, _, stderr = run(
        "export", str(src), "--recommendation", str(rec_path), "--format", "qdq", "--out", str(src),
        "--data", str(MODELS / "mnist_cnn.calib.npz"),
    )  # fmt: skip
    assert code == 2 and "refusing to overwrite an input of this command (the model)" in stderr
    assert sha(src) == before and "Traceback" not in stderr
    data = json.loads(rec_path.read_text())
    data["weight_bits"]["conv9.weight"] = 8
    rec_path.write_text(json.dumps(data))
    code, _, stderr = run(
        "export", str(src), "--recommendation", str(rec_path), "--format", "qnn", "--out", str(tmp_path)
    )
    assert code == 2 and "'conv9.weight'" in stderr.splitlines()[0]
    code, _, stderr = run(
        "export", str(src), "--recommendation", str(rec_path), "--format", "qnn", "--out", str(tmp_path / "e"),
        "--eval", str(MODELS / "mnist_cnn.heldout.npz"),
    )  # fmt: skip
    assert code == 2 and "for --eval" in stderr


def test_pruning_keeps_what_an_if_body_reads_from_the_outer_scope() -> None:
    # silero-vad's LSTM weights are initializers of the main graph read only inside an If branch;
    # pruning them made the quantized model invalid.
    from fitonnx.export.ort import _prune

    body = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_outer"], ["y_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)],
    )
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)],
        "m",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.eye(2, dtype=np.float32), "w_outer"),
            numpy_helper.from_array(np.zeros(2, np.float32), "unused"),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _prune(model)
    assert [t.name for t in model.graph.initializer] == ["w_outer"]
