"""Weights read by several nodes (issue 14) are scored once, with the gradient SUMMED over the readers
before squaring: ‖Σ_r g_r‖², which is what quantizing the one stored tensor perturbs (not Σ_r ‖g_r‖²).

Checked in both gradient engines against float64 numpy (a weight read through an Identity chain by
two MatMuls; a table tied between a Gather and a Gemm, or a MatMul reading it through a Transpose,
whose numpy gradient is checked against finite differences), and for one LayerNormalization scale and
bias shared by three nodes against the same model with a copy per node (which onnxruntime-training
used to reject with "Duplicate definition of name (ln.s_grad)").
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

ENGINES = [
    pytest.param(
        "ort-training",
        marks=pytest.mark.skipif(
            not GRADIENT_ENGINES["ort-training"].available(), reason="the reference engine needs onnxruntime-training"
        ),
    ),
    "onnx",
]
ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
RNG = np.random.default_rng(11)
W = (RNG.normal(size=(4, 4)) * 0.7).astype(np.float32)
X = RNG.normal(size=(10, 1, 4)).astype(np.float32)
T = RNG.normal(size=(10, 1, 4)).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], inputs, outputs, inits) -> onnx.ModelProto:
    m = helper.make_model(
        helper.make_graph(nodes, "m", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 9
    return m


def identity_chain() -> onnx.ModelProto:
    """y = (x·W)·W with the second reader behind Identity(Identity(W))."""
    nodes = [
        helper.make_node("Identity", ["w"], ["w_a"]),
        helper.make_node("Identity", ["w_a"], ["w_b"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("MatMul", ["h", "w_b"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(W, "w")],
    )


def _per_sample(model: onnx.ModelProto, data: Dataset, engine: str, **options: object) -> dict[str, np.ndarray]:
    traces, _, _ = api.fisher_traces(api.open_model(model, data), FisherOptions(engine=engine, **options))
    return {t.name: traces.per_sample[:, j] for j, t in enumerate(traces.tensors)}


@pytest.mark.parametrize("engine", ENGINES)
def test_identity_chain_sums_readers(engine: str) -> None:
    data = Dataset(arrays={"x": X}, labels=T, source="x")
    got = _per_sample(identity_chain(), data, engine, fisher="empirical", likelihood="gaussian")
    assert [k for k in got if not k.startswith(("x", "h"))] == ["w"]  # one weight, scored once
    w = W.astype(np.float64)
    summed, separate = [], []
    for x, t in zip(X.astype(np.float64), T.astype(np.float64), strict=True):
        h = x @ w
        dy = h @ w - t  # ½‖y − t‖²
        g_second = h.T @ dy
        g_first = x.T @ (dy @ w.T)
        summed.append(np.sum((g_first + g_second) ** 2))
        separate.append(np.sum(g_first**2) + np.sum(g_second**2))
    np.testing.assert_allclose(got["w"], summed, rtol=1e-4)
    assert not np.allclose(summed, separate, rtol=1e-2)


def tied_table() -> onnx.ModelProto:
    """logits = Gemm(Gather(E, ids), E, transB=1): one table read as embedding and as classifier."""
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("Gemm", ["e", "emb"], ["logits"], transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array((RNG.normal(size=(6, 3)) * 0.8).astype(np.float32), "emb")],
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_tied_table_sums_gather_and_gemm(engine: str) -> None:
    model = tied_table()
    emb = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    ids = np.arange(6, dtype=np.int64).reshape(6, 1)
    labels = ((ids[:, 0] + 2) % 6).reshape(6, 1)
    got = _per_sample(model, Dataset(arrays={"ids": ids}, labels=labels, source="ids"), engine, fisher="empirical")
    want = []
    for i, y in zip(ids[:, 0], labels[:, 0], strict=True):
        e = emb[i]
        z = emb @ e
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        dz = p - np.eye(6)[y]
        g = np.outer(dz, e)  # the Gemm reader
        g[i] += emb.T @ dz  # the Gather reader: the row it read
        want.append(np.sum(g * g))
    np.testing.assert_allclose(got["emb"], want, rtol=1e-4)


def tied_through_transpose() -> onnx.ModelProto:
    """logits = MatMul(Relu(Gather(E, ids)·W), Transpose(E)): the output projection reads the
    embedding table transposed (how exporters write tied embeddings); onnxruntime's constant folding
    used to turn Transpose(E) into a second initializer, scored and counted as another weight."""
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "emb_t"], ["logits"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 7])],
        [
            numpy_helper.from_array((RNG.normal(size=(7, 3)) * 0.8).astype(np.float32), "emb"),
            numpy_helper.from_array((RNG.normal(size=(3, 3)) * 0.8 + 0.3).astype(np.float32), "w"),
        ],
    )


def _tied_loss_and_grads(emb: np.ndarray, w: np.ndarray, i: int, y: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Cross-entropy of ``tied_through_transpose`` for one id, and its gradients (float64 numpy)."""
    e = emb[i]
    h0 = e @ w
    h = np.maximum(h0, 0)
    z = h @ emb.T
    logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
    dz = np.exp(logp) - np.eye(len(emb))[y]
    dh0 = (dz @ emb) * (h0 > 0)
    g_emb = np.outer(dz, h)  # the MatMul reader, through the Transpose
    g_emb[i] += w @ dh0  # the Gather reader: the row it read
    return float(-logp[y]), g_emb, np.outer(e, dh0)


