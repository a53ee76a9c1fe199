"""The ORT simulation of quantized models against an independent numpy fake quantization."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.analysis.simulate import Config, GridScheme, Simulator, build, make_grid, quantize
from fitonnx.errors import FitonnxError
from fitonnx.export.qnn import encoding_from_range
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind


def _make(nodes: list[onnx.NodeProto], x_shape: list, out: str, inits: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "sim",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", None])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def cnn(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,2,5,5] -> Conv w1[3,2,3,3] pad 1 -> Relu -> Flatten -> Gemm w2[4,75] (transB) -> logits[N,4]."""
    rng = np.random.default_rng(seed)
    p = {
        "w1": rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
        "b1": rng.normal(size=3).astype(np.float32),
        "w2": (rng.normal(size=(4, 75)) / 5).astype(np.float32),
        "b2": rng.normal(size=4).astype(np.float32),
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        n("Relu", ["c"], ["r"], name="relu"),
        n("Flatten", ["r"], ["f"], name="flat"),
        n("Gemm", ["f", "w2", "b2"], ["logits"], name="fc", transB=1),
    ]
    return _make(nodes, [2, 5, 5], "logits", p), p


def mlp(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,5] -> MatMul w1[5,7] -> Add b1 -> Relu -> Gemm w2[7,3] (no transB) -> logits[N,3]."""
    rng = np.random.default_rng(seed)
    p = {
        "w1": rng.normal(size=(5, 7)).astype(np.float32),
        "b1": rng.normal(size=7).astype(np.float32),
        "w2": rng.normal(size=(7, 3)).astype(np.float32),
        "b2": rng.normal(size=3).astype(np.float32),
    }
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w1"], ["h"], name="mm"),
        n("Add", ["h", "b1"], ["hb"], name="add"),
        n("Relu", ["hb"], ["r"], name="relu"),
        n("Gemm", ["r", "w2", "b2"], ["logits"], name="fc"),
    ]
    return _make(nodes, [5], "logits", p), p


# Independent numpy twin: float64 forward and a fake quantizer written from the definition.
QuantFn = Callable[[str, np.ndarray], np.ndarray]


def np_fake_quant(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    if symmetric:
        m = np.maximum(np.abs(lo), np.abs(hi))
        delta = m / (2 ** (bits - 1) - 1)
        k = np.clip(np.rint(x / delta), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        return k * delta
    # QuantizeLinear with an integer zero point over the range widened to hold 0.
    scale = (np.maximum(hi, 0) - np.minimum(lo, 0)) / (2**bits - 1)
    zero_point = np.rint(-np.minimum(lo, 0) / scale)
    return (np.clip(np.rint(x / scale) + zero_point, 0, 2**bits - 1) - zero_point) * scale


def np_weight(w: np.ndarray, bits: int, symmetric: bool, axis: int | None) -> np.ndarray:
    w = w.astype(np.float64)
    if axis is None:
        return np_fake_quant(w, np.array(w.min()), np.array(w.max()), bits, symmetric)
    other = tuple(k for k in range(w.ndim) if k != axis)
    return np_fake_quant(w, w.min(axis=other, keepdims=True), w.max(axis=other, keepdims=True), bits, symmetric)


def np_cnn(p: Mapping[str, np.ndarray], x: np.ndarray, act: QuantFn) -> np.ndarray:
    xq = act("x", x.astype(np.float64))
    xp = np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(xp, (3, 3), axis=(2, 3))
    c = np.einsum("ncijpq,ocpq->noij", windows, p["w1"]) + p["b1"][None, :, None, None]
    f = act("f", np.maximum(c, 0).reshape(len(x), -1))
    return f @ p["w2"].T + p["b2"]


def np_mlp(p: Mapping[str, np.ndarray], x: np.ndarray, act: QuantFn) -> np.ndarray:
    h = act("x", x.astype(np.float64)) @ p["w1"] + p["b1"]
    return act("r", np.maximum(h, 0)) @ p["w2"] + p["b2"]


def _setup(
    model: onnx.ModelProto, x: np.ndarray, ranges: dict[str, tuple[float, float]], scheme: GridScheme
) -> Simulator:
    s = api.open_model(model, Dataset({"x": x}))
    sim = build(s.prepared.model, s.tensors, "logits", s.specs)
    return Simulator(sim, s.prepared.model, s.tensors, ranges, scheme, Dataset({"x": x}), s.specs, 7)


CASES = [
    # model, numpy twin, activation names, channel axis per weight
    (cnn, np_cnn, ("x", "f"), {"w1": 0, "w2": 0}),
    (mlp, np_mlp, ("x", "r"), {"w1": 1, "w2": 1}),
]


@pytest.mark.parametrize("case", CASES, ids=["cnn", "mlp"])
@pytest.mark.parametrize(("per_channel", "symmetric"), [(False, False), (True, False), (False, True), (True, True)])
def test_simulation_matches_numpy_fake_quantization(case: tuple, per_channel: bool, symmetric: bool) -> None:
    build_model, twin, act_names, axes = case
    model, params = build_model()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(23, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]))
    x = x.astype(np.float32)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    # Activation ranges from the first 12 samples ("calibration"), applied to all 23 with clipping.
    seen: dict[str, list[np.ndarray]] = {}
    twin(p64, x[:12], lambda name, a: seen.setdefault(name, []).append(a) or a)
    ranges = {name: (float(seen[name][0].min()), float(seen[name][0].max())) for name in act_names}
    simulator = _setup(model, x, ranges, GridScheme(per_channel=per_channel, symmetric=symmetric))
    float_out = twin(p64, x, lambda name, a: a)
    clipped = 0
    for wb, ab in [({"w1": 3, "w2": 5}, {act_names[0]: 4, act_names[1]: 2}), ({"w1": 8, "w2": 2}, {act_names[1]: 6})]:
        config = Config(wb, ab)
        got = simulator.run(config)
        pq = dict(p64)
        for name, bits in wb.items():
            pq[name] = np_weight(params[name], bits, symmetric, axes[name] if per_channel else None)

        def act(name: str, a: np.ndarray, ab: dict[str, int] = ab) -> np.ndarray:
            nonlocal clipped
            if name not in ab:
                return a
            lo, hi = ranges[name]
            clipped += int(np.sum((a < lo) | (a > hi)))
            return np_fake_quant(a, np.array(lo), np.array(hi), ab[name], symmetric)

        want = twin(pq, x, act)
        assert got.shape == want.shape
        # Quantization moved the outputs far more than the float32/float64 difference allowed here.
        assert np.max(np.abs(want - float_out)) > 1e-2
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    assert clipped > 0  # held-out values outside the calibration range were exercised


@pytest.mark.parametrize("build_model", [cnn, mlp], ids=["cnn", "mlp"])
def test_float_configuration_reproduces_the_model_bit_for_bit(build_model: Callable) -> None:
    model, _ = build_model()
    x = np.random.default_rng(0).normal(
        size=(9, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]])
    )
    x = x.astype(np.float32)
    simulator = _setup(model, x, {"x": (-1.0, 1.0), "f": (0.0, 1.0), "r": (0.0, 1.0)}, GridScheme())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    want = ort.InferenceSession(model.SerializeToString(), options).run(["logits"], {"x": x})[0]
    got = simulator.run(Config.floating())
    assert np.array_equal(got, want)
    default = ort.InferenceSession(model.SerializeToString()).run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(got, default, rtol=1e-5, atol=1e-6)


def test_build_leaves_the_model_alone_and_feeds_every_width() -> None:
    model, params = cnn()
    before = model.SerializeToString()
    x = np.random.default_rng(1).normal(size=(4, 2, 5, 5)).astype(np.float32)
    seen: dict[str, np.ndarray] = {}
    np_cnn({k: v.astype(np.float64) for k, v in params.items()}, x, lambda name, a: seen.setdefault(name, a))
    simulator = _setup(model, x, {k: (float(v.min()), float(v.max())) for k, v in seen.items()}, GridScheme())
    assert model.SerializeToString() == before
    names = {i.name for i in onnx.load_from_string(simulator.sim.model_bytes).graph.input}
    assert {"w1", "w2"} <= names  # weights became inputs
    outs = {b: simulator.run(Config({"w1": b, "w2": b}, {"x": b, "f": b})) for b in range(2, 17)}
    ref = simulator.run(Config.floating())
    errors = [float(np.abs(outs[b] - ref).max()) for b in range(2, 17)]
    assert errors[-1] < 1e-3 < errors[0]
    with pytest.raises(FitonnxError, match="expected quantizable tensor names"):
        simulator.run(Config({"b1": 4}, {}))


def test_grids_by_hand() -> None:
    x = np.array([0.0, 0.1, 0.4, 0.9, 1.0, 1.3])
    # 2 bits over [0, 1]: levels 0, 1/3, 2/3, 1; 1.3 clips to 1.
    np.testing.assert_allclose(quantize(x, make_grid(0.0, 1.0, 2, False)), [0, 0, 1 / 3, 1, 1, 1])
    # symmetric 3 bits, max|x| = 1: step 1/3, levels −1..1 (7 of them); 0 stays 0.
    g = make_grid(-0.5, 1.0, 3, True)
    assert float(g.step) == pytest.approx(1 / 3) and g.levels == 6
    np.testing.assert_allclose(quantize(np.array([-0.9, 0.0, 0.1, 0.4, 2.0]), g), [-1, 0, 0, 1 / 3, 1])
    # A constant tensor is left as it is.
    assert quantize(np.full(3, 2.5), make_grid(2.5, 2.5, 4, False)).tolist() == [2.5, 2.5, 2.5]


@pytest.mark.parametrize("symmetric", [False, True])
def test_grids_are_the_qnn_encodings_grids(symmetric: bool) -> None:
    # The simulation must quantize as a toolchain would: the same grid as the QNN exporter's
    # encodings (a separate implementation, float = (q + offset)·scale), 0 always a level.
    rng = np.random.default_rng(0)
    for lo, hi in [(-0.93, 0.47), (0.0, 6.0), (0.2, 1.7), (-3.0, -0.5), (-1.0, 1.0), *rng.normal(size=(20, 2))]:
        lo, hi = min(lo, hi), max(lo, hi)
        if hi - lo < 0.02:
            continue
        for bits in range(2, 9):
            e = encoding_from_range(lo, hi, bits, symmetric=symmetric)
            x = np.concatenate([rng.uniform(lo, hi, 500), [lo, hi, 0.0]])
            q = np.clip(np.round(x / e.scale) - e.offset, 0, 2**bits - 1)
            grid = make_grid(lo, hi, bits, symmetric)
            np.testing.assert_allclose(quantize(x, grid), (q + e.offset) * e.scale, rtol=0, atol=1e-12)
            assert quantize(np.zeros(1), grid)[0] == 0.0


def _sample_shape(model: onnx.ModelProto) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]


def test_channel_axes_follow_the_consuming_op() -> None:
    for build_model, axes in [(cnn, {"w1": 0, "w2": 0}), (mlp, {"w1": 1, "w2": 1})]:
        model, _ = build_model()
        data = Dataset({"x": np.zeros((3, *_sample_shape(model)), np.float32)})
        s = api.open_model(model, data)
        sim = build(s.prepared.model, s.tensors, "logits", s.specs)
        acts = {t.name: (0.0, 1.0) for t in s.tensors if t.kind is Kind.ACTIVATION}
        simulator = Simulator(sim, s.prepared.model, s.tensors, acts, GridScheme(per_channel=True), data, s.specs)
        assert simulator.axes == axes


def test_a_model_that_cannot_batch_runs_one_sample_at_a_time() -> None:
    """A Reshape to a constant [1, 6] (what folding shape arithmetic at batch 1 leaves) breaks batches."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    shape = np.array([1, 6], np.int64)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "w"], ["logits"], name="mm"),
    ]
    model = _make(nodes, [2, 3], "logits", {"w": w, "shape": shape})
    x = rng.normal(size=(10, 2, 3)).astype(np.float32)
    s = api.open_model(model, Dataset({"x": x}))
    sim = build(s.prepared.model, s.tensors, "logits", s.specs)
    simulator = Simulator(
        sim, s.prepared.model, s.tensors, {"flat": (-3.0, 3.0)}, GridScheme(), Dataset({"x": x}), s.specs
    )
    assert len(simulator.data.feeds) == 10
    got = simulator.run(Config({"w": 4}, {"flat": 5}))
    wq = np_fake_quant(w.astype(np.float64), np.array(w.min()), np.array(w.max()), 4, False)
    fq = np_fake_quant(x.reshape(10, 6).astype(np.float64), np.array(-3.0), np.array(3.0), 5, False)
    np.testing.assert_allclose(got, fq @ wq, rtol=0, atol=1e-4)


def test_replacement_weights_are_fed_as_given() -> None:
    model, params = mlp()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, *_sample_shape(model))).astype(np.float32)
    simulator = _setup(model, x, {}, GridScheme())
    quantized = simulator.run(Config({"w1": 3}, {}))
    # Feeding the quantized values by hand is the same run; a perturbation of our own changes it.
    same = simulator.run(Config.floating(), {"w1": simulator.quantized_weight("w1", 3)})
    np.testing.assert_array_equal(same, quantized)
    other = simulator.run(Config.floating(), {"w1": params["w1"] + 0.1})
    assert np.abs(other - simulator.run(Config.floating())).max() > 1e-3
    with pytest.raises(FitonnxError, match="expected replacement values"):
        simulator.run(Config.floating(), {"w1": params["w1"][:1]})
    with pytest.raises(FitonnxError, match="expected replacement values"):
        simulator.run(Config.floating(), {"nope": params["w1"]})
