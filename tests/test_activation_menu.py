"""recommend --formats over the target's ACTIVATION menu: per-tensor formats and TensorRT's dynamic
MX/NVFP4 blocks, FIT from the score's in-graph statistics (integer grids: the range model), an exact
allocation under --act-avg-bits, and exports that write the chosen formats.

References are independent of the code under test: the integer range model and the storage costs
by hand, the allocation by brute force over every combination, the MX quantize-dequantize in numpy
and ml_dtypes (OCP MX v1.0: shared exponent ⌊log2 amax⌋ − 8 for E4M3, at least −127), the export's
KL against validate's simulation of the same configuration (onnxruntime's blocked QuantizeLinear
against fitonnx's float arithmetic).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.allocate import recommendation
from fitonnx.allocate.formats_alloc import FormatOptions
from fitonnx.allocate.knapsack import budget_from
from fitonnx.allocate.targets import get_target
from fitonnx.analysis import simulate
from fitonnx.cli.main import cli
from fitonnx.export import export_recommendation
from fitonnx.formats import parse_format
from fitonnx.formats.block_nodes import block_layout, dynamic_qdq_nodes
from fitonnx.model import graph
from fitonnx.model.data import load_npz

from .conftest import MODELS

CNN = MODELS / "mnist_cnn.onnx"
MENU = ("int8", "fp8e4m3", "fp16", "mxfp8/32", "nvfp4/16")


def mlp(tmp_path: Path) -> tuple[Path, Path]:
    """x[N,64] → MatMul 64×64 → Relu → MatMul 64×32 → Relu → Gemm → logits[N,10], and 48 samples:
    every activation is a rank-2 GEMM input whose K divides into blocks of 16 and 32."""
    rng = np.random.default_rng(3)
    shapes = {"w1": (64, 64), "w2": (64, 32), "w3": (10, 32)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.25, s).astype(np.float32), n) for n, s in shapes.items()]
    mk = helper.make_node
    nodes = [
        mk("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        mk("Relu", ["h1"], ["r1"], name="relu1"),
        mk("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
        mk("Relu", ["h2"], ["r2"], name="relu2"),
        mk("Gemm", ["r2", "w3"], ["logits"], name="fc", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path, data = tmp_path / "mlp.onnx", tmp_path / "mlp.npz"
    onnx.save(model, path)
    x = rng.normal(size=(48, 64)) * np.exp(rng.normal(0, 1.5, size=(48, 1)))
    np.savez(data, x=x.astype(np.float32))
    return path, data


def recommend(path: Path, data: Path, **options: object) -> api.RecommendResult:
    choices = FormatOptions("tensorrt", weight_formats=("int8/ch",), **options)  # type: ignore[arg-type]
    return api.recommend(path, data, budget=budget_from(avg_bits=9), choices=choices)


def hand_bits(fmt: str, numel: int) -> int:
    """Storage bits of one sample of an activation: elements, and a block format's scales (NVFP4: e4m3
    per 16 elements and one float32 per tensor; MX: e8m0 per 32)."""
    per_tensor = {"int8": 8, "fp8e4m3": 8, "fp16": 16}
    if fmt in per_tensor:
        return per_tensor[fmt] * numel
    if fmt == "mxfp8/32":
        return 8 * numel + 8 * (numel // 32)
    assert fmt == "nvfp4/16"
    return 4 * numel + 8 * (numel // 16) + 32


def test_tensorrt_blocks_only_gemm_inputs_of_rank_2_or_3_in_whole_blocks() -> None:
    dyn = get_target("tensorrt").format_menu().dynamic
    assert dyn is not None and set(dyn.formats) == {"mxfp8/32", "nvfp4/16"}
    assert dyn.admits(frozenset({"MatMul"}), (1, 8, 64), 2, 32)
    assert dyn.admits(frozenset({"Gemm"}), (1, 784), 1, 16)
    assert not dyn.admits(frozenset({"Gemm"}), (1, 784), 1, 32)  # 784 = 24.5 blocks of 32
    assert not dyn.admits(frozenset({"Conv"}), (1, 64, 8, 8), 1, 32)
    assert not dyn.admits(frozenset({"MatMul"}), (1, 2, 8, 64), 3, 32)  # rank 4: attention heads
    assert not dyn.admits(frozenset({"MatMul", "Add"}), (1, 64), 1, 32)  # a residual reads it in float
    assert get_target("qnn").format_menu().dynamic is None and get_target("ort").format_menu().dynamic is None


@pytest.fixture(scope="module")
def menu_rec(tmp_path_factory: pytest.TempPathFactory) -> tuple[api.RecommendResult, api.RecommendResult]:
    path, data = mlp(tmp_path_factory.mktemp("mlp"))
    return recommend(path, data, act_format=MENU, act_avg_bits=6.5), recommend(path, data)


def test_activation_fit_is_the_in_graph_statistic_and_integers_the_range_model(menu_rec) -> None:
    result, _ = menu_rec
    rec = result.allocation.recommendation
    acts = {t.name: t for t in result.report.tensors if t.kind.value == "activation"}
    assert set(acts) == {"x", "r1", "r2"} and set(rec.activation_formats) == set(acts)
    for name, t in acts.items():
        fits = rec.fit_per_format[name]
        assert set(fits) == set(MENU)
        step = max(abs(t.min), abs(t.max)) / 127  # int8: symmetric, scale max|a|/127
        assert fits["int8"] == pytest.approx(t.ef_trace * step**2 / 12, rel=1e-6)
        for fmt in MENU[1:]:
            assert fits[fmt] == t.formats[fmt].expected  # the per-sample in-graph sum, not a range bound
        assert fits["fp16"] < fits["fp8e4m3"] and fits["fp8e4m3"] < fits["nvfp4/16"]
    for name, fmt in rec.activation_formats.items():
        assert rec.activation_fit_models[name] == ("range" if fmt == "int8" else "in-graph")


def test_act_avg_bits_is_the_exact_optimum_over_the_menu(menu_rec) -> None:
    result, _ = menu_rec
    rec = result.allocation.recommendation
    numel = {t.name: t.numel for t in result.report.tensors if t.name in rec.activation_formats}
    budget = 6.5 * sum(numel.values())
    best = min(
        (sum(rec.fit_per_format[n][f] for n, f in zip(numel, combo, strict=True)), combo)
        for combo in itertools.product(MENU, repeat=len(numel))
        if sum(hand_bits(f, numel[n]) for n, f in zip(numel, combo, strict=True)) <= budget
    )
    chosen = sum(rec.fit_per_format[n][f] for n, f in rec.activation_formats.items())
    assert chosen == pytest.approx(best[0], rel=1e-12)
    assert "nvfp4/16" in rec.activation_formats.values()  # 6.5 bits cannot hold all at 8
    assert result.allocation.activation_fit == pytest.approx(chosen, rel=1e-12)
    assert rec.budget["act_avg_bits"] == 6.5


def test_default_is_one_format_and_no_unused_statistics(menu_rec) -> None:
    weights = [t for t in menu_rec[0].report.tensors if t.kind.value == "weight"]
    assert all(set(t.formats) == {"int8/ch", "int8"} for t in weights)  # activation formats stay on activations
    _, result = menu_rec
    rec = result.allocation.recommendation
    assert set(rec.activation_formats.values()) == {"int8"}
    assert set(rec.activation_fit_models.values()) == {"range"}
    for t in result.report.tensors:
        if t.kind.value == "activation":
            assert set(t.formats) <= {"int8"}  # NVFP4/FP8 weights' formats are not scored on activations
        else:
            assert set(t.formats) == {"int8/ch", "int8"}


def mx_reference(x: np.ndarray, axis: int, block: int = 32) -> np.ndarray:
    """MXFP8 (E4M3) quantize-dequantize in numpy/ml_dtypes, the last block zero-padded."""
    moved = np.moveaxis(x.astype(np.float32), axis, -1)
    d = moved.shape[-1]
    padded = np.concatenate([moved, np.zeros((*moved.shape[:-1], -d % block), np.float32)], axis=-1)
    b = padded.reshape(*moved.shape[:-1], -1, block)
    amax = np.abs(b).max(-1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore"):
        exponent = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 8, -127)
    scale = np.float32(2.0) ** np.maximum(exponent, -127).astype(np.float32)
    v = np.clip(b / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    return np.moveaxis(v.reshape(padded.shape)[..., :d], -1, axis)


@pytest.mark.parametrize(("shape", "axis"), [((3, 70), 1), ((2, 5, 64), 2), ((2, 64, 5), 1)])
def test_dynamic_mx_qdq_equals_numpy_bit_for_bit(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, shape))).astype(np.float32)
    x.flat[:6] = [0.0, -0.0, 1e-40, 3e38, -2e-38, 448.0]  # zeros, subnormal, near-max, tiny, exact
    nodes, inits = dynamic_qdq_nodes("x", "p_", parse_format("mxfp8/32"), block_layout(shape, axis, 32), 21)
    assert {n.op_type for n in nodes} >= {"QuantizeLinear", "DequantizeLinear"}
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("p_out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (y,) = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    assert np.array_equal(y, mx_reference(x, axis))


def session(path: Path, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kl(p: np.ndarray, q: np.ndarray) -> float:
    lp = p.astype(np.float64) - np.log(np.exp(p.astype(np.float64)).sum(-1, keepdims=True))
    lq = q.astype(np.float64) - np.log(np.exp(q.astype(np.float64)).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


@pytest.fixture(scope="module")
def cnn_rec() -> recommendation.Recommendation:
    choices = FormatOptions("tensorrt", weight_formats=("int8/ch", "fp8e4m3"))
    calib = MODELS / "mnist_cnn.calib.npz"
    return api.recommend(CNN, calib, budget=budget_from(avg_bits=8.03), choices=choices).allocation.recommendation


def test_tensorrt_export_of_mx_and_fp8_activations_matches_the_simulation(cnn_rec, tmp_path: Path) -> None:
    acts = {"/relu_2/Relu_output_0": "mxfp8/32", "/flatten/Flatten_output_0": "fp8e4m3", "input": "int8"}
    rec = dataclasses.replace(cnn_rec, activation_formats=acts)
    heldout = load_npz(MODELS / "mnist_cnn.heldout.npz")
    path = export_recommendation(CNN, rec, "tensorrt", tmp_path / "m.onnx", data=heldout).path
    written = onnx.load(path)
    assert max(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 21
    blocked = [n for n in written.graph.node if n.op_type == "QuantizeLinear" and n.name == ""]
    attrs = {a.name: helper.get_attribute_value(a) for a in blocked[0].attribute}
    assert len(blocked) == 1 and attrs == {"axis": 2, "block_size": 32, "output_dtype": TensorProto.FLOAT8E4M3FN}
    x = heldout.arrays["input"]
    exported = session(path, optimize=False).run(None, {"input": x})[0]
    session(path, optimize=True).run(None, {"input": x[:2]})  # and it runs optimized
    floating = session(CNN, optimize=True).run(None, {"input": x})[0]
    s = api.open_model(CNN, MODELS / "mnist_cnn.calib.npz")  # validate's simulation runs on the prepared model
    by_name = {t.name: t for t in s.tensors}
    tensors = [by_name[n] for n in (*rec.weight_formats, *acts)]
    specs = graph.input_specs(onnx.load(CNN))
    sim = simulate.build(s.prepared.model, tensors, "logits", specs, block_formats=[parse_format("mxfp8/32")])
    simulator = simulate.Simulator(sim, s.prepared.model, tensors, rec.ranges, simulate.GridScheme(), heldout, specs)
    simulated = simulator.run(simulate.Config(dict(rec.weight_formats), acts))
    assert kl(floating, exported) > 0
    assert kl(floating, exported) == pytest.approx(kl(floating, simulated), rel=1e-3)


@pytest.mark.skipif(
    tuple(int(v) for v in ort.__version__.split(".")[:2]) < (1, 20),
    reason="onnxruntime 1.19 loads up to opset 21 / IR 10 (FP4 needs 23)",
)
def test_nvfp4_activations_are_written_as_fp4_qdq(cnn_rec, tmp_path: Path) -> None:
    rec = dataclasses.replace(cnn_rec, activation_formats={"/relu_2/Relu_output_0": "nvfp4/16"})
    result = export_recommendation(
        CNN, rec, "tensorrt", tmp_path / "m.onnx", data=load_npz(CNN.with_suffix(".calib.npz"))
    )
    written = onnx.load(result.path)
    assert max(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 23
    fp4 = [
        n
        for n in written.graph.node
        if n.op_type == "QuantizeLinear"
        and any(a.name == "output_dtype" and a.i == TensorProto.FLOAT4E2M1 for a in n.attribute)
    ]
    assert len(fp4) == 1 and any("FP4 activations' blocks in float arithmetic" in note for note in result.notes)


def test_bit_width_writers_refuse_floating_activation_formats(cnn_rec, tmp_path: Path) -> None:
    rec = dataclasses.replace(cnn_rec, activation_formats={"/relu_2/Relu_output_0": "mxfp8/32"})
    recommendation.save(rec, tmp_path / "rec.json")
    args = ["export", str(CNN), "--recommendation", str(tmp_path / "rec.json"), "--format", "qnn"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "m.encodings")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "expected per-tensor integer activation formats for the QNN export; found mxfp8/32" in result.output


def test_cli_allocates_activation_formats_and_says_where_their_fit_comes_from(tmp_path: Path) -> None:
    path, data = mlp(tmp_path)
    args = ["recommend", str(path), "--data", str(data), "--avg-bits", "9", "--target", "tensorrt", "--formats"]
    args += ["--act-format", "int8,mxfp8/32", "--act-avg-bits", "8.2", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "out" / "recommendation.json").read_text())
    assert set(rec["activation_formats"].values()) <= {"int8", "mxfp8/32"}
    assert "activation FIT:" in result.output
    # 8.2 bits hold mxfp8/32 (8.25) on at most 128 of the 160 elements (x 64, r1 64, r2 32)
    mx = sum(64 if n != "r2" else 32 for n, f in rec["activation_formats"].items() if f == "mxfp8/32")
    assert mx * 8.25 + (160 - mx) * 8 <= 8.2 * 160 + 1e-9
    assert math.isfinite(rec["fit"]) and (tmp_path / "out" / "mlp.trt.qdq.onnx").is_file()
