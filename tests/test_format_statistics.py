"""FIT per format from the in-graph statistics, checked against numpy written out here.

The references start from what the engine dumps with ``keep_gradients`` (the diagonal Σ_i g_ij²/N,
or one sample's g² when the data is a single sample) and recompute the grids, the floating-point
binades and the quantization errors with numpy and ml_dtypes, without ``fitonnx.formats``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.fisher import engine, instrument
from fitonnx.fisher.engines import ENGINES
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.statistics import NoiseStat, Statistics, activation_absmax, binade_nodes, shared_initializers
from fitonnx.formats import noise_power, parse_format
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind
from fitonnx.model.runtime import make_session
from fitonnx.model.source import RandomData, RandomDataWarning
from fitonnx.scale import Workers
from fitonnx.score.formats_fit import (
    format_axis,
    format_fits,
    noise_root,
    plan_statistics,
    weight_fits,
    weight_format_fits,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "mnist_cnn.onnx"
RTOL = 1e-6
INT_FORMATS = ("int4", "uint8", "int4/ch", "int8/ch", "uint4/ch", "int3/ch")
BLOCK_FORMATS = ("int4/b16", "uint4/b32", "int8/b32")
FLOAT_FORMATS = ("fp8e4m3", "fp8e5m2", "fp8e4m3/ch", "nvfp4/16", "mxfp4/32", "fp16", "bf16")


def _mlp() -> onnx.ModelProto:
    """x[1,64] → MatMul W1[64,96] → Relu → Gemm(transB) W2[10,96]: blocks along K of both."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.normal(0, 0.2, (64, 96)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (10, 96)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(10, np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [w1, w2, b2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _scored(source, data, formats, samples: int, eng: str = "auto"):
    """(session, traces with the format statistics, the diagonal dumped by keep_gradients, fits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomDataWarning)
        s = api.open_model(source, data)
    fmts = [parse_format(f) for f in formats]
    opts = FisherOptions(max_samples=samples, engine=eng)
    plan = plan_statistics(s.prepared.model, s.tensors, fmts, _absmax(s, samples))
    traces, _, _ = api.fisher_traces(s, opts, keep_gradients=True, statistics=plan)
    return s, traces, traces.diag, format_fits(traces, s.prepared.model, fmts)


def _absmax(s, samples: int) -> dict[str, float]:
    acts = [t.name for t in s.tensors if t.kind is Kind.ACTIVATION]
    feeds = [{k: v for k, v in s.data.sample(i, s.specs).items() if k in s.specs} for i in range(samples)]
    return activation_absmax(s.prepared.model, acts, feeds)


def _weights(s) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float32) for t in s.prepared.model.graph.initializer}


def _int_step(w: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Per group (last axis reduced) the float32 step ONNX stores: symmetric max|w|/(2^(b−1)−1), else
    (max − min)/(2^b − 1) over the range widened to hold 0."""
    if symmetric:
        return np.float32(np.abs(w).max(axis=-1) / (2.0 ** (bits - 1) - 1)).astype(np.float64)
    lo, hi = np.minimum(w.min(axis=-1), 0.0), np.maximum(w.max(axis=-1), 0.0)
    return np.float32((hi.astype(np.float64) - lo) / (2.0**bits - 1)).astype(np.float64)


def _groups(a: np.ndarray, axis: int, block: int | None) -> np.ndarray:
    """``a`` as rows of groups: [groups, elements] (per channel along ``axis``, or blocks along it)."""
    moved = np.moveaxis(a, axis, -1)
    if block is None:
        return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    return moved.reshape(-1, block)


@pytest.fixture(scope="module")
def cnn():
    return _scored(CNN, None, INT_FORMATS + FLOAT_FORMATS, 24)


@pytest.fixture(scope="module")
def mlp():
    return _scored(_mlp(), RandomData(12, seed=1), BLOCK_FORMATS + INT_FORMATS + FLOAT_FORMATS, 12)


