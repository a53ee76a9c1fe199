"""Activation block formats (MX e8m0 / NVFP4 scales computed per sample from each block's own max):
the in-graph statistics against numpy over the dumped per-sample activations and gradients, and the
graph's dynamic quantize-dequantize against onnxruntime's blocked QuantizeLinear→DequantizeLinear
(ml_dtypes for fp4, which onnxruntime has no kernel for), bit for bit.

The references use numpy and ml_dtypes only (no ``fitonnx.formats``): the OCP MX v1.0 shared exponent
⌊log2 amax⌋ − emax_element (at least −127), ModelOpt's NVFP4 scales e4m3(amax/6/s)·s with s the
calibrated max|a|/(6·448), zero padding of the last block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.analysis import simulate
from fitonnx.fisher import engine, instrument
from fitonnx.fisher.losses import PREFIX
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.statistics import activation_absmax
from fitonnx.formats import parse_format
from fitonnx.formats.block_nodes import block_layout, block_qdq_nodes
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind
from fitonnx.model.runtime import make_session
from fitonnx.score.formats_fit import activation_axis, format_fits, plan_statistics

CNN = Path(__file__).resolve().parent.parent / "models" / "mnist_cnn.onnx"
RTOL = 1e-6
BLOCK_FORMATS = ("mxfp8/32", "mxfp4/32", "nvfp4/16")
ELEMENTS = {"mxfp8": ml_dtypes.float8_e4m3fn, "mxfp4": ml_dtypes.float4_e2m1fn, "nvfp4": ml_dtypes.float4_e2m1fn}


def _attention() -> onnx.ModelProto:
    """x[1,4,48] → q, k, v (MatMul), q·kᵀ, Softmax, ·v, mean over tokens, Gemm: activations read as a
    MatMul's first input (K last), as its second (K = axis −2: kᵀ and v) and as a Gemm's A."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (48, 40)).astype(np.float32), n) for n in ("wq", "wk")]
    inits += [numpy_helper.from_array(rng.normal(0, 0.3, (48, 24)).astype(np.float32), "wv")]
    inits += [numpy_helper.from_array(rng.normal(0, 0.3, (10, 24)).astype(np.float32), "w2")]
    mk = helper.make_node
    nodes = [
        mk("MatMul", ["x", "wq"], ["q"]),
        mk("MatMul", ["x", "wk"], ["k"]),
        mk("MatMul", ["x", "wv"], ["v"]),
        mk("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        mk("MatMul", ["q", "kt"], ["s"]),
        mk("Softmax", ["s"], ["att"], axis=-1),
        mk("MatMul", ["att", "v"], ["o"]),
        mk("ReduceMean", ["o"], ["m"], axes=[1], keepdims=0),
        mk("Gemm", ["m", "w2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 48])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _mx_scale(amax: np.ndarray, top: float) -> np.ndarray:
    """OCP MX: 2^(⌊log2 amax⌋ − ⌊log2 max_element⌋), the exponent at least −127 (amax 0 included)."""
    _, e = np.frexp(amax.astype(np.float64))
    shared = np.where(amax == 0, -127, e - 1 - int(np.floor(np.log2(top))))
    return np.ldexp(1.0, np.maximum(shared, -127)).astype(np.float32)


def _nv_scale(amax: np.ndarray, calibrated: float) -> np.ndarray:
    """ModelOpt NVFP4: s = max|a|/(6·448); block e4m3(amax/6/s) (1 for an all-zero block, ≤ 448, the
    smallest e4m3 subnormal where it rounds to 0), times s."""
    s = np.float32(np.float32(calibrated) / np.float32(2688.0))
    with np.errstate(over="ignore"):  # float32 extremes: clamped at 448 next
        block = (amax.astype(np.float32) / np.float32(6.0)) / s
    block = np.minimum(np.where(amax == 0, np.float32(1.0), block), np.float32(448.0)).astype(ml_dtypes.float8_e4m3fn)
    block = block.astype(np.float32)
    return (np.where(block == 0, np.float32(2.0**-9), block) * s).astype(np.float32)


def _blocks(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``a`` with ``axis`` last, zero-padded to whole blocks, as rows of ``size``."""
    moved = np.moveaxis(a, axis, -1)
    pad = -moved.shape[-1] % size
    return np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)]).reshape(-1, size)


def _reference(fmt_name: str, a: np.ndarray, g2: np.ndarray, axis: int, calibrated: float) -> tuple[float, float]:
    """(Σ g²·E[δ²], Σ g²·(Q(a) − a)²) of one sample, in numpy."""
    kind, size = fmt_name.split("/")
    dtype = ELEMENTS[kind]
    info = ml_dtypes.finfo(dtype)
    top, mant, emin = float(info.max), int(info.nmant), int(info.minexp)
    ab, gb = _blocks(a.astype(np.float32), axis, int(size)), _blocks(g2, axis, int(size))
    amax = np.abs(ab).max(axis=1, keepdims=True)
    scale = _mx_scale(amax, top) if kind.startswith("mx") else _nv_scale(amax, calibrated)
    v = ab / scale
    x = np.abs(v.astype(np.float64))
    _, e = np.frexp(x)
    binade = np.maximum(np.where(x == 0, emin, e - 1), emin)
    units = np.where(x > top, (x - top) ** 2, np.ldexp(1.0, 2 * (binade - mant)) / 12.0)
    noise = units * scale.astype(np.float64) ** 2
    q = np.clip(v, -top, top).astype(dtype).astype(np.float32) * scale
    err = q.astype(np.float64) - ab.astype(np.float64)
    return float(np.sum(gb * noise)), float(np.sum(gb * err**2))


def _one_sample_sessions(s, count: int):
    for i in range(count):
        arrays = {k: v[i : i + 1] for k, v in s.data.arrays.items()}
        labels = None if s.data.labels is None else s.data.labels[i : i + 1]
        yield dataclasses.replace(s, data=Dataset(arrays, labels, s.data.source))


@pytest.mark.parametrize("source", ["cnn", "attention"])
def test_block_statistics_equal_numpy_over_the_dumped_samples(source: str) -> None:
    samples = 3
    rng = np.random.default_rng(4)
    labelled = Dataset(
        {"x": rng.normal(0, 1, (samples, 1, 4, 48)).astype(np.float32)}, rng.integers(0, 10, (samples, 1))
    )
    s = api.open_model(CNN) if source == "cnn" else api.open_model(_attention(), labelled)
    acts = [t for t in s.tensors if t.kind is Kind.ACTIVATION]
    feeds = [{k: v for k, v in s.data.sample(i, s.specs).items() if k in s.specs} for i in range(samples)]
    probe, names = instrument.build_probe(s.prepared.model, acts, None)
    values = [engine.probe_values(probe, names, feed) for feed in feeds]
    absmax = activation_absmax(s.prepared.model, [a.name for a in acts], feeds)
    fmts = [parse_format(f) for f in BLOCK_FORMATS]
    plan = plan_statistics(s.prepared.model, s.tensors, fmts, absmax)
    traces, _, _ = api.fisher_traces(s, FisherOptions(max_samples=samples), statistics=plan)
    fits = format_fits(traces, s.prepared.model, fmts)
    reference: dict[tuple[str, str], list[float]] = {}
    for i, one in enumerate(_one_sample_sessions(s, samples)):
        t, _, _ = api.fisher_traces(one, FisherOptions(max_samples=1), keep_gradients=True)
        for a in acts:
            axis = activation_axis(s.prepared.model, a.name, values[i][a.name].ndim)
            for f in BLOCK_FORMATS:
                ref = _reference(f, values[i][a.name], t.diag[a.name], axis, absmax[a.name])
                acc = reference.setdefault((a.name, f), [0.0, 0.0])
                acc[0] += ref[0] / samples
                acc[1] += ref[1] / samples
    assert len(reference) == len(acts) * len(BLOCK_FORMATS) >= 12
    for (name, f), (expected, measured) in reference.items():
        fit = fits[(name, f)]
        assert fit.expected == pytest.approx(expected, rel=RTOL), (name, f)
        assert fit.measured == pytest.approx(measured, rel=RTOL), (name, f)
        assert expected > 0 and measured > 0


def test_a_plan_without_activation_shapes_gives_the_same_statistics() -> None:
    """Where shape inference leaves an activation's shape unknown (a real SVTR does), the plan still
    blocks MatMul inputs along K (counted from the end) and the sums are those of a plan with shapes."""
    rng = np.random.default_rng(6)
    data = Dataset({"x": rng.normal(0, 1, (2, 1, 4, 48)).astype(np.float32)}, rng.integers(0, 10, (2, 1)))
    s = api.open_model(_attention(), data)
    acts = [t.name for t in s.tensors if t.kind is Kind.ACTIVATION]
    feeds = [{k: v for k, v in data.sample(i, s.specs).items() if k in s.specs} for i in range(2)]
    absmax = activation_absmax(s.prepared.model, acts, feeds)
    fmts = [parse_format(f) for f in BLOCK_FORMATS]
    blind = [dataclasses.replace(t, shape=None) if t.kind is Kind.ACTIVATION else t for t in s.tensors]
    with_shapes = plan_statistics(s.prepared.model, s.tensors, fmts, absmax)
    without = plan_statistics(s.prepared.model, blind, fmts, absmax)
    assert {b.key for b in without.blocks} == {b.key for b in with_shapes.blocks} and len(without.blocks) == 18
    one, _, _ = api.fisher_traces(s, FisherOptions(max_samples=2), statistics=with_shapes)
    two, _, _ = api.fisher_traces(s, FisherOptions(max_samples=2), statistics=without)
    assert one.sums is not None and two.sums is not None
    for key, value in one.sums.items():
        assert float(two.sums[key]) == float(value), key


def test_block_axes_follow_the_consumers_reduction() -> None:
    model = _attention()
    axes = {n: activation_axis(model, n) % 3 for n in ("x", "q", "kt", "att", "v")}  # MatMul's count from the end
    assert axes == {"x": 2, "q": 2, "kt": 1, "att": 2, "v": 1}
    assert activation_axis(model, "m", 2) == 1  # Gemm's A without transA
    cnn = onnx.load(CNN)
    assert activation_axis(cnn, "/pool/MaxPool_output_0", 4) == 1  # Conv: the input channels
    residual = onnx.ModelProto()
    residual.CopyFrom(model)
    residual.graph.node.append(helper.make_node("Add", ["q", "q"], ["q2"]))  # a float reader beside the GEMM
    residual.graph.node.append(helper.make_node("Gemm", ["m", "w2"], ["g2"], transA=1))  # m reduced along 2 axes
    assert activation_axis(residual, "q", 3) == -1 and activation_axis(residual, "m", 2) is None


def nasty(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Mixed magnitudes with ±0, float32 subnormals, a block of zeros and float32 extremes planted."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 30.0], size=shape)).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.permutation(flat.size)
    planted = [0.0, -0.0, 1e-40, -1e-42, 1.4e-45, -3e-39, 3.0e38, -3.4e38, 1e20, -7e4, 500.0, -500.0]
    flat[idx[: len(planted)]] = np.array(planted, np.float32)
    x[0, :40] = 0.0
    x[1, :3] = -0.0
    return x


def bits_of(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _graph_qdq(fmt_name: str, x: np.ndarray, axis: int, calibrated: float) -> np.ndarray:
    """The dynamic quantize-dequantize the statistics and the simulation build, run in onnxruntime."""
    fmt = parse_format(fmt_name)
    nodes, inits = block_qdq_nodes("x", "q_", fmt, block_layout(x.shape, axis, fmt.block_size or 1), 17, "ts")
    s = np.float32(np.float32(calibrated) / np.float32(2688.0))
    inits.append(helper.make_tensor("ts", TensorProto.FLOAT, [], [float(s)]))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q_out", TensorProto.FLOAT, list(x.shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return make_session(model.SerializeToString()).run(None, {"x": x})[0]


def _numpy_scales(fmt_name: str, x: np.ndarray, axis: int, calibrated: float) -> np.ndarray:
    """Per block scales in ONNX's blocked layout (the axis's length → ceil(D/B))."""
    kind, size = fmt_name.split("/")
    top = float(ml_dtypes.finfo(ELEMENTS[kind]).max)
    amax = np.abs(_blocks(x, axis, int(size))).max(axis=1)
    moved = np.moveaxis(x, axis, -1).shape
    amax = amax.reshape(*moved[:-1], -1)
    scale = _mx_scale(amax, top) if kind.startswith("mx") else _nv_scale(amax, calibrated)
    return np.moveaxis(scale, -1, axis)


def _ort_blocked_qdq(x: np.ndarray, scale: np.ndarray, axis: int, size: int) -> np.ndarray:
    """onnxruntime's QuantizeLinear→DequantizeLinear to float8 e4m3fn with ``block_size`` (opset 21)."""
    zp = numpy_helper.from_array(np.zeros(scale.shape, ml_dtypes.float8_e4m3fn), "zp")
    zp.data_type = TensorProto.FLOAT8E4M3FN
    sc = numpy_helper.from_array(scale.astype(np.float32), "scale")
    mk = helper.make_node
    nodes = [
        mk("QuantizeLinear", ["x", "scale", "zp"], ["c"], axis=axis, block_size=size, saturate=1),
        mk("DequantizeLinear", ["c", "scale", "zp"], ["y"], axis=axis, block_size=size),
    ]
    graph = helper.make_graph(
        nodes,
        "ort",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [sc, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return make_session(model.SerializeToString()).run(None, {"x": x})[0]


@pytest.mark.parametrize("axis", [0, 1])
def test_mxfp8_dynamic_qdq_equals_onnxruntime_blocked_quantize_linear(axis: int) -> None:
    """70 along axis 1 leaves a short last block; the dynamic scales come from numpy's MX rule."""
    x = nasty((6, 70), seed=axis)
    got = _graph_qdq("mxfp8/32", x, axis, 1.0)
    want = _ort_blocked_qdq(x, _numpy_scales("mxfp8/32", x, axis, 1.0), axis, 32)
    differ = np.flatnonzero(bits_of(got) != bits_of(want))
    assert differ.size == 0, list(
        zip(x.ravel()[differ][:5], got.ravel()[differ][:5], want.ravel()[differ][:5], strict=True)
    )
    assert np.signbit(got[1, :3]).all() and (got[0, :40] == 0).all()


@pytest.mark.parametrize("fmt_name", ["mxfp4/32", "nvfp4/16", "mxfp8/32"])
@pytest.mark.parametrize("axis", [0, 1])
def test_dynamic_qdq_equals_ml_dtypes(fmt_name: str, axis: int) -> None:
    """fp4 has no onnxruntime kernel: ml_dtypes' saturated cast on numpy's scales is the judge. NVFP4's
    tensor scale is calibrated on a narrower range, so some blocks clamp at e4m3's 448 and saturate."""
    x = nasty((6, 70), seed=10 + axis)
    calibrated = 0.25 * float(np.abs(x[np.abs(x) < 1e3]).max())
    want, v = _numpy_qdq(fmt_name, x, axis, calibrated)
    got = _graph_qdq(fmt_name, x, axis, calibrated)
    differ = np.flatnonzero(bits_of(got) != bits_of(want))
    assert differ.size == 0, list(
        zip(x.ravel()[differ][:5], got.ravel()[differ][:5], want.ravel()[differ][:5], strict=True)
    )
    if fmt_name == "nvfp4/16":
        assert np.any(np.abs(v) > 6.0)  # saturation was exercised


def _numpy_qdq(fmt_name: str, x: np.ndarray, axis: int, calibrated: float) -> tuple[np.ndarray, np.ndarray]:
    """(Q(x), x/scale): numpy's scales spread onto the elements, then ml_dtypes' saturated cast."""
    kind, size = fmt_name.split("/")
    top = np.float32(ml_dtypes.finfo(ELEMENTS[kind]).max)
    scale = _numpy_scales(fmt_name, x, axis, calibrated)
    spread = np.take(np.repeat(scale, int(size), axis=axis), np.arange(x.shape[axis]), axis=axis)
    with np.errstate(over="ignore"):
        v = x / spread
    return np.clip(v, -top, top).astype(ELEMENTS[kind]).astype(np.float32) * spread, v


def test_validate_simulates_activation_block_formats() -> None:
    """The simulation's block branch of activation q (blocks of 32/16 along its 40 channels, the last
    one short) gives numpy's dynamic quantize-dequantize of each held-out sample, bit for bit but for
    the sign of zeros (onnxruntime 1.32's Where with a scalar true condition turns −0 into +0)."""
    rng = np.random.default_rng(5)
    data = Dataset({"x": rng.normal(0, 1, (3, 1, 4, 48)).astype(np.float32)}, rng.integers(0, 10, (3, 1)))
    s = api.open_model(_attention(), data)
    i = next(k for k, t in enumerate(t for t in s.tensors if t.kind is Kind.ACTIVATION) if t.name == "q")
    fmts = [parse_format(f) for f in BLOCK_FORMATS]
    sim = simulate.build(s.prepared.model, s.tensors, f"{PREFIX}sim{i}_bout", s.specs, fmts)
    ranges = {t.name: (-3.0, 2.0) for t in s.tensors if t.kind is Kind.ACTIVATION}
    simulator = simulate.Simulator(sim, s.prepared.model, s.tensors, ranges, simulate.GridScheme(), data, s.specs)
    probe, names = instrument.build_probe(s.prepared.model, [t for t in s.tensors if t.name == "q"], None)
    q = np.stack([engine.probe_values(probe, names, data.sample(k, s.specs))["q"] for k in range(3)])
    assert np.array_equal(bits_of(simulator.run(simulate.Config({}, {}))), bits_of(q))
    for f in BLOCK_FORMATS:
        assert simulator.activation_format("q", f).name == f
        got = simulator.run(simulate.Config({}, {"q": f}))
        want = np.stack([_numpy_qdq(f, q[k], 2, 3.0)[0] for k in range(3)])
        zero = want == 0  # onnxruntime's Where, which selects the branch, returns +0 for a chosen −0
        assert np.array_equal(bits_of(got)[~zero], bits_of(want)[~zero]) and np.all(got[zero] == 0), f
        assert not np.array_equal(got, q)


def test_score_names_the_activation_block_columns() -> None:
    report = api.score(CNN, options=FisherOptions(max_samples=4), formats=["mxfp8/32", "nvfp4/16"], weight_bits=(4,))
    acts = [t for t in report.tensors if t.kind is Kind.ACTIVATION]
    assert acts and all(set(t.formats) == {"mxfp8/32", "nvfp4/16"} for t in acts)
    for t in acts:
        fit = t.formats["mxfp8/32"]
        assert fit.expected > 0 and fit.measured is not None and fit.measured > 0
        length = t.shape[fit.axis]  # one e8m0 scale per block, a short last block counting as one
        assert fit.bits == pytest.approx(8 + 8 * -(-length // 32) / length, rel=1e-12), t.name
