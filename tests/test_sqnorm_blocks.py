"""Per-sample squared norms from blocked float32 sums stay within the documented bound of float64.

instrument sums squares in float32 over blocks of k (16..32) consecutive elements when the element
count has such a divisor, then sums the block sums in float64; otherwise (and with
``exact_norms=True``) it casts the whole gradient to float64. Both are checked against numpy float64
sums over the same gradients, fetched from the same session.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.fisher import engine, instrument, losses
from fitonnx.model import graph
from fitonnx.model.data import Dataset

BLOCK_RTOL = 32 * 2.0**-24  # k·2⁻²⁴ with k <= MAX_BLOCK = 32
EXACT_RTOL = 1e-12


def _model(seed: int = 0) -> onnx.ModelProto:
    """x[N,91] -> MatMul w1[91,512] -> Relu -> MatMul w2[512,10] -> logits; weights of widely spread scale."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((91, 512)) * rng.lognormal(0, 2, (91, 512)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((512, 10)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2"),
    ]
    g = helper.make_graph(
        nodes,
        "blocks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 91])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _sqnorms_and_grads(exact_norms: bool) -> tuple[instrument.GradientModel, list[np.ndarray], list[np.ndarray]]:
    model = _model()
    rng = np.random.default_rng(1)
    data = Dataset(arrays={"x": rng.standard_normal((4, 91)).astype(np.float32)}, labels=rng.integers(0, 10, 4))
    tensors = graph.find_quantizable(model)
    target = losses.resolve_output(model, graph.output_ranks(model), None, None, data.labels, None)
    head = losses.build_head(target, losses.FisherMode.EMPIRICAL, data.labels.dtype)
    specs = graph.input_specs(model)
    activations = [t for t in tensors if t.kind is graph.Kind.ACTIVATION]
    probe, names = instrument.build_probe(model, activations, None)
    feed = data.sample(0, specs)
    shapes = engine.probe_shapes(probe, names, feed)
    gm = instrument.build_gradient_model(
        instrument.GradientRequest(
            model,
            tensors,
            head,
            data.labels.dtype,
            {n: len(s) for n, s in shapes.items()},
            keep_gradients=True,
            shapes={**shapes, "x": feed["x"].shape},
            exact_norms=exact_norms,
        )
    )
    session = engine.make_session(gm.model_bytes)
    zeros = {zero: np.zeros(shapes[act], np.float32) for act, zero in gm.perturbations}
    sq, grads = [], []
    n = len(gm.sqnorm_outputs)
    for i in range(data.num_samples):
        values = session.run(
            [*gm.sqnorm_outputs, *gm.grad_outputs],
            {**data.sample(i, specs), **zeros, losses.LABELS: data.labels[i : i + 1]},
        )
        sq.append(np.array(values[:n], np.float64))
        grads.append([np.asarray(v, np.float64) for v in values[n:]])
    want = [np.array([np.sum(g**2) for g in per_tensor]) for per_tensor in grads]
    return gm, sq, want


def _blocked(gm: instrument.GradientModel) -> set[str]:
    """Tensors whose squared norm goes through the blocked float32 path (a Reshape into rows)."""
    nodes = onnx.load_from_string(gm.model_bytes).graph.node
    rows = {n.output[0] for n in nodes if n.op_type == "Reshape"}
    return {t.name for t, sq in zip(gm.tensors, gm.sqnorm_outputs, strict=True) if sq + "_rows" in rows}


def test_blocked_norms_within_bound_and_exact_fallback() -> None:
    gm, got, want = _sqnorms_and_grads(exact_norms=False)
    names = [t.name for t in gm.tensors]
    # x has 91 = 7·13 elements per sample (no divisor in 16..32): exact path; the rest are blocked.
    assert set(names) == {"x", "w1", "r", "w2"}
    assert _blocked(gm) == {"w1", "r", "w2"}
    for g, w in zip(got, want, strict=True):
        assert np.all(w > 0)
        rel = np.abs(g - w) / w
        for name, err in zip(names, rel, strict=True):
            assert err <= (EXACT_RTOL if name == "x" else BLOCK_RTOL), (name, err)


def test_exact_norms_casts_everything_to_float64() -> None:
    gm, got, want = _sqnorms_and_grads(exact_norms=True)
    assert _blocked(gm) == set()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=EXACT_RTOL, atol=0)