def _int_reference(fmt_name: str, w: np.ndarray, fisher: np.ndarray, axis: int | None) -> float:
    fmt = parse_format(fmt_name)
    if axis is None:
        return float(fisher.sum() * _int_step(w.reshape(1, -1), fmt.bits, not fmt.asymmetric)[0] ** 2 / 12)
    wg, fg = _groups(w, axis, fmt.block_size), _groups(fisher, axis, fmt.block_size)
    step = _int_step(wg, fmt.bits, not fmt.asymmetric)
    return float(np.sum(fg.sum(axis=1) * step**2) / 12)


@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_integer_grids_per_tensor_channel_and_block_equal_numpy(which, request) -> None:
    s, _, diag, fits = request.getfixturevalue(which)
    weights, checked = _weights(s), 0
    for (name, fmt_name), fit in fits.items():
        fmt = parse_format(fmt_name)
        if not fmt.is_int or name not in weights:
            continue
        assert fit.axis == format_axis(s.prepared.model, name, fmt, weights[name].ndim)
        expected = _int_reference(fmt_name, weights[name], diag[name], fit.axis)
        assert fit.expected == pytest.approx(expected, rel=RTOL), (name, fmt_name)
        checked += 1
    grouped = {f for (n, f) in fits if n in weights and parse_format(f).granularity.value != "tensor"}
    assert checked >= 8 and grouped >= ({"uint4/b32", "int8/b32", "int4/b16"} if which == "mlp" else {"int4/ch"})


def test_blocks_of_a_gemm_and_a_matmul_follow_k(mlp) -> None:
    fits = mlp[3]
    assert fits[("w1", "int4/b16")].axis == 0 and fits[("w2", "int4/b16")].axis == 1
    assert fits[("w1", "int4/ch")].axis == 1 and fits[("w2", "int4/ch")].axis == 0


def _fp_quantize(w: np.ndarray, fmt_name: str, axis: int | None) -> np.ndarray:
    """fp8/fp16 through a float32 scale max|w|/max_element (per tensor or per channel), by ml_dtypes."""
    dtype = {"fp8e4m3": ml_dtypes.float8_e4m3fn, "fp8e5m2": ml_dtypes.float8_e5m2, "fp16": np.float16}
    kind = fmt_name.split("/")[0]
    top = float(ml_dtypes.finfo(dtype[kind]).max)
    if kind == "fp16":
        return w.astype(np.float16).astype(np.float32)
    amax = np.abs(w).max() if axis is None else np.abs(w).max(axis=tuple(k for k in range(w.ndim) if k != axis))
    scale = np.float32(amax / np.float32(top)) if axis is None else (amax / np.float32(top)).astype(np.float32)
    if axis is not None:
        scale = np.expand_dims(scale, tuple(k for k in range(w.ndim) if k != axis))
    v = np.clip(w / scale, -top, top)
    return v.astype(dtype[kind]).astype(np.float32) * scale


@pytest.mark.parametrize("fmt_name", ["fp8e4m3", "fp8e5m2", "fp8e4m3/ch", "fp16"])
def test_fp_weight_fit_is_the_fisher_weighted_measured_error(cnn, fmt_name: str) -> None:
    s, _, diag, fits = cnn
    for name, w in _weights(s).items():
        if (name, fmt_name) not in fits:
            continue
        fit = fits[(name, fmt_name)]
        err = _fp_quantize(w, fmt_name, fit.axis).astype(np.float64) - w.astype(np.float64)
        assert fit.measured == pytest.approx(float(np.sum(diag[name] * err**2)), rel=RTOL), name


def _binade_noise(v: np.ndarray, nmant: int, minexp: int, top: float) -> np.ndarray:
    """E[δ²] in scale units for element values v: (2^(e−m))²/12 with e the binade of |v| (subnormal
    spacing below 2^minexp), (|v| − top)² beyond the largest element."""
    a = np.abs(v.astype(np.float64))
    _, e = np.frexp(a)
    binade = np.maximum(np.where(a == 0, minexp, e - 1), minexp)
    power = np.ldexp(1.0, 2 * (binade - nmant)) / 12.0
    return np.where(a > top, (a - top) ** 2, power)


