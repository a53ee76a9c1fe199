"""How format statistics are summed without constants in the graph: running sums of a weight's g²,
the weighted products after the loop, and weights handed to onnxruntime without serializing them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.fisher.engine import RunningSum
from fitonnx.fisher.statistics import BLOCK, CHUNK, WeightedStat, diag_key, finish_weighted
from fitonnx.model import external
from fitonnx.model.runtime import make_session


def test_running_sum_of_float32_arrays_is_float64_within_the_chunk_rule() -> None:
    rng = np.random.default_rng(0)
    values = [rng.random(1000, dtype=np.float32) * 10.0 ** rng.uniform(-3, 3) for _ in range(2 * CHUNK + 5)]
    total = RunningSum()
    for v in values:
        total.add(v)
    exact = np.sum(np.array(values, np.float64), axis=0)
    got = np.asarray(total.value(), np.float64)
    np.testing.assert_allclose(got, exact, rtol=CHUNK * 2.0**-24)
    assert np.max(np.abs(got - exact) / exact) > 0  # the float32 runs are really float32


def test_running_sum_of_float64_scalars_is_exact_order() -> None:
    values = [np.float64(x) for x in np.random.default_rng(1).normal(size=50)]
    total = RunningSum()
    for v in values:
        total.add(np.asarray(v))
    expected = 0.0
    for v in values:
        expected = expected + float(v)
    assert float(total.value()) == expected


def test_finish_weighted_is_the_weighted_mean_of_the_diagonal() -> None:
    rng = np.random.default_rng(2)
    shape = (3, BLOCK // 2 + 7)  # more than one block, the last one partial
    diag = rng.random(shape, dtype=np.float32)
    a, b = rng.random(shape), rng.random(shape) * 1e-6
    stats = [WeightedStat.of("w", "a", a), WeightedStat.of("w", "b", b), WeightedStat.of("unreached", "a", a)]
    out = finish_weighted({diag_key("w"): diag, "other": np.asarray(2.5)}, stats, samples=4)
    assert set(out) == {"other", "w|a", "w|b"}  # the diagonal is dropped, an unreached weight left out
    for key, c in (("w|a", a), ("w|b", b)):
        root = np.sqrt(c).astype(np.float32).astype(np.float64)
        expected = float(np.sum(root**2 * diag.astype(np.float64))) / 4
        assert abs(float(out[key]) / expected - 1) < 1e-12, key


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, w.shape[0]])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(w.shape[1], np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_detached_weights_run_as_the_serialized_model_and_leave_it_unchanged() -> None:
    rng = np.random.default_rng(3)
    model = _matmul_model(rng.normal(size=(256, 128)).astype(np.float32))
    before = model.SerializeToString()
    slim, values = external.detached(model)
    assert model.SerializeToString() == before
    assert set(values) == {"w"}  # the bias is below DETACH_BYTES: it stays in the protobuf
    assert slim.ByteSize() < 4096 and not external.external_tensors(slim)
    x = rng.normal(size=(2, 256)).astype(np.float32)
    got = make_session(slim.SerializeToString(), initializers=values).run(None, {"x": x})[0]
    ref = make_session(before).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)
