"""fitonnx.formats against the runtimes themselves: onnxruntime's QuantizeLinear→DequantizeLinear (and
Cast) bit for bit, and onnx's reference evaluator where onnxruntime lacks the type."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import fitonnx.formats as F
from fitonnx.errors import UnsupportedError
from fitonnx.formats import groups

ort = pytest.importorskip("onnxruntime")

SHAPE = (6, 70)  # 70 along axis 1 leaves a short last block for every block size


def nasty(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Normal values of mixed magnitudes with ±0 and float32 subnormals planted."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 30.0], size=shape)).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.permutation(flat.size)
    flat[idx[:6]] = np.array([0.0, -0.0, 1e-40, -1e-42, 1.4e-45, -3e-39], np.float32)
    return x


def with_extremes(x: np.ndarray, seed: int) -> np.ndarray:
    """x with values far beyond any calibrated range and the largest finite float32s planted."""
    rng = np.random.default_rng(seed + 1000)
    y = x.copy().reshape(-1)
    idx = rng.permutation(y.size)
    y[idx[:8]] = np.array([3.0e38, -3.4e38, 1e20, -1e20, 7e4, -7e4, 500.0, -500.0], np.float32)
    return y.reshape(x.shape)


def bits_of(a: np.ndarray) -> np.ndarray:
    """float32 bit patterns: equality distinguishes −0 from +0."""
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@functools.cache
def ort_max_opset() -> int:
    """The highest default-domain opset the installed onnxruntime loads."""
    best = 0
    for opset in range(10, 30):
        try:
            session(identity_model(opset))
            best = opset
        except Exception:
            break
    return best


def identity_model(opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return model([helper.make_node("Identity", ["x"], ["y"])], [], [x], y.name, opset, [1])


def model(nodes, inits, inputs, output: str, opset: int, shape) -> onnx.ModelProto:
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, list(shape))
    graph = helper.make_graph(list(nodes), "g", inputs, [out], list(inits))
    opsets = [helper.make_opsetid("", opset)]
    m = helper.make_model(graph, opset_imports=opsets)
    m.ir_version = helper.find_min_ir_version_for(opsets)
    return m


def session(m: onnx.ModelProto):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def activation_model(fmt: F.Format, params: F.QParams, axis: int | None) -> onnx.ModelProto:
    pieces = F.activation_qdq(fmt, "x", SHAPE, axis, params, runnable=False)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))
    return model(pieces.nodes, pieces.initializers, [x], pieces.output, pieces.opset, SHAPE)


def weight_model(fmt: F.Format, w: np.ndarray, axis: int | None) -> onnx.ModelProto:
    pieces = F.weight_qdq(fmt, "w", w, axis, runnable=False)
    return model(pieces.nodes, pieces.initializers, [], pieces.output, pieces.opset, w.shape)


def require_onnx_type(fmt: F.Format) -> None:
    try:
        F.element_type(fmt)
    except UnsupportedError as e:
        pytest.skip(f"no ONNX type: {e}")


def require_ort(fmt: F.Format) -> None:
    """Skip (with the reason) where the installed onnxruntime cannot have this format."""
    require_onnx_type(fmt)
    if F.min_opset(fmt) > ort_max_opset():
        pytest.skip(
            f"{fmt.name} needs opset {F.min_opset(fmt)}; onnxruntime {ort.__version__} loads up to {ort_max_opset()}"
        )
    try:
        F.activation_qdq(
            fmt,
            "x",
            SHAPE,
            1 if fmt.granularity is not F.Granularity.TENSOR else None,
            F.qparams(np.ones(SHAPE), fmt, 1),
        )
    except UnsupportedError as e:
        pytest.skip(f"onnxruntime lacks a kernel: {e}")


AXES = [
    pytest.param(name, axis, id=f"{name}@{axis}")
    for name in sorted(F.FORMATS)
    for axis in ((0, 1) if F.FORMATS[name].granularity is not F.Granularity.TENSOR else (0,))
]


def axis_for(fmt: F.Format, axis: int) -> int | None:
    return None if fmt.granularity is F.Granularity.TENSOR else axis


@pytest.mark.parametrize(("name", "axis"), AXES)
def test_weight_qdq_matches_onnxruntime(name: str, axis: int) -> None:
    fmt = F.get_format(name)
    require_ort(fmt)
    ax = axis_for(fmt, axis)
    w = nasty(SHAPE, seed=axis)
    got = session(weight_model(fmt, w, ax)).run(None, {})[0]
    assert np.array_equal(bits_of(got), bits_of(F.quantize_dequantize(w, fmt, ax)))


@pytest.mark.parametrize(("name", "axis"), AXES)
def test_activation_qdq_matches_onnxruntime(name: str, axis: int) -> None:
    """Scales from a narrower calibration range, then values beyond it and float32 extremes."""
    fmt = F.get_format(name)
    require_ort(fmt)
    ax = axis_for(fmt, axis)
    bulk = nasty(SHAPE, seed=10 + axis)
    params = F.qparams(bulk * np.float32(0.25), fmt, ax)
    x = with_extremes(bulk, seed=axis)
    got = session(activation_model(fmt, params, ax)).run(None, {"x": x})[0]
    want = F.quantize_dequantize(x, fmt, ax, params)
    differ = bits_of(got) != bits_of(want)
    if fmt.is_int and np.any(differ):
        wraps = int32_overflow(x, fmt, ax, params)
        assert not np.any(differ & ~wraps), x[differ & ~wraps][:5]
        pytest.xfail(f"onnxruntime {ort.__version__} wraps around instead of saturating where |x/scale| >= 2^31")
    mismatch = np.flatnonzero(differ)
    assert mismatch.size == 0, list(
        zip(x.ravel()[mismatch][:5], got.ravel()[mismatch][:5], want.ravel()[mismatch][:5], strict=True)
    )


def int32_overflow(x: np.ndarray, fmt: F.Format, axis: int | None, params: F.QParams) -> np.ndarray:
    """Elements whose x/scale leaves the int32 range (onnxruntime 1.19.2's blocked and int4 kernels
    convert to int32 before saturating there; 1.32.0 saturates as the ONNX spec says)."""
    scale = F.expand(fmt, params.scale.reshape(F.group_shape(fmt, x.shape, axis)), x.shape, axis)
    return np.abs(x.astype(np.float64) / scale) >= 2.0**31


@pytest.mark.parametrize("name", ["mxfp4/32", "nvfp4/16", "mxfp8/32"])
def test_two_level_formats_match_onnx_reference(name: str) -> None:
    """Where onnxruntime lacks float4 (or the opset), onnx's own reference evaluator is the judge."""
    fmt = F.get_format(name)
    bulk = nasty(SHAPE, seed=3)
    params = F.qparams(bulk * np.float32(0.25), fmt, 1)
    x = with_extremes(bulk, seed=3)
    try:
        got = ReferenceEvaluator(activation_model(fmt, params, 1)).run(None, {"x": x})[0]
    except Exception as e:  # the reference evaluator of the installed onnx may lack the type
        pytest.skip(f"onnx {onnx.__version__} reference evaluator cannot run {name}: {type(e).__name__}: {e}")
    same_up_to_zero_sign(got, F.quantize_dequantize(x, fmt, 1, params))
    w = nasty(SHAPE, seed=4)
    same_up_to_zero_sign(ReferenceEvaluator(weight_model(fmt, w, 1)).run(None, {})[0], F.quantize_dequantize(w, fmt, 1))