def test_fp8_expected_fit_of_a_weight_is_the_binade_noise(cnn) -> None:
    s, _, diag, fits = cnn
    info = ml_dtypes.finfo(ml_dtypes.float8_e4m3fn)
    for name, w in _weights(s).items():
        if (name, "fp8e4m3") not in fits:
            continue
        scale = np.float32(np.abs(w).max() / np.float32(448.0))
        noise = _binade_noise(w.astype(np.float64) / scale, int(info.nmant), int(info.minexp), 448.0)
        expected = float(np.sum(diag[name] * noise) * float(scale) ** 2)
        assert fits[(name, "fp8e4m3")].expected == pytest.approx(expected, rel=RTOL), name


def test_nvfp4_and_mx_weights_have_both_fits(mlp) -> None:
    _, _, _, fits = mlp
    for fmt_name in ("nvfp4/16", "mxfp4/32"):
        for name in ("w1", "w2"):
            fit = fits[(name, fmt_name)]
            assert fit.measured > 0 and fit.expected > 0 and fit.axis is not None


def _one_sample_sessions(s, count: int):
    for i in range(count):
        arrays = {k: v[i : i + 1] for k, v in s.data.arrays.items()}
        labels = None if s.data.labels is None else s.data.labels[i : i + 1]
        yield dataclasses.replace(s, data=Dataset(arrays, labels, s.data.source))


def test_fp_activation_noise_is_summed_per_sample_in_the_graph() -> None:
    """Σ_j g_ij²·E[δ²](a_ij) from the graph equals numpy over each sample's own gradient and values."""
    samples = 3
    s = api.open_model(CNN)
    acts = [t.name for t in s.tensors if t.kind is Kind.ACTIVATION]
    feeds = [{k: v for k, v in s.data.sample(i, s.specs).items() if k in s.specs} for i in range(samples)]
    probe, names = instrument.build_probe(s.prepared.model, [t for t in s.tensors if t.name in acts], None)
    values = [engine.probe_values(probe, names, feed) for feed in feeds]
    absmax = {a: max(float(np.abs(v[a]).max()) for v in values) for a in acts}
    assert activation_absmax(s.prepared.model, acts, feeds) == pytest.approx(absmax, rel=0)
    e4m3 = ml_dtypes.finfo(ml_dtypes.float8_e4m3fn)
    scales = {a: float(np.float32(absmax[a] / np.float32(448.0))) for a in acts}
    stats = Statistics(noise=tuple(NoiseStat(a, parse_format("fp8e4m3"), scales[a]) for a in acts))
    traces, _, _ = api.fisher_traces(s, FisherOptions(max_samples=samples), statistics=stats)
    reference = dict.fromkeys(acts, 0.0)
    for i, one in enumerate(_one_sample_sessions(s, samples)):
        t, _, _ = api.fisher_traces(one, FisherOptions(max_samples=1), keep_gradients=True)
        for a in acts:
            v = (values[i][a].astype(np.float32) / np.float32(scales[a])).astype(np.float32)
            noise = _binade_noise(v, int(e4m3.nmant), int(e4m3.minexp), 448.0) * scales[a] ** 2
            reference[a] += float(np.sum(t.diag[a] * noise)) / samples
    for a in acts:
        got = float(traces.sums[NoiseStat(a, parse_format("fp8e4m3"), 0.0).key])
        assert got == pytest.approx(reference[a], rel=RTOL), a


def test_fp_activation_columns_and_per_tensor_int_activations(cnn) -> None:
    _, traces, _, fits = cnn
    trace = dict(zip([t.name for t in traces.tensors], traces.trace(), strict=True))
    for t in traces.tensors:
        if t.kind is not Kind.ACTIVATION:
            continue
        assert (t.name, "int4/ch") not in fits  # per channel: weights only
        assert (t.name, "nvfp4/16") in fits  # dynamic blocks per sample (test_activation_blocks checks them)
        lo, hi = min(traces.act_min[t.name], 0.0), max(traces.act_max[t.name], 0.0)
        step = float(np.float32((hi - lo) / 255.0))
        assert fits[(t.name, "uint8")].expected == pytest.approx(trace[t.name] * step**2 / 12, rel=RTOL)
        assert 0 < fits[(t.name, "fp16")].expected < fits[(t.name, "fp8e4m3")].expected
        assert fits[(t.name, "fp8e4m3")].measured is None


