"""recommend --formats end to end: targets' menus, exact storage in the budget, and exports that follow the formats.

Each exported model is run in onnxruntime and its KL divergence from the float model compared with
fitonnx's own simulation of the same configuration (``simulate.format_feed``); onnxruntime's
MatMulNBits weights are read back and compared with the format's numpy quantizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.allocate.formats_alloc import FormatOptions
from fitonnx.allocate.knapsack import budget_from
from fitonnx.allocate.recommendation import Recommendation
from fitonnx.allocate.targets import TARGETS, activation_format_fit, get_target
from fitonnx.analysis import simulate
from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError
from fitonnx.export import export_recommendation
from fitonnx.export.common import working_copy
from fitonnx.export.formats_qdq import format_plan
from fitonnx.export.nbits import MatMulNBitsQuantizer, apply_nbits
from fitonnx.formats import FORMATS, get_format, params_from_range, quantize_dequantize
from fitonnx.model import graph
from fitonnx.model.data import Dataset, load_npz
from fitonnx.model.graph import Kind, QuantTensor

from .conftest import MODELS

CNN = MODELS / "mnist_cnn.onnx"
BERT = MODELS / "zoo" / "tiny_bert_dynamo.onnx"
BUDGET = 8.03
needs_nbits = pytest.mark.skipif(MatMulNBitsQuantizer is None, reason="this onnxruntime has no MatMulNBitsQuantizer")


def session(model: onnx.ModelProto | Path, optimize: bool = True) -> ort.InferenceSession:
    """A CPU session; ``optimize=False`` runs the graph as written (no fusions): onnxruntime's fused
    and reordered float kernels change sums in the last bits, which flips a few roundings of the
    next Q/DQ (measured: 1.2% of the CNN's KL), so the model's own Q/DQ semantics are compared unoptimized."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(softmax p || softmax q) over samples, in float64 (independent of fitonnx)."""
    lp = p_logits.astype(np.float64) - np.log(np.exp(p_logits.astype(np.float64)).sum(-1, keepdims=True))
    lq = q_logits.astype(np.float64) - np.log(np.exp(q_logits.astype(np.float64)).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def simulated_logits(model_path: Path, rec: Recommendation, data: Dataset, output: str) -> np.ndarray:
    """fitonnx's simulation of the recommendation's formats on ``data``."""
    model = working_copy(onnx.load(model_path))
    plan = format_plan(model, rec)
    tensors = [QuantTensor(n, Kind.WEIGHT, (), (), None) for n in plan.weights]
    tensors += [QuantTensor(n, Kind.ACTIVATION, (), (), None) for n in plan.activations]
    specs = graph.input_specs(model)
    sim = simulate.build(model, tensors, output, specs)
    simulator = simulate.Simulator(sim, model, tensors, {}, simulate.GridScheme(), data, specs)
    acts = {n: (f, params_from_range(f, *rec.ranges[n])) for n, f in plan.activations.items()}
    return simulator.run_feed(simulate.format_feed(simulator, plan.weights, acts))


# --- targets ------------------------------------------------------------------------------------


def test_every_target_menu_names_registered_formats_for_the_right_ops() -> None:
    for target in TARGETS.values():
        menu = target.format_menu()
        assert {f.name for f in menu.all_weight_formats()} <= set(FORMATS)
        assert all(f.granularity.value == "tensor" for f in menu.activation_formats())
    trt = get_target("tensorrt").format_menu()
    conv = {f.name for f in trt.weight_formats(frozenset({"Conv"}))}
    gemm = {f.name for f in trt.weight_formats(frozenset({"MatMul"}))}
    assert {"int8/ch", "fp8e4m3"} <= conv and not conv & {"int4/b64", "nvfp4/16"}
    assert {"int4/b64", "int4/b128", "nvfp4/16"} <= gemm
    ort_mm = {f.name for f in get_target("ort").format_menu().weight_formats(frozenset({"MatMul"}))}
    assert {"uint4/b32", "uint4/b128", "uint8/b64", "int8/ch"} <= ort_mm
    assert {f.name for f in get_target("qnn").format_menu().activation_formats()} == {"uint8", "uint16"}


def test_activation_format_fit_against_hand_computed_steps() -> None:
    lo, hi, trace = -0.5, 3.0, 2.0
    step = np.float32(3.5 / 255)  # uint8: range widened to hold 0, float32 scale
    assert activation_format_fit(get_format("uint8"), trace, lo, hi) == pytest.approx(trace * float(step) ** 2 / 12)
    assert activation_format_fit(get_format("int8"), trace, lo, hi) == pytest.approx(
        trace * (3.0 / 127) ** 2 / 12, rel=1e-6
    )
    # floating formats have no range model: their FIT is the score's in-graph statistic
    with pytest.raises(FitonnxError, match="the range model is for per-tensor integer"):
        activation_format_fit(get_format("fp8e4m3"), trace, lo, hi)


# --- allocation -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_rec() -> api.RecommendResult:
    # per channel for all would cost 8.05 bits: the budget makes some weights take per-tensor FP8
    options = FormatOptions("tensorrt", weight_formats=("int8/ch", "fp8e4m3"))
    return api.recommend(CNN, MODELS / "mnist_cnn.calib.npz", budget=budget_from(avg_bits=BUDGET), choices=options)


def test_storage_costs_are_exact_and_the_budget_counts_scales(trt_rec: api.RecommendResult) -> None:
    alloc = trt_rec.allocation
    shapes = {t.name: tuple(t.dims) for t in onnx.load(CNN).graph.initializer}
    for item in alloc.front.items:
        shape = shapes[item.name]
        for fmt, size in zip(item.formats, item.sizes, strict=True):
            groups = shape[0] if fmt == "int8/ch" else 1  # Conv/Gemm(transB) output channels are axis 0
            assert size == math.prod(shape) * 8 + groups * 32, (item.name, fmt)
    total = sum(math.prod(shapes[n]) for n in alloc.recommendation.weight_formats)
    assert alloc.chosen.size_bits <= BUDGET * total
    # every weight per channel would cost 8 bits plus its scales: more than the budget allows
    all_channel = sum(it.sizes[it.formats.index("int8/ch")] for it in alloc.front.items)
    assert all_channel > BUDGET * total
    assert set(alloc.recommendation.weight_formats.values()) != {"int8/ch"}
    assert alloc.recommendation.weight_bytes == -(-alloc.chosen.size_bits // 8)


def test_format_options_are_checked_before_any_work() -> None:
    with pytest.raises(FitonnxError, match="expected weight formats among target 'qnn'"):
        FormatOptions("qnn", weight_formats=("fp8e4m3",)).check()
    with pytest.raises(FitonnxError, match="expected activation formats among"):
        FormatOptions("ort", act_format="int8").check()


# --- exports --------------------------------------------------------------------------------------


def test_tensorrt_export_has_channel_scales_and_fp8_and_matches_the_simulation(
    trt_rec: api.RecommendResult, tmp_path: Path
) -> None:
    rec = trt_rec.allocation.recommendation
    assert set(rec.weight_formats.values()) == {"int8/ch", "fp8e4m3"}
    heldout = load_npz(MODELS / "mnist_cnn.heldout.npz")
    path = export_recommendation(CNN, rec, "tensorrt", tmp_path / "m.trt.onnx", data=heldout).path
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    dqs = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for name, fmt in rec.weight_formats.items():
        dq = dqs[f"{name}_quantized"]
        codes, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        want_type = TensorProto.FLOAT8E4M3FN if fmt == "fp8e4m3" else TensorProto.INT8
        assert codes.data_type == want_type, name
        if fmt == "int8/ch":
            assert scale.shape == (codes.dims[0],) and helper.get_attribute_value(dq.attribute[0]) == 0
        else:
            assert scale.shape == ()
    x = heldout.arrays["input"]
    exported = session(path, optimize=False).run(None, {"input": x})[0]
    session(path).run(None, {"input": x[:1]})  # and it runs optimized
    floating = session(CNN).run(None, {"input": x})[0]
    simulated = simulated_logits(CNN, rec, heldout, "logits")
    assert kl(floating, exported) > 0
    assert kl(floating, exported) == pytest.approx(kl(floating, simulated), rel=1e-3)


@needs_nbits
def test_matmulnbits_weights_equal_the_blocked_uint_formats() -> None:
    rng = np.random.default_rng(0)
    k, n = 128, 24
    w = (rng.standard_normal((k, n)) * np.exp(rng.standard_normal((1, n)))).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("MatMul", ["x", "v"], ["z"], name="mm2"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [k, n]) for o in ("y", "z")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w[::-1].copy(), "v")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for name in ("uint4/b32", "uint8/b64"):
        out = apply_nbits(model, {"w": get_format(name)})
        assert [n.op_type for n in out.graph.node] == ["MatMulNBits", "MatMul"]  # only the chosen MatMul
        y, z = session(out).run(None, {"x": np.eye(k, dtype=np.float32)})
        ref = quantize_dequantize(w, get_format(name), axis=0)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * float(np.abs(w).max()))
        np.testing.assert_array_equal(z, w[::-1])


@needs_nbits
def test_ort_export_writes_matmulnbits_for_a_transformer_and_matches_the_simulation(tmp_path: Path) -> None:
    calib = load_npz(BERT.with_suffix(".calib.npz"))
    options = FormatOptions("ort", weight_formats=("int8", "uint4/b32", "uint4/b64", "uint8/b32"))
    result = api.recommend(BERT, calib, budget=budget_from(avg_bits=6), choices=options, out_dir=tmp_path / "out")
    assert result.written is not None
    rec = result.written.recommendation
    assert rec is not None
    blocked = {n for n, f in rec.weight_formats.items() if "/b" in f}
    path = tmp_path / "out" / "tiny_bert_dynamo.qdq.onnx"
    model = onnx.load(path)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and len(nbits) <= len(blocked)
    feed = {k: v for k, v in calib.arrays.items()}
    exported = session(path, optimize=False).run(["logits"], feed)[0]
    session(path).run(["logits"], feed)  # and it runs optimized
    floating = session(BERT).run(["logits"], feed)[0]
    simulated = simulated_logits(BERT, rec, calib, "logits")
    assert kl(floating, exported) > 0
    assert kl(floating, exported) == pytest.approx(kl(floating, simulated), rel=1e-3)


def test_qnn_encodings_are_per_channel_for_channel_formats(tmp_path: Path) -> None:
    code = CliRunner().invoke(
        cli,
        [
            "recommend",
            str(CNN),
            "--avg-bits",
            "6",
            "--target",
            "qnn",
            "--weight-formats",
            "int4/ch,int8/ch,int8",
            "-o",
            str(tmp_path / "q"),
        ],
    )
    assert code.exit_code == 0, code.output
    rec = json.loads((tmp_path / "q" / "recommendation.json").read_text())
    enc = json.loads((tmp_path / "q" / "mnist_cnn.encodings").read_text())["param_encodings"]
    shapes = {t.name: tuple(t.dims) for t in onnx.load(CNN).graph.initializer}
    for name, fmt in rec["weight_formats"].items():
        assert len(enc[name]) == (shapes[name][0] if fmt.endswith("/ch") else 1), name
        assert enc[name][0]["bitwidth"] == int(fmt.removeprefix("int").split("/")[0])
    annotated = onnx.load(tmp_path / "q" / "mnist_cnn.annotated.onnx")
    props = {p.key: p.value for p in annotated.metadata_props}
    assert json.loads(props["fitonnx.formats"]) == {**rec["weight_formats"], **rec["activation_formats"]}


@pytest.mark.skipif(
    tuple(int(v) for v in ort.__version__.split(".")[:2]) < (1, 20),
    reason="onnxruntime 1.19 loads up to opset 21 / IR 10",
)
def test_tensorrt_export_writes_blocked_int4_and_nvfp4_at_their_opsets(tmp_path: Path) -> None:
    rec = Recommendation(
        model="mnist_cnn.onnx",
        target="tensorrt",
        weight_bits={"fc1.weight": 4, "fc2.weight": 4},
        activation_bits={"input": 8},
        fit=0.0,
        weight_bytes=0,
        ranges={"input": (-0.5, 2.8)},
        weight_formats={"fc1.weight": "nvfp4/16", "fc2.weight": "int4/b32"},
        activation_formats={"input": "int8"},
    )
    result = export_recommendation(CNN, rec, "tensorrt", tmp_path / "m.onnx")
    assert any("FLOAT4E2M1" in n for n in result.notes)
    model = onnx.load(result.path)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 23
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["fc1.weight_quantized"].data_type == TensorProto.FLOAT4E2M1
    assert inits["fc1.weight_scale_e4m3"].data_type == TensorProto.FLOAT8E4M3FN
    dq = next(n for n in model.graph.node if n.input and n.input[0] == "fc2.weight_quantized")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert inits["fc2.weight_quantized"].data_type == TensorProto.INT4 and attrs == {"axis": 1, "block_size": 32}
    assert numpy_helper.to_array(inits[dq.input[1]]).shape == (10, 2)  # Gemm transB: blocks of 32 along K = 64
    onnx.checker.check_model(model)


def test_cli_refuses_bit_options_with_formats(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["recommend", str(CNN), "--avg-bits", "6", "--formats", "--weight-bits", "4,8", "-o", str(tmp_path)]
    )
    assert result.exit_code == 2 and "with --formats use --weight-formats" in result.output
    result = CliRunner().invoke(
        cli, ["recommend", str(CNN), "--avg-bits", "6", "--weight-formats", "int3/q", "-o", str(tmp_path)]
    )
    assert result.exit_code == 2 and "expected a format among" in result.output
