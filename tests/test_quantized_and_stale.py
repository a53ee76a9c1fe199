"""Exports fitonnx used to misread (issue 14): a stale declared output shape, already-quantized models.

- ctc_stale_shape declares its output [1, seqlen] while it is [20, 1, 50]: scored by its real
  shape, with traces equal to the same model with the true shape declared, and --class-axis 2 taken.
- qdq_mlp (int8 weights behind DequantizeLinear, activations through Q/DQ): the twin computes the
  model with its rounding (bit-equal without graph optimizations), and the traces, in both engines,
  equal numpy's with the dequantized weights and each activation Q/DQ passing a clipped
  straight-through gradient.
- integer-op models are refused (tests/test_zoo.py), inspect says so too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.fisher.engines import ENGINES as GRADIENT_ENGINES
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from fitonnx.model.runtime import make_session
from fitonnx.prepare.pipeline import prepare, relative_error, verify

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


def _qdq(v: np.ndarray, scale: np.float32, zero: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's QuantizeLinear → DequantizeLinear (int8, half to even) and the in-range mask."""
    q = np.rint(v / scale) + zero
    return ((np.clip(q, -128, 127) - zero) * scale).astype(np.float32), (q >= -128) & (q <= 127)


def _qdq_mlp_numpy(qdq: onnx.ModelProto, xs: np.ndarray, labels: np.ndarray, clip: bool = True) -> dict:
    """Per-sample ‖∂ℓ/∂t‖² of the cross-entropy in float64, each activation Q/DQ pair passing the
    gradient where the activation is inside its grid (clipped straight-through), or everywhere."""
    i = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    w1, w2 = (
        ((i[f"{k}_q"].astype(np.int32) - i[f"{k}_zp"]) * i[f"{k}_scale"]).astype(np.float32) for k in ("w1", "w2")
    )
    out: dict[str, list[float]] = {"x": [], "w1_dq": [], "h": [], "w2_dq": []}
    for x, label in zip(xs, labels, strict=True):
        xq, mx = _qdq(x, i["x_ascale"], int(i["x_azp"]))
        h0 = xq @ w1
        h = np.maximum(h0, 0)
        hq, mh = _qdq(h, i["h_ascale"], int(i["h_azp"]))
        z = (hq @ w2).astype(np.float64)
        p = np.exp(z - z.max())
        dz = p / p.sum()
        dz[0, int(label[0])] -= 1
        dh = (dz @ w2.T) * (mh if clip else 1)
        dh0 = dh * (h0 > 0)
        dx = (dh0 @ w1.T) * (mx if clip else 1)
        for name, g in (("x", dx), ("w1_dq", xq.T @ dh0), ("h", dh), ("w2_dq", hq.T @ dz)):
            out[name].append(float(np.sum(g**2)))
    return {k: np.array(v) for k, v in out.items()}


def test_qdq_twin_computes_the_model_with_its_rounding() -> None:
    """The twin keeps the activation Q/DQ pairs: bit-equal to the QDQ model with onnxruntime's graph
    optimizations off; with them on, onnxruntime fuses the original's DequantizeLinear→MatMul into
    integer kernels, which round the last bit differently (relative error ~2e-7)."""
    qdq = onnx.load(ZOO / "qdq_mlp.onnx")
    prepared = prepare(qdq)
    assert sum(n.op_type == "QuantizeLinear" for n in prepared.model.graph.node) == 2
    x = _data("qdq_mlp").arrays["x"][:, 0]
    for optimize, rtol in ((False, 0.0), (True, 1e-6)):
        want = make_session(qdq.SerializeToString(), optimize=optimize).run(None, {"x": x})[0]
        got = make_session(prepared.model.SerializeToString(), optimize=optimize).run(None, {"x": x})[0]
        assert relative_error(want, got) <= rtol, optimize
    verify(prepared, [{"x": x}])


ENGINES = [
    pytest.param(
        "ort-training",
        marks=pytest.mark.skipif(
            not GRADIENT_ENGINES["ort-training"].available(), reason="the reference engine needs onnxruntime-training"
        ),
    ),
    "onnx",
]


@pytest.mark.parametrize("engine", ENGINES)
def test_qdq_model_fisher_is_the_clipped_straight_through_gradient(engine: str) -> None:
    qdq = onnx.load(ZOO / "qdq_mlp.onnx")
    xs = _data("qdq_mlp").arrays["x"]
    labels = np.random.default_rng(3).integers(0, 5, size=(len(xs), 1))
    data = Dataset(arrays={"x": xs}, labels=labels, source="qdq_mlp")
    traces, _, _ = api.fisher_traces(api.open_model(qdq, data), FisherOptions(fisher="empirical", engine=engine))
    got = {t.name: traces.per_sample[:, j] for j, t in enumerate(traces.tensors)}
    want = _qdq_mlp_numpy(qdq, xs, labels)
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, err_msg=name)
        assert np.all(got[name] > 0), name
    # The clipping matters on this data: h saturates on some samples, where the unclipped
    # (constant-noise) gradient would differ.
    unclipped = _qdq_mlp_numpy(qdq, xs, labels, clip=False)
    assert not np.allclose(unclipped["h"], want["h"], rtol=1e-3)
    report = api.score(qdq, data)
    assert any("pair(s) kept as fixed quantizers" in n for n in report.notes)
    assert {t.name: t.kind.value for t in report.tensors} == {
        "x": "activation",
        "w1_dq": "weight",
        "h": "activation",
        "w2_dq": "weight",
    }