def test_score_reports_the_format_columns() -> None:
    report = api.score(CNN, options=FisherOptions(max_samples=8), formats=["int4/ch", "fp8e4m3"], weight_bits=(4,))
    assert report.formats == ("int4/ch", "fp8e4m3")
    weights = [t for t in report.tensors if t.kind is Kind.WEIGHT]
    assert all(set(t.formats) == {"int4/ch", "fp8e4m3"} for t in weights)
    total = sum(t.formats["int4/ch"].expected for t in weights)
    assert report.format_totals["int4/ch"] == pytest.approx(total, rel=1e-12)


needs_reference = pytest.mark.skipif(
    not ENGINES["ort-training"].available(), reason="the reference engine needs onnxruntime-training"
)


@needs_reference
@pytest.mark.parametrize("source", ["cnn", "mlp"])
def test_statistics_agree_between_engines(source: str) -> None:
    model, data = (CNN, None) if source == "cnn" else (_mlp(), RandomData(6, seed=2))
    formats = ("int4/ch", "uint4/b32", "fp8e4m3", "nvfp4/16", "fp16")
    _, ref, _, _ = _scored(model, data, formats, 6, "ort-training")
    _, own, _, _ = _scored(model, data, formats, 6, "onnx")
    assert ref.sums is not None and own.sums is not None and set(ref.sums) == set(own.sums)
    for key, value in ref.sums.items():
        np.testing.assert_allclose(own.sums[key], value, rtol=1e-4, atol=1e-9 * float(np.abs(value).max()), err_msg=key)