def test_tied_gradients_match_finite_differences() -> None:
    """The numpy reference itself, against central differences of its loss (float64)."""
    model = tied_through_transpose()
    emb, w = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    _, g_emb, g_w = _tied_loss_and_grads(emb, w, 2, 5)
    for value, grad, which in ((emb, g_emb, 0), (w, g_w, 1)):
        fd = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[idx] = 1e-6
            args = [emb, w]
            args[which] = value + step
            plus = _tied_loss_and_grads(*args, 2, 5)[0]
            args[which] = value - step
            fd[idx] = (plus - _tied_loss_and_grads(*args, 2, 5)[0]) / 2e-6
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("engine", ENGINES)
def test_tied_through_transpose_scored_once(engine: str) -> None:
    model = tied_through_transpose()
    emb, w = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    ids = np.arange(7, dtype=np.int64).reshape(7, 1)
    labels = ((ids[:, 0] * 3 + 1) % 7).reshape(7, 1)
    data = Dataset(arrays={"ids": ids}, labels=labels, source="ids")
    traces, _, _ = api.fisher_traces(api.open_model(model, data), FisherOptions(engine=engine, fisher="empirical"))
    weights = [t for t in traces.tensors if t.kind.value == "weight"]
    assert [t.name for t in weights] == ["emb", "w"]
    # Independent count: the elements of the model's two float initializers.
    assert sum(t.numel for t in weights) == sum(int(np.prod(t.dims)) for t in model.graph.initializer) == 30
    got = {t.name: traces.per_sample[:, j] for j, t in enumerate(traces.tensors)}
    want = {"emb": [], "w": []}
    for i, y in zip(ids[:, 0], labels[:, 0], strict=True):
        _, g_emb, g_w = _tied_loss_and_grads(emb, w, int(i), int(y))
        want["emb"].append(np.sum(g_emb**2))
        want["w"].append(np.sum(g_w**2))
    np.testing.assert_allclose(got["emb"], want["emb"], rtol=1e-4)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-4)


def _unshared(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with a copy of each LayerNormalization scale/bias per node (same values, no sharing)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    k = 0
    for node in out.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        for slot in (1, 2):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[slot]])
            copy.name = f"{node.input[slot]}_copy{k}"
            out.graph.initializer.append(copy)
            node.input[slot] = copy.name
        k += 1
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_layernorm_equals_unshared_copies(engine: str) -> None:
    model = onnx.load(ZOO / "shared_layernorm.onnx")
    assert sum(n.op_type == "LayerNormalization" and n.input[1] == "ln.s" for n in model.graph.node) == 3
    arrays = dict(np.load(ZOO / "shared_layernorm.calib.npz"))
    data = Dataset(arrays=arrays, source="calib")
    shared = _per_sample(model, data, engine, fisher="mc")
    copies = _per_sample(_unshared(model), data, engine, fisher="mc")
    assert shared.keys() == copies.keys() and "tied.w" in shared
    for name in shared:
        np.testing.assert_allclose(shared[name], copies[name], rtol=1e-5, err_msg=name)
        assert shared[name].mean() > 0