def same_up_to_zero_sign(got: np.ndarray, want: np.ndarray) -> None:
    """onnx's reference float4 cast returns +0 for −0 (e2m1 has a signed zero; ml_dtypes keeps it):
    compare values at zeros, bit patterns everywhere else."""
    zero = want == 0
    assert np.array_equal(bits_of(got)[~zero], bits_of(want)[~zero])
    assert np.all(got[zero] == 0)


def test_float4_cast_matches_onnx_reference() -> None:
    """onnxruntime has no float4 Cast: onnx's reference evaluator judges the ml_dtypes cast instead."""
    x = with_extremes(nasty(SHAPE, seed=6), seed=6)
    to = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT4E2M1, saturate=1)]
    back = [helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))
    got = ReferenceEvaluator(model(to + back, [], [inp], "y", 23, SHAPE)).run(None, {"x": x})[0]
    same_up_to_zero_sign(got, saturated_cast(x, ml_dtypes.float4_e2m1fn))


CASTS = [
    ("float8e4m3fn", TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, 19),
    ("float8e5m2", TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2, 19),
    ("float4e2m1", TensorProto.FLOAT4E2M1, ml_dtypes.float4_e2m1fn, 23),
    ("bfloat16", TensorProto.BFLOAT16, ml_dtypes.bfloat16, 13),
    ("float16", TensorProto.FLOAT16, np.float16, 13),
]


