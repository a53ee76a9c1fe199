"""validate's simulation (one session per pattern of quantized activations) against quantized models
built independently: weights rounded in numpy, 8-bit activations through onnxruntime's own
QuantizeLinear/DequantizeLinear, KL computed in numpy against the float model's own session."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from fitonnx.analysis import simulate
from fitonnx.analysis.harness import Harness, SimulationOptions, harness
from fitonnx.analysis.simulate import ActMode, Config
from fitonnx.fisher.options import FisherOptions
from tests.test_simulate import np_fake_quant

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "mnist_cnn.onnx"


@pytest.fixture(scope="module")
def h() -> Harness:
    return harness(
        CNN, MODELS / "mnist_cnn.calib.npz", simulation=SimulationOptions(), options=FisherOptions(max_samples=16)
    )


def _qdq_params(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """uint8 QuantizeLinear parameters of the min/max range widened to hold 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    return np.array(scale, np.float32), np.array(np.clip(np.rint(-lo / scale), 0, 255), np.uint8)


def independent_model(h: Harness, config: Config) -> onnx.ModelProto:
    """The original model file with its weights quantized in numpy and a QuantizeLinear→DequantizeLinear
    pair on each 8-bit activation of ``config`` (ranges: the harness's calibration ranges)."""
    model = onnx.load(CNN)
    g = model.graph
    for init in g.initializer:
        bits = config.weight_bits.get(init.name)
        if bits is not None:
            w = numpy_helper.to_array(init).astype(np.float64)
            q = np_fake_quant(w, np.array(w.min()), np.array(w.max()), int(bits), symmetric=False)
            init.CopyFrom(numpy_helper.from_array(q.astype(np.float32), init.name))
    pairs: dict[str, list[onnx.NodeProto]] = {}
    for k, (name, bits) in enumerate(config.activation_bits.items()):
        assert bits == 8  # uint8 is the one width QuantizeLinear here offers
        scale, zp = _qdq_params(*h.simulator.act_ranges[name])
        g.initializer.extend([numpy_helper.from_array(scale, f"s{k}"), numpy_helper.from_array(zp, f"z{k}")])
        for node in g.node:
            node.input[:] = [f"dq{k}" if i == name else i for i in node.input]
        pairs[name] = [
            helper.make_node("QuantizeLinear", [name, f"s{k}", f"z{k}"], [f"q{k}"]),
            helper.make_node("DequantizeLinear", [f"q{k}", f"s{k}", f"z{k}"], [f"dq{k}"]),
        ]
    nodes = [n for i in g.input for n in pairs.get(i.name, [])]
    for node in list(g.node):
        nodes += [node, *(n for o in node.output for n in pairs.get(o, []))]
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model


def _logits(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The model's logits at the simulation's optimization level, Q/DQ pairs run as written (not
    fused into integer kernels). At onnxruntime's default level the float activations differ from
    the simulation's by ~1e-6, enough to move a few values across a rounding boundary."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], dict(feeds))[0], np.float64)


def _sample_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def test_measured_kl_equals_an_independently_quantized_model(h: Harness) -> None:
    acts = list(h.activations)
    assert h.target.tap == "logits" and len(acts) >= 3 and "input" in acts
    weights = dict(zip(h.weights, (3, 5, 4, 6), strict=True))
    configs = [
        Config(weights, {}),  # weights only: the variant without any activation quantizer
        Config({w: 8 for w in h.weights}, {a: 8 for a in acts}),  # every activation on its grid
        Config({h.weights[2]: 4}, {acts[0]: 8, acts[-1]: 8}),  # some activations: a third variant
    ]
    modes = {h.simulator.modes(h.simulator.feed(c)) for c in configs}
    assert len(modes) == 3 and (ActMode.KEPT,) * len(acts) in modes
    feeds = {"input": h.held_out.arrays["input"]}
    float_logits = _logits(onnx.load(CNN), feeds)
    assert h.measure(Config.floating()).kl == 0.0
    for config in configs:
        logits = _logits(independent_model(h, config), feeds)
        np.testing.assert_allclose(h.simulator.run(config), logits, rtol=1e-6, atol=1e-6)
        want = _sample_kl(float_logits, logits)
        got = h.measure(config)
        assert want.mean() > 1e-5  # quantization moved the outputs well past float32 noise
        np.testing.assert_allclose(got.sample_kl, want, rtol=1e-6, atol=1e-15)


def test_sessions_are_bounded_and_a_dropped_one_is_rebuilt_to_the_same_outputs(h: Harness) -> None:
    sim = h.simulator
    acts = list(h.activations)
    assert len(acts) >= simulate.MAX_SESSIONS  # with the float pattern, more patterns than sessions kept
    before = {k: sim.run(Config({}, {a: 5})) for k, a in enumerate(acts[:2])}
    floating = sim.run(Config.floating())
    for a in acts:
        sim.run(Config({}, {a: 6}))
    assert len(sim._sessions) <= simulate.MAX_SESSIONS
    np.testing.assert_array_equal(sim.run(Config.floating()), floating)
    for k, a in enumerate(acts[:2]):
        np.testing.assert_array_equal(sim.run(Config({}, {a: 5})), before[k])


def test_a_variant_has_quantizer_nodes_only_on_quantized_activations(h: Harness) -> None:
    sim = h.simulator.sim
    base = onnx.load_from_string(sim.model_bytes)
    assert not {n.op_type for n in base.graph.node} & {"Round", "Where", "If"}
    modes = [ActMode.KEPT] * len(sim.activations)
    modes[0], modes[-1] = ActMode.INTEGER, ActMode.FLOATING
    model = onnx.load_from_string(simulate.variant(sim, modes))
    added = len(model.graph.node) - len(base.graph.node)
    assert added == 4 + len(simulate.float_quantizer_nodes("x", "p", "s", "m", "e", "t"))
    readers = {i for n in model.graph.node for i in n.input}
    assert sim.activations[1].name in readers  # kept activations are read as they are
    declared = {i.name for i in model.graph.input} - {i.name for i in base.graph.input}
    first, last = sim.activations[0], sim.activations[-1]
    assert declared == {first.step, first.kmin, first.kmax, last.fscale, last.fmant, last.femin, last.ftop}