def _saturating_qdq_model() -> tuple[onnx.ModelProto, np.ndarray, float, int]:
    """x[N,8] · W → QuantizeLinear/DequantizeLinear (int8, zero point 3) → ·½; about a third of the
    MatMul's outputs fall outside the grid, so the clipping of the gradient is exercised."""
    rng = np.random.default_rng(5)
    w = (rng.normal(size=(8, 6)) * 3).astype(np.float32)
    scale, zero = np.float32(0.05), 3
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["h_q"]),
        helper.make_node("DequantizeLinear", ["h_q", "s", "z"], ["h_dq"]),
        helper.make_node("Mul", ["h_dq", "half"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(np.int8(zero), "z"),
        numpy_helper.from_array(np.float32(0.5), "half"),
    ]
    g = helper.make_graph(
        nodes,
        "saturating_qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m, w, float(scale), zero


@pytest.mark.parametrize("engine", ENGINES)
def test_fixed_quantizer_gradient_is_masked_where_it_saturates(engine: str) -> None:
    """Gaussian empirical Fisher of ½‖y − t‖², per sample: ∂ℓ/∂W = xᵀ((y − t)·½·1[h in range])."""
    model, w, scale, zero = _saturating_qdq_model()
    rng = np.random.default_rng(6)
    xs = rng.normal(size=(12, 1, 8)).astype(np.float32)
    ts = rng.normal(size=(12, 1, 6)).astype(np.float32)
    data = Dataset(arrays={"x": xs}, labels=ts, source="x")
    options = FisherOptions(fisher="empirical", likelihood="gaussian", engine=engine)
    traces, _, _ = api.fisher_traces(api.open_model(model, data), options)
    got = {t.name: traces.per_sample[:, j] for j, t in enumerate(traces.tensors)}
    assert got.keys() == {"x", "w"}
    want, saturated = [], []
    for x, t in zip(xs, ts, strict=True):
        h = x @ w
        q = np.rint(h / np.float32(scale)) + zero
        inside = (q >= -128) & (q <= 127)
        y = ((np.clip(q, -128, 127) - zero) * np.float32(scale)).astype(np.float32).astype(np.float64) * 0.5
        dh = (y - t) * 0.5 * inside
        want.append(float(np.sum((x.T.astype(np.float64) @ dh) ** 2)))
        saturated.append(1 - inside.mean())
    assert 0.2 < np.mean(saturated) < 0.6
    np.testing.assert_allclose(got["w"], want, rtol=1e-4)


REAL_QDQ = ZOO / "qdq" / "ppocr_cls_qdq.onnx"  # scripts/zoo/export_qdq.py: onnxruntime.quantization, authors' weights


def _real_qdq_session() -> tuple[onnx.ModelProto, object]:
    calib = np.load(ZOO / "ppocr_cls_mbv3.calib.npz")
    data = Dataset(arrays={"x": calib["x"][:4]}, labels=calib["labels"][:4], source="ppocr_cls_mbv3")
    qdq = onnx.load(REAL_QDQ)
    return qdq, api.open_model(qdq, data)


def _conv_gemm_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Independent count: each DequantizeLinear of an int8 initializer read as a Conv/Gemm/MatMul weight."""
    inits = {t.name: t for t in model.graph.initializer}
    read = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    return {
        n.output[0]: int(np.prod(inits[n.input[0]].dims))
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.output[0] in read
    }


def test_real_qdq_model_twin_is_bit_equal_and_every_weight_is_scored() -> None:
    qdq, s = _real_qdq_session()
    x = np.load(ZOO / "ppocr_cls_mbv3.calib.npz")["x"][4:8]
    inits = {t.name for t in qdq.graph.initializer}
    quantized = {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    (note,) = [c.detail for c in s.prepared.changes if c.kind == "quantized"]
    assert int(note.split()[0]) >= len(quantized) > 100  # every activation pair kept (none removed)
    a = make_session(qdq.SerializeToString(), optimize=False)
    b = make_session(s.prepared.model.SerializeToString(), optimize=False)
    for i in range(len(x)):
        feed = {"x": x[i : i + 1]}
        assert np.array_equal(a.run(None, feed)[0], b.run(None, feed)[0])
    weights = {t.name: t.numel for t in s.tensors if t.kind.value == "weight"}
    assert weights == _conv_gemm_weights(qdq)
    traces, target, _ = api.fisher_traces(s, FisherOptions(fisher="empirical", engine="onnx"))
    # The loss reads the logits in front of the Softmax, through the output's fixed quantizer (the
    # rounded probabilities of these confident samples are exactly 1: no gradient).
    assert target.tap != target.output and not target.probabilities
    assert np.all(np.isfinite(traces.per_sample)) and np.all(traces.per_sample.mean(axis=0) > 0)


@pytest.mark.skipif(not GRADIENT_ENGINES["ort-training"].available(), reason="needs onnxruntime-training")
def test_real_qdq_model_engines_agree() -> None:
    _, s = _real_qdq_session()
    means = {}
    for engine in ("ort-training", "onnx"):
        traces, _, _ = api.fisher_traces(s, FisherOptions(fisher="empirical", engine=engine))
        means[engine] = traces.per_sample.mean(axis=0)
    np.testing.assert_allclose(means["onnx"], means["ort-training"], rtol=1e-4)