@pytest.mark.parametrize(
    "kind", [ml_dtypes.float8_e4m3fn, np.float16, ml_dtypes.bfloat16], ids=["e4m3", "fp16", "bf16"]
)
def test_the_graphs_binade_equals_frexp_on_every_kind_of_float32(kind) -> None:
    """2^⌊log2 x⌋ from the Veltkamp split in onnxruntime equals numpy's frexp on random bit patterns
    (normals, subnormals, powers of two and their neighbours, the largest values)."""
    top = float(ml_dtypes.finfo(kind).max)
    bits = np.random.default_rng(0).integers(0, 2**31 - 1, 200_000, dtype=np.int64).astype(np.uint32)
    x = bits.view(np.float32)
    edges = [0, 1, 2, 0.5, 1.5, 3, 448, 447.99997, 65504, 2**-126, 2**-149, 2**-62, 1.5 * 2**-62, 3.3895314e38]
    x = np.concatenate([x[np.isfinite(x)], np.array(edges, np.float32), np.nextafter(np.array(edges, np.float32), 0)])
    p = "t_"
    consts = {"top": top, "down": 2.0**-64, "up": 2.0**64, "cut": 2.0**-62}
    inits = [helper.make_tensor(p + k, TensorProto.FLOAT, [], [v]) for k, v in consts.items()]
    graph = helper.make_graph(
        binade_nodes("x", p, top),
        "binade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info(p + "pow", TensorProto.FLOAT, [len(x)])],
        inits + shared_initializers(),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    got = make_session(model.SerializeToString()).run(None, {"x": x})[0]
    xc = np.minimum(x, np.float32(top)).astype(np.float64)
    _, e = np.frexp(xc)
    normal = xc >= 2.0**-126  # below, only "at most 2^-126" matters: every format's floor is higher
    np.testing.assert_array_equal(got[normal], np.ldexp(1.0, e - 1)[normal])
    assert np.all(got[~normal] <= 2.0**-126)


def test_exact_fisher_weighs_the_statistics_like_the_diagonal() -> None:
    """--fisher exact runs every class: the statistics are Σ_c p_c·(value for label c), as the diagonal."""
    s = api.open_model(CNN)
    fmts = [parse_format(f) for f in ("int4/ch", "uint3/ch")]
    plan = plan_statistics(s.prepared.model, s.tensors, fmts)
    traces, _, _ = api.fisher_traces(
        s, FisherOptions(fisher="exact", max_samples=3), keep_gradients=True, statistics=plan
    )
    fits = format_fits(traces, s.prepared.model, fmts)
    weights = _weights(s)
    for (name, fmt_name), fit in fits.items():
        if name in weights:
            expected = _int_reference(fmt_name, weights[name], traces.diag[name], fit.axis)
            assert fit.expected == pytest.approx(expected, rel=RTOL), name


@pytest.mark.parametrize("fmt_name", ["fp8e4m3", "fp8e5m2", "fp8e4m3/ch", "nvfp4/16", "mxfp4/32", "fp16", "bf16"])
def test_noise_root_is_the_square_root_of_the_formats_noise_power(fmt_name: str) -> None:
    rng = np.random.default_rng(5)
    w = (rng.normal(0, 1, (64, 96)) * 10.0 ** rng.uniform(-6, 2, (64, 96))).astype(np.float32)
    w[0, :5] = 0
    w[1, 1] = -np.abs(w[1]).max()
    fmt = parse_format(fmt_name)
    axis = None if fmt.granularity.value == "tensor" else (0 if fmt_name.endswith("/ch") else 1)
    ref = np.sqrt(noise_power(fmt, w, axis))
    got = noise_root(fmt, w, axis).astype(np.float64)
    normal = ref > 1e-37  # bf16's zeros: a float32 subnormal root, whose noise (1e-82) nothing sees
    np.testing.assert_allclose(got[normal], ref[normal], rtol=2e-7)
    np.testing.assert_allclose(got[~normal], ref[~normal], rtol=1e-4)


def test_scaled_floating_formats_skip_embedding_tables() -> None:
    rng = np.random.default_rng(4)
    table = numpy_helper.from_array(rng.normal(0, 0.1, (50, 64)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.normal(0, 0.1, (64, 10)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [table, w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = Dataset({"ids": rng.integers(0, 50, (4, 1, 4))}, rng.integers(0, 10, (4, 1)))
    _, _, diag, fits = _scored(model, data, ("int8", "fp8e4m3", "nvfp4/16", "fp16"), 4)
    assert {f for n, f in fits if n == "table"} == {"int8", "fp16"}
    assert {f for n, f in fits if n == "w"} == {"int8", "fp8e4m3", "nvfp4/16", "fp16"}
    err = _fp_quantize(_weights_of(model)["w"], "fp8e4m3", None).astype(np.float64) - _weights_of(model)["w"]
    assert fits[("w", "fp8e4m3")].measured == pytest.approx(float(np.sum(diag["w"] * err**2)), rel=RTOL)


def _weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}


def test_format_statistics_on_two_workers_equal_one_process() -> None:
    s = api.open_model(CNN)
    fmts = [parse_format(f) for f in ("int4/ch", "fp8e4m3")]
    plan = plan_statistics(s.prepared.model, s.tensors, fmts, _absmax(s, 12))
    one, _, _ = api.fisher_traces(s, FisherOptions(max_samples=12), statistics=plan)
    two, _, _ = api.fisher_traces(s, FisherOptions(max_samples=12, workers=Workers(processes=2)), statistics=plan)
    assert one.sums is not None and two.sums is not None and set(one.sums) == set(two.sums)
    for key, value in one.sums.items():
        # A worker runs 1 onnxruntime thread, this process 2: kernels sum in another order (1e-7 seen
        # with onnxruntime-training); a merge error would be of order 1.
        np.testing.assert_allclose(two.sums[key], value, rtol=1e-6, err_msg=key)


def test_weight_fits_match_the_diagonal_path(cnn) -> None:
    s, _, diag, fits = cnn
    fmts = [parse_format(f) for f in ("int4/ch", "uint8", "fp8e4m3")]
    ref = {(f.name, f.format): f for f in weight_format_fits(s.prepared.model, diag, fmts)}
    got = {(f.name, f.format): f for f in weight_fits(fits, s.prepared.model) if (f.name, f.format) in ref}
    assert set(got) == set(ref)
    for key, f in got.items():
        assert f.axis == ref[key].axis and f.expected == pytest.approx(ref[key].expected, rel=RTOL)
        if key[1] == "fp8e4m3":
            assert f.measured == pytest.approx(ref[key].measured, rel=RTOL)
        else:
            assert np.isnan(f.measured)