def saturated_cast(x: np.ndarray, dtype) -> np.ndarray:
    """ONNX Cast with saturate=1, written out: finite values clip to ±max, then round to nearest even."""
    if dtype in (np.float16, ml_dtypes.bfloat16):
        with np.errstate(over="ignore"):
            return x.astype(dtype).astype(np.float32)
    top = np.float32(ml_dtypes.finfo(dtype).max)
    return np.clip(x, -top, top).astype(dtype).astype(np.float32)


@pytest.mark.parametrize(("label", "proto", "dtype", "opset"), CASTS, ids=[c[0] for c in CASTS])
def test_casts_match_ml_dtypes(label: str, proto: int, dtype, opset: int) -> None:
    x = with_extremes(nasty(SHAPE, seed=5), seed=5)
    nodes = [
        helper.make_node("Cast", ["x"], ["c"], to=proto),
        helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT),
    ]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))
    m = model(nodes, [], [inp], "y", opset, SHAPE)
    if opset > ort_max_opset():
        pytest.skip(f"Cast to {label} needs opset {opset}; onnxruntime {ort.__version__} loads up to {ort_max_opset()}")
    try:
        sess = session(m)
    except Exception as e:
        if "NOT_IMPLEMENTED" not in str(e):
            raise
        pytest.skip(f"onnxruntime {ort.__version__} has no Cast kernel to {label}")
    got = sess.run(None, {"x": x})[0]
    assert np.array_equal(bits_of(got), bits_of(saturated_cast(x, dtype)))


def test_fp8_measured_fit_equals_fisher_weighted_onnxruntime_error() -> None:
    """Σ F_jj (Q(w_j) − w_j)² with Q(w) from onnxruntime itself, within 1e-6 relative."""
    rng = np.random.default_rng(7)
    w = nasty(SHAPE, seed=7)
    fisher = rng.exponential(size=SHAPE)
    for name in ("fp8e4m3", "fp8e5m2", "fp8e4m3/ch"):
        fmt = F.get_format(name)
        q = session(weight_model(fmt, w, axis_for(fmt, 0))).run(None, {})[0]
        want = float(np.sum(fisher * (q.astype(np.float64) - w.astype(np.float64)) ** 2))
        assert F.fit_measured(fmt, w, fisher, axis_for(fmt, 0)) == pytest.approx(want, rel=1e-6)


def test_block_scale_layout_is_onnx_blocked() -> None:
    """The writer's block scales have ONNX's blocked shape: the axis's length divided up, rounded up."""
    fmt = F.get_format("int4/b32")
    pieces = F.weight_qdq(fmt, "w", nasty(SHAPE, 0), 1)
    scale = next(t for t in pieces.initializers if t.name == "w_scale")
    assert tuple(scale.dims) == (6, 3)
    assert groups.group_shape(fmt, SHAPE, 1) == (6, 3)


@pytest.mark.parametrize("name", ["int8", "uint8", "int4/b32", "int16/ch", "uint4/ch"])
def test_exact_ties_round_half_to_even_like_onnxruntime(name: str) -> None:
    """Values exactly halfway between levels (scales that are powers of two make them exact)."""
    fmt = F.get_format(name)
    require_ort(fmt)
    ax = axis_for(fmt, 1)
    levels = 2 ** (fmt.bits - 1) - 1 if not fmt.asymmetric else 2**fmt.bits - 1
    params = F.params_from_range(fmt, np.float32(-0.25 * levels) if not fmt.asymmetric else 0.0, 0.25 * levels)
    shape = F.group_shape(fmt, SHAPE, ax)
    params = F.QParams(np.broadcast_to(params.scale, shape).copy(), np.broadcast_to(params.zero_point, shape).copy())
    assert np.all(params.scale == 0.25)
    k = np.random.default_rng(8).integers(-20, 20, size=SHAPE)
    x = ((k + 0.5) * 0.25).astype(np.float32)
    got = session(activation_model(fmt, params, ax)).run(None, {"x": x})[0]
    assert np.array_equal(bits_of(got), bits_of(F.quantize_dequantize(x, fmt, ax, params)))
