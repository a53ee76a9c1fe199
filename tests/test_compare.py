"""fitonnx compare: structural alignment across exporters, paired scores, summary, CLI."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fitonnx.analysis.align import align
from fitonnx.analysis.compare import CompareReport, compare, open_models
from fitonnx.api import Session, open_model
from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind, find_quantizable
from fitonnx.model.runtime import make_session
from fitonnx.prepare.passes.autopad import explicit_conv_pads
from fitonnx.render.compare import format_table, to_dict
from fitonnx.score.ranks import spearman

PAIR = Path(__file__).resolve().parent.parent / "models" / "pair"
TORCH, JAX = PAIR / "cnn_torch.onnx", PAIR / "cnn_jax.onnx"
RNG = np.random.default_rng(0)


# --- small models built in code ---------------------------------------------------------------


def _model(nodes: list, inputs: list, outputs: list, inits: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(_dtype(v), k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _dtype(v: np.ndarray) -> np.ndarray:
    return v.astype(np.int64 if np.issubdtype(v.dtype, np.integer) else np.float32)


def _io(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def gemm_mlp(weights: Sequence[np.ndarray], names: Sequence[str]) -> onnx.ModelProto:
    """Linear layers as Gemm with transB=1 and [out, in] weights (PyTorch's export), ReLU between."""
    nodes, inits, x = [], {}, "x"
    for k, (w, name) in enumerate(zip(weights, names, strict=True)):
        out = "logits" if k == len(weights) - 1 else f"h{k}"
        gemm_out = out if k == len(weights) - 1 else f"g{k}"
        inits[name], inits[f"{name}.bias"] = w, np.full(w.shape[0], 0.1)
        nodes.append(helper.make_node("Gemm", [x, name, f"{name}.bias"], [gemm_out], transB=1))
        if k < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        x = out
    return _model(nodes, [_io("x", ["N", weights[0].shape[1]])], [_io("logits", ["N", weights[-1].shape[0]])], inits)


def matmul_mlp(weights: Sequence[np.ndarray], names: Sequence[str]) -> onnx.ModelProto:
    """The same layers as MatMul + Add with [in, out] weights (a Keras/TF-style export)."""
    nodes, inits, x = [], {}, "input_1"
    for k, (w, name) in enumerate(zip(weights, names, strict=True)):
        last = k == len(weights) - 1
        inits[name], inits[f"{name}/bias"] = w.T, np.full(w.shape[0], 0.1)
        nodes.append(helper.make_node("MatMul", [x, name], [f"mm{k}"]))
        nodes.append(helper.make_node("Add", [f"mm{k}", f"{name}/bias"], ["out" if last else f"add{k}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"add{k}"], [f"act{k}"]))
        x = f"act{k}"
    return _model(nodes, [_io("input_1", ["N", weights[0].shape[1]])], [_io("out", ["N", weights[-1].shape[0]])], inits)


def conv_nchw(w: np.ndarray, fc: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w"], ["logits"], transB=1),
    ]
    return _model(nodes, [_io("x", ["N", 2, 6, 6])], [_io("logits", ["N", 5])], {"conv.w": w, "fc.w": fc})


def conv_nhwc(w: np.ndarray, fc: np.ndarray) -> onnx.ModelProto:
    """conv_nchw for NHWC input: Transposes around the conv, an HWIO kernel seen through a Transpose,
    SAME padding, (H, W, C) flatten order and a MatMul with permuted [in, out] weight rows."""
    fc_rows = fc.reshape(5, 4, 6, 6).transpose(2, 3, 1, 0).reshape(144, 5)
    nodes = [
        helper.make_node("Transpose", ["img"], ["img_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Transpose", ["kernel_hwio"], ["kernel_oihw"], perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["img_nchw", "kernel_oihw"], ["c"], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["r_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["r_nhwc", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense_kernel"], ["logits"]),
    ]
    inits = {"kernel_hwio": w.transpose(2, 3, 1, 0), "dense_kernel": fc_rows, "shape": np.array([-1, 144])}
    return _model(nodes, [_io("img", ["N", 6, 6, 2])], [_io("logits", ["N", 5])], inits)


def _sorted_values(session: Session, name: str) -> np.ndarray:
    """A tensor's values on the first sample, sorted (equal up to any permutation of the layout)."""
    model = session.prepared.model
    inits = {t.name: t for t in model.graph.initializer}
    if name in inits:
        return np.sort(numpy_helper.to_array(inits[name]).ravel())
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    (value,) = make_session(probe.SerializeToString()).run([name], session.data.sample(0, session.specs))
    return np.sort(np.asarray(value).ravel())


def _check_pairs_by_value(report: CompareReport, sessions: Sequence[Session]) -> None:
    """Independent of names and of the aligner: each pair holds the same values up to a permutation."""
    for p in report.comparisons[0].pairs:
        va, vb = _sorted_values(sessions[0], p.a.name), _sorted_values(sessions[1], p.b.name)
        assert va.shape == vb.shape, (p.a.name, p.b.name)
        np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5, err_msg=f"{p.a.name} / {p.b.name}")


def _run(sessions: Sequence[Session], **options: object) -> CompareReport:
    return compare([s.loaded for s in sessions], sessions=sessions, **options)


# --- the bundled pair: PyTorch (NCHW) against JAX/Flax via jax2onnx (NHWC) -------------------


@pytest.fixture(scope="module")
def pair() -> tuple[tuple[Session, ...], CompareReport]:
    sessions = open_models([TORCH, JAX])
    return sessions, _run(sessions)


def test_bundled_pair_every_tensor_paired(pair: tuple[tuple[Session, ...], CompareReport]) -> None:
    sessions, report = pair
    (c,) = report.comparisons
    assert c.aligned
    assert not c.unmatched_a and not c.unmatched_b
    assert len(c.pairs) == len(sessions[0].tensors) == len(sessions[1].tensors) == 8
    assert {p.a.name for p in c.pairs if p.kind is Kind.WEIGHT} == {
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "fc2.weight",
    }
    assert sum(p.kind is Kind.ACTIVATION for p in c.pairs) == 4
    _check_pairs_by_value(report, sessions)


def test_bundled_pair_traces_agree_within_one_percent(pair: tuple[tuple[Session, ...], CompareReport]) -> None:
    _, report = pair
    (c,) = report.comparisons
    for p in c.pairs:
        assert p.a.ef_trace > 0
        assert abs(p.b.ef_trace / p.a.ef_trace - 1) < 0.01, (p.a.name, p.b.name, p.a.ef_trace, p.b.ef_trace)
        assert p.b.max - p.b.min == pytest.approx(p.a.max - p.a.min, rel=1e-5)
    assert not c.flagged
    assert c.rank.spearman == pytest.approx(1.0)
    a, b = report.models
    for (wa, aa, fa), (wb, ab, fb) in zip(a.report.uniform, b.report.uniform, strict=True):
        assert (wa, aa) == (wb, ab)
        assert fb == pytest.approx(fa, rel=0.01)


# --- small models: what the alignment must see through ----------------------------------------


def test_gemm_against_matmul_add_with_misleading_names() -> None:
    w1, w2 = RNG.standard_normal((10, 12)) * 0.3, RNG.standard_normal((4, 10)) * 0.3
    x = RNG.standard_normal((24, 12)).astype(np.float32)
    y = RNG.integers(0, 4, 24)
    a = open_model(gemm_mlp([w1, w2], ["fc1.weight", "fc2.weight"]), Dataset({"x": x}, y))
    # B names its first layer like A's second: names must not drive the pairing.
    b = open_model(matmul_mlp([w1, w2], ["fc2.weight", "fc1.weight"]), Dataset({"input_1": x}, y))
    report = _run([a, b])
    (c,) = report.comparisons
    assert c.aligned
    assert {(p.a.name, p.b.name) for p in c.pairs} == {
        ("fc1.weight", "fc2.weight"),
        ("fc2.weight", "fc1.weight"),
        ("x", "input_1"),
        ("h0", "act0"),
    }
    for p in c.pairs:
        assert p.b.ef_trace == pytest.approx(p.a.ef_trace, rel=1e-4)
    _check_pairs_by_value(report, [a, b])


def test_aligner_pairs_gemm_with_matmul_on_the_raw_graphs() -> None:
    # prepare's onnxruntime pass fuses MatMul+Add into Gemm; the aligner must not rely on that
    w1, w2 = RNG.standard_normal((10, 12)), RNG.standard_normal((4, 10))
    ma, mb = gemm_mlp([w1, w2], ["fc1.weight", "fc2.weight"]), matmul_mlp([w1, w2], ["k2", "k1"])
    al = align(ma, find_quantizable(ma), mb, find_quantizable(mb))
    assert al.complete
    assert {(m.a, m.b) for m in al.pairs} == {
        ("fc1.weight", "k2"),
        ("fc2.weight", "k1"),
        ("x", "input_1"),
        ("h0", "act0"),
    }
    assert [(o.op_type, o.family) for o in al.ops_b] == [("MatMul", "linear"), ("MatMul", "linear")]


def test_nchw_against_nhwc_with_transposes() -> None:
    w, fc = RNG.standard_normal((4, 2, 3, 3)) * 0.4, RNG.standard_normal((5, 144)) * 0.1
    ma, mb = conv_nchw(w, fc), conv_nhwc(w, fc)
    x = RNG.standard_normal((16, 2, 6, 6)).astype(np.float32)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y = RNG.integers(0, 5, 16)
    # the two graphs compute the same function, each fed in its own layout
    (la,) = make_session(ma.SerializeToString()).run(["logits"], {"x": x})
    (lb,) = make_session(mb.SerializeToString()).run(["logits"], {"img": x_nhwc})
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-5)
    a = open_model(ma, Dataset({"x": x}, y))
    b = open_model(mb, Dataset({"img": x_nhwc}, y))
    report = _run([a, b])
    (c,) = report.comparisons
    assert c.aligned and len(c.pairs) == 4
    acts = {(p.a.name, p.b.name) for p in c.pairs if p.kind is Kind.ACTIVATION}
    assert acts == {("x", "img_nchw"), ("f", "flat")}
    for p in c.pairs:
        assert p.b.ef_trace == pytest.approx(p.a.ef_trace, rel=1e-4), (p.a.name, p.b.name)
    _check_pairs_by_value(report, [a, b])


def test_unfolded_against_folded_batchnorm() -> None:
    w, fc = RNG.standard_normal((4, 2, 3, 3)) * 0.4, RNG.standard_normal((5, 144)) * 0.1
    gamma, beta = RNG.uniform(0.5, 1.5, 4), RNG.standard_normal(4) * 0.1
    mean, var = RNG.standard_normal(4) * 0.1, RNG.uniform(0.5, 2.0, 4)
    tail = [
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    io = ([_io("x", ["N", 2, 6, 6])], [_io("logits", ["N", 5])])
    conv_bn = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-5),
    ]
    ma = _model(conv_bn + tail, *io, {"w": w, "gamma": gamma, "beta": beta, "mean": mean, "var": var, "fc": fc})
    scale = gamma / np.sqrt(var + 1e-5)
    folded = {"w_folded": w * scale[:, None, None, None], "b_folded": beta - mean * scale, "fc": fc}
    mb = _model(
        [helper.make_node("Conv", ["x", "w_folded", "b_folded"], ["bn"], pads=[1, 1, 1, 1]), *tail], *io, folded
    )
    x = RNG.standard_normal((16, 2, 6, 6)).astype(np.float32)
    data = Dataset({"x": x}, RNG.integers(0, 5, 16))
    a, b = open_model(ma, data), open_model(mb, data)
    report = _run([a, b])
    (c,) = report.comparisons
    assert c.aligned and len(c.pairs) == 4 and not c.flagged
    conv = next(p for p in c.pairs if p.kind is Kind.WEIGHT and p.b.name == "w_folded")
    # the weight that matters is the folded one: same range on both sides
    assert conv.a.min == pytest.approx(float((w * scale[:, None, None, None]).min()), rel=1e-5)
    _check_pairs_by_value(report, [a, b])


def test_a_real_difference_is_named() -> None:
    w1, w2 = RNG.standard_normal((10, 12)) * 0.3, RNG.standard_normal((4, 10)) * 0.3
    x = RNG.standard_normal((16, 12)).astype(np.float32)
    data = Dataset({"x": x}, RNG.integers(0, 4, 16))
    a = open_model(gemm_mlp([w1, w2], ["fc1", "fc2"]), data)
    b = open_model(gemm_mlp([w1, 2 * w2], ["fc1", "fc2"]), data)  # not the same function
    report = _run([a, b])
    (c,) = report.comparisons
    assert c.aligned
    fc2 = next(p for p in c.pairs if p.a.name == "fc2")
    assert any(n.startswith("range +100.0%") for n in fc2.notes)
    assert fc2 in c.flagged
    fc1 = next(p for p in c.pairs if p.a.name == "fc1")
    assert not any(n.startswith("range") for n in fc1.notes)
    assert "differ by more than 1%" in format_table(report)


def test_extra_layer_is_left_unmatched_not_forced() -> None:
    w1, w3 = RNG.standard_normal((10, 12)) * 0.3, RNG.standard_normal((4, 10)) * 0.3
    w2 = RNG.standard_normal((10, 10)) * 0.3
    x = RNG.standard_normal((16, 12)).astype(np.float32)
    y = RNG.integers(0, 4, 16)
    a = open_model(gemm_mlp([w1, w3], ["a1", "a3"]), Dataset({"x": x}, y))
    b = open_model(gemm_mlp([w1, w2, w3], ["b1", "b2", "b3"]), Dataset({"x": x}, y))
    report = _run([a, b])
    (c,) = report.comparisons
    assert not c.aligned
    assert {(p.a.name, p.b.name) for p in c.pairs} == {("a1", "b1"), ("a3", "b3"), ("x", "x"), ("h0", "h1")}
    assert not c.unmatched_a
    assert {u.tensor.name for u in c.unmatched_b} == {"b2", "h0"}
    assert all("has no counterpart" in u.reason for u in c.unmatched_b)
    text = format_table(report)
    assert "unmatched in B" in text and "b2" in text
    # the first layer computes the same thing in both models; the last one reads a different input
    first = next(p for p in c.pairs if p.a.name == "a1")
    assert first.b.min == first.a.min and first.b.max == first.a.max


def test_different_architectures_give_a_summary() -> None:
    x = RNG.standard_normal((16, 12)).astype(np.float32)
    y = RNG.integers(0, 4, 16)
    wa = [RNG.standard_normal((10, 12)) * 0.3, RNG.standard_normal((4, 10)) * 0.3]
    wb = [RNG.standard_normal((6, 12)) * 0.3, RNG.standard_normal((4, 6)) * 0.3]
    a = open_model(gemm_mlp(wa, ["l1", "l2"]), Dataset({"x": x}, y))
    b = open_model(gemm_mlp(wb, ["m1", "m2"]), Dataset({"x": x}, y))
    report = _run([a, b], weight_bits=(2, 4, 8), activation_bits=(8,))
    (c,) = report.comparisons
    assert not c.aligned
    assert {u.tensor.name for u in c.unmatched_a} >= {"l1", "l2"}
    assert {u.tensor.name for u in c.unmatched_b} >= {"m1", "m2"}
    for m, weights in zip(report.models, (wa, wb), strict=True):
        params = sum(w.size for w in weights)
        assert m.weight_params == params
        tensors = m.report.tensors
        act8 = sum(t.fit[8] for t in tensors if t.kind is Kind.ACTIVATION)
        w_fit = {b: sum(t.fit[b] for t in tensors if t.kind is Kind.WEIGHT) for b in (2, 8)}
        # the front runs from every weight at 2 bits to every weight at 8 bits
        assert m.front[0] == (-(-params * 2 // 8), pytest.approx(w_fit[2] + act8))
        # the ε-approximate front may drop the all-8-bit point for one within a factor 1 + ε of it
        assert m.front[-1][0] <= params and m.front[-1][1] <= 1.01 * (w_fit[8] + act8)
        sizes = [s for s, _ in m.front]
        fits = [f for _, f in m.front]
        assert sizes == sorted(sizes) and fits == sorted(fits, reverse=True)
    data = to_dict(report)
    assert data["comparisons"][0]["aligned"] is False
    assert {u["name"] for u in data["unmatched"][report.models[1].label]} >= {"m1", "m2"}
    assert "summary" in format_table(report)


def test_more_than_two_models_compare_each_with_the_first() -> None:
    w1, w2 = RNG.standard_normal((10, 12)) * 0.3, RNG.standard_normal((4, 10)) * 0.3
    x = RNG.standard_normal((8, 12)).astype(np.float32)
    y = RNG.integers(0, 4, 8)
    sessions = [
        open_model(gemm_mlp([w1, w2], ["p", "q"]), Dataset({"x": x}, y)),
        open_model(matmul_mlp([w1, w2], ["r", "s"]), Dataset({"input_1": x}, y)),
        open_model(gemm_mlp([w1, w2], ["t", "u"]), Dataset({"x": x}, y)),
    ]
    report = _run(sessions)
    assert [(c.a, c.b) for c in report.comparisons] == [(0, 1), (0, 2)]
    assert all(c.aligned for c in report.comparisons)
    assert "C against A" in format_table(report)


# --- pieces -----------------------------------------------------------------------------------


def test_spearman_against_hand_computed_values() -> None:
    # no ties: 1 − 6Σd²/(n(n²−1)); ranks of b are 2,1,4,3,5 → Σd² = 4
    a, b = np.array([1.0, 2, 3, 4, 5]), np.array([20.0, 10, 40, 30, 50])
    assert spearman(a, b) == pytest.approx(1 - 6 * 4 / (5 * 24))
    # ties get average ranks: x ranks 1, 2.5, 2.5, 4 against 1..4 → 4.5 / sqrt(4.5 · 5)
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(4.5 / np.sqrt(22.5))


@pytest.mark.parametrize(
    ("size", "stride", "mode", "pads"),
    [(5, 2, "SAME_UPPER", [1, 1, 1, 1]), (6, 2, "SAME_UPPER", [0, 0, 1, 1]), (6, 2, "SAME_LOWER", [1, 1, 0, 0])],
)
def test_same_padding_becomes_explicit_pads(size: int, stride: int, mode: str, pads: list[int]) -> None:
    # ONNX spec: out = ceil(in / stride), total = (out − 1)·stride + k − in, the odd pixel at the end for UPPER
    w = RNG.standard_normal((2, 1, 3, 3))
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=mode, strides=[stride, stride])
    model = _model([node], [_io("x", [1, 1, size, size])], [_io("y", [1, 2, "h", "w"])], {"w": w})
    out, changes = explicit_conv_pads(model)
    (conv,) = out.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert "auto_pad" not in attrs and attrs["pads"] == pads and len(changes) == 1
    assert any(a.name == "auto_pad" for a in model.graph.node[0].attribute)  # input left untouched
    x = RNG.standard_normal((1, 1, size, size)).astype(np.float32)
    (ya,) = make_session(model.SerializeToString()).run(["y"], {"x": x})
    (yb,) = make_session(out.SerializeToString()).run(["y"], {"x": x})
    np.testing.assert_allclose(ya, yb, rtol=1e-6)


def test_data_count_must_be_one_or_one_per_model() -> None:
    with pytest.raises(FitonnxError, match="expected 1 or 2 --data values"):
        open_models([TORCH, JAX], [PAIR / "cnn_torch.calib.npz"] * 3)
    with pytest.raises(FitonnxError, match="expected at least 2 models"):
        open_models([TORCH])


# --- CLI --------------------------------------------------------------------------------------


def test_cli_json_on_the_bundled_pair(tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    args = ["compare", str(TORCH), str(JAX), "--data", str(PAIR / "cnn_torch.calib.npz")]
    args += ["--data", str(PAIR / "cnn_jax.calib.npz"), "--max-samples", "16", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "B against A: 8 pairs" in result.output
    data = json.loads(out.read_text())
    assert len(data["pairs"]) == 8
    assert {p["kind"] for p in data["pairs"]} == {"weight", "activation"}
    assert data["unmatched"] == {"cnn_torch.onnx": [], "cnn_jax.onnx": []}
    fc1 = next(p for p in data["pairs"] if p["a"] == "fc1.weight")
    assert fc1["a_score"]["shape"] == [64, 784] and fc1["b_score"]["shape"] == [784, 64]
    assert data["models"][0]["samples"] == 16
    assert data["rank_agreement"][0]["pairs"] == 8


def test_cli_rejects_a_wrong_number_of_data_files(tmp_path: Path) -> None:
    calib = str(PAIR / "cnn_torch.calib.npz")
    result = CliRunner().invoke(cli, ["compare", str(TORCH), str(JAX), *["--data", calib] * 3])
    assert result.exit_code == 2
    assert "expected 1 or 2 --data values; found 3" in result.output


def test_cli_plot_and_graceful_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "fronts.png"
    base = ["compare", str(TORCH), str(JAX), "--max-samples", "4", "--plot"]
    result = CliRunner().invoke(cli, [*base, str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    missing = tmp_path / "none.png"
    result = CliRunner().invoke(cli, [*base, str(missing)])
    assert result.exit_code == 0, result.output
    assert "matplotlib is not installed" in result.output and not missing.exists()
