"""fitonnx.formats: names, registry, group geometry, storage costs, FIT statistics and the Q/DQ writer,
each checked against numbers written out by hand or computed independently in the test."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import fitonnx.formats as F
from fitonnx.errors import FitonnxError, UnsupportedError
from fitonnx.score import noise

BRIEF_NAMES = [
    "int8",
    "int4/ch",
    "uint8",
    "int4/b32",
    "fp8e4m3",
    "fp8e5m2",
    "mxfp4/32",
    "nvfp4/16",
    "mxfp8/32",
    "fp16",
    "bf16",
]


# --- names and registry -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(F.FORMATS))
def test_every_registered_name_round_trips(name: str) -> None:
    fmt = F.get_format(name)
    assert fmt.name == name
    assert F.parse_format(name) == fmt


def test_the_toolchain_names_are_registered_with_their_meaning() -> None:
    assert set(BRIEF_NAMES) <= set(F.FORMATS)
    int4ch = F.get_format("int4/ch")
    assert (int4ch.bits, int4ch.granularity, int4ch.range_method) == (4, F.Granularity.CHANNEL, F.RangeMethod.SYMMETRIC)
    assert F.get_format("uint8").range_method is F.RangeMethod.MINMAX
    assert F.get_format("int4/b32").block_size == 32
    mx = F.get_format("mxfp4/32")
    assert (mx.element, mx.scale, mx.block_size) == (F.ElementKind.FP4_E2M1, F.ScaleType.E8M0, 32)
    nv = F.get_format("nvfp4/16")
    assert (nv.element, nv.scale, nv.block_size) == (F.ElementKind.FP4_E2M1, F.ScaleType.E4M3, 16)
    assert F.get_format("mxfp8/32").element is F.ElementKind.FP8_E4M3FN
    for bits in (2, 3, 4, 5, 6, 7, 8, 16):
        for name in (f"int{bits}", f"uint{bits}", f"int{bits}/ch", f"uint{bits}/ch"):
            assert name in F.FORMATS
    for block in (32, 64, 128):
        assert {f"int4/b{block}", f"uint4/b{block}", f"int8/b{block}", f"uint8/b{block}"} <= set(F.FORMATS)


def test_unknown_names_fail_listing_the_valid_ones() -> None:
    with pytest.raises(FitonnxError, match=r"int4/ch.*found 'int9'"):
        F.get_format("int9")
    with pytest.raises(FitonnxError, match="nvfp4/16"):
        F.parse_format("fp7")
    with pytest.raises(FitonnxError, match="integer widths"):
        F.parse_format("int9/ch")


def test_the_grammar_spells_unregistered_formats() -> None:
    fmt = F.parse_format("uint5/b16")
    assert (fmt.bits, fmt.block_size, fmt.range_method) == (5, 16, F.RangeMethod.MINMAX)
    assert "uint5/b16" not in F.FORMATS


def test_invalid_combinations_fail_at_construction() -> None:
    with pytest.raises(FitonnxError, match="block size"):
        F.Format(F.ElementKind.INT, 4, F.Granularity.BLOCK)
    with pytest.raises(FitonnxError, match="e8m0"):
        F.Format(F.ElementKind.INT, 8, F.Granularity.BLOCK, 32, F.ScaleType.E8M0)
    with pytest.raises(FitonnxError, match="min/max"):
        F.Format(F.ElementKind.FP8_E4M3FN, 8, range_method=F.RangeMethod.MINMAX)
    with pytest.raises(FitonnxError, match="plain"):
        F.Format(F.ElementKind.FP16, 16)


def test_registering_a_different_format_under_a_taken_name_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    int8 = F.Format(F.ElementKind.INT, 8)
    assert F.register(int8) == F.get_format("int8")  # the same format again is fine
    monkeypatch.setitem(F.FORMATS, "int8", F.get_format("uint8"))
    with pytest.raises(FitonnxError, match="already registered"):
        F.register(int8)


# --- group geometry -----------------------------------------------------------------------------


def test_group_index_by_hand() -> None:
    block = F.parse_format("int4/b2")
    assert F.group_shape(block, (2, 5), 1) == (2, 3)
    assert F.group_index(block, (2, 5), 1).tolist() == [[0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]
    assert F.group_index(block, (5, 2), 0).tolist() == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5]]
    chan = F.get_format("int8/ch")
    assert F.group_index(chan, (2, 3), 1).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert F.group_index(chan, (2, 3), -2).tolist() == [[0, 0, 0], [1, 1, 1]]
    assert F.group_index(F.get_format("int8"), (2, 3), None).tolist() == [[0, 0, 0], [0, 0, 0]]
    values = np.arange(10.0).reshape(2, 5)
    assert F.group_sums(block, values, 1).tolist() == [[1.0, 5.0, 4.0], [11.0, 15.0, 9.0]]


def test_an_axis_is_required_for_channels_and_blocks() -> None:
    with pytest.raises(FitonnxError, match="axis"):
        F.quantize_dequantize(np.ones((2, 3), np.float32), F.get_format("int8/ch"), None)
    with pytest.raises(FitonnxError, match="out of range"):
        F.quantize_dequantize(np.ones((2, 3), np.float32), F.get_format("int8/ch"), 2)


# --- storage cost -------------------------------------------------------------------------------

COSTS = [
    ("int8", (10, 10), None, 8 + 32 / 100),  # one float32 scale, symmetric: no zero point
    ("uint8", (10, 10), None, 8 + (32 + 8) / 100),  # plus one uint8 zero point
    ("uint8/ch", (16, 3, 3, 3), 0, 8 + 16 * (32 + 8) / 432),
    ("int4/ch", (16, 3, 3, 3), 0, 4 + 16 * 32 / 432),
    ("int4/b32", (64, 96), 0, 4 + 32 / 32),  # MatMulNBits symmetric: a float32 scale per 32
    ("uint4/b32", (64, 96), 0, 4 + (32 + 4) / 32),  # plus a 4-bit zero point per block
    ("int4/b32", (40, 3), 0, 4 + (2 * 3 * 32) / 120),  # 40 = a full block and a short one
    ("fp8e4m3", (8, 4), None, 8 + 32 / 32),
    ("fp8e4m3/ch", (8, 4), 0, 8 + 8 * 32 / 32),
    ("mxfp4/32", (4, 64), 1, 4 + 8 / 32),
    ("mxfp4/32", (4, 40), 1, (160 * 4 + 8 * 8) / 160),
    ("mxfp8/32", (4, 64), 1, 8 + 8 / 32),
    ("nvfp4/16", (4, 64), 1, 4 + 8 / 16 + 32 / 256),
    ("fp16", (3, 5), None, 16.0),
    ("bf16", (3, 5), None, 16.0),
]


@pytest.mark.parametrize(("name", "shape", "axis", "bits"), COSTS, ids=[f"{c[0]}{c[1]}" for c in COSTS])
def test_bits_per_element_by_hand(name: str, shape: tuple[int, ...], axis: int | None, bits: float) -> None:
    assert F.bits_per_element(F.get_format(name), shape, axis) == pytest.approx(bits, rel=1e-12)


# --- the integer grid is today's -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_min_max_grid_is_the_noise_model_grid(bits: int) -> None:
    """uintN per tensor: fitonnx.noise's zero point exactly and its step as the float32 scale; the
    levels agree with rounding in float64 wherever a value is not within float32 error of a tie."""
    rng = np.random.default_rng(bits)
    for x in (rng.normal(size=(7, 9)), rng.uniform(0.5, 2.0, size=(7, 9)), -rng.uniform(0.5, 2.0, size=(7, 9))):
        x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        step = float(noise.step(lo, hi, bits))
        zp = float(noise.zero_point(lo, step))
        p = F.qparams(x, F.get_format(f"uint{bits}"), None)
        assert p.zero_point.item() == zp
        assert p.scale.item() == np.float32(step)
        exact = np.clip(np.round(x.astype(np.float64) / step) + zp, 0, 2**bits - 1)
        frac = np.abs(x.astype(np.float64) / step % 1.0 - 0.5)
        codes = F.encode(x, F.get_format(f"uint{bits}"), None, p)
        assert np.array_equal(codes[frac > 1e-4], exact[frac > 1e-4])


# --- FIT statistics -----------------------------------------------------------------------------


def test_per_tensor_fit_is_the_papers() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 6)).astype(np.float32)
    fisher = rng.exponential(size=w.shape)
    lo, hi = float(w.min()), float(w.max())
    for bits in (2, 4, 8):
        want = float(noise.fit(fisher.sum(), lo, hi, bits))
        assert F.fit_expected(F.get_format(f"uint{bits}"), w, fisher, None) == pytest.approx(want, rel=1e-6)
        sym = fisher.sum() * (max(-lo, hi) / (2 ** (bits - 1) - 1)) ** 2 / 12
        assert F.fit_expected(F.get_format(f"int{bits}"), w, fisher, None) == pytest.approx(sym, rel=1e-6)


def test_per_channel_fit_by_hand() -> None:
    rng = np.random.default_rng(1)
    w = (
        rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
        * np.array([0.1, 1.0, 3.0, 0.01], np.float32)[:, None, None, None]
    )
    fisher = rng.exponential(size=w.shape)
    want_asym = want_sym = 0.0
    for c in range(4):
        lo, hi = min(float(w[c].min()), 0.0), max(float(w[c].max()), 0.0)
        want_asym += fisher[c].sum() * ((hi - lo) / 15) ** 2 / 12
        want_sym += fisher[c].sum() * (max(-lo, hi) / 7) ** 2 / 12
    assert F.fit_expected(F.get_format("uint4/ch"), w, fisher, 0) == pytest.approx(want_asym, rel=1e-6)
    assert F.fit_expected(F.get_format("int4/ch"), w, fisher, 0) == pytest.approx(want_sym, rel=1e-6)
    per_tensor = F.fit_expected(F.get_format("int4"), w, fisher, None)
    assert want_sym < per_tensor  # the channels' own ranges are what per-channel scales gain


def test_per_block_fit_by_hand() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 70)).astype(np.float32)
    fisher = rng.exponential(size=w.shape)
    want = 0.0
    for r in range(3):
        for start in (0, 32, 64):  # blocks of 32 along axis 1; the last holds 6 elements
            block, f = w[r, start : start + 32], fisher[r, start : start + 32]
            want += f.sum() * (float(np.abs(block).max()) / 127) ** 2 / 12
    assert F.fit_expected(F.get_format("int8/b32"), w, fisher, 1) == pytest.approx(want, rel=1e-6)
    groups = F.group_fit(F.get_format("int8/b32"), w, fisher, 1)
    assert groups.shape == (3, 3)
    mass = F.group_sums(F.get_format("int8/b32"), fisher, 1)
    delta_sq = F.group_delta_sq(F.get_format("int8/b32"), w, 1)
    assert np.allclose(groups, mass * delta_sq / 12, rtol=1e-12)


def test_fp8_measured_fit_by_hand() -> None:
    """Σ F (Q(w) − w)² with Q written out: scale max|w|/448, divide, clip, cast with ml_dtypes, multiply."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 16)) * rng.choice([1e-3, 1.0, 20.0], size=(8, 16))).astype(np.float32)
    fisher = rng.exponential(size=w.shape)
    scale = np.float32(np.abs(w).max() / 448.0)
    q = np.clip(w / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    want = float(np.sum(fisher * (q.astype(np.float64) - w) ** 2))
    assert F.fit_measured(F.get_format("fp8e4m3"), w, fisher, None) == pytest.approx(want, rel=1e-6)


def test_float_noise_power_by_hand() -> None:
    """e4m3 with scale 1 (max|x| = 448): binade spacing 2^(e−3), subnormal spacing 2^−9 below 2^−6."""
    x = np.array([448.0, 1.0, 1.9, 300.0, 0.01, 0.0, -(2.0**-6), -5.0], np.float32)
    fmt = F.get_format("fp8e4m3")
    assert F.qparams(x, fmt, None).scale.item() == 1.0
    spacing = np.array([2.0**5, 2.0**-3, 2.0**-3, 2.0**5, 2.0**-9, 2.0**-9, 2.0**-9, 2.0**-1])
    assert np.array_equal(F.noise_power(fmt, x, None), spacing**2 / 12)


def test_float_noise_saturation_and_overflow() -> None:
    params = F.params_from_range(F.get_format("fp8e4m3"), -448.0, 448.0)  # scale 1
    power = F.noise_power(F.get_format("fp8e4m3"), np.array([500.0, -1000.0], np.float32), None, params)
    assert power.tolist() == [52.0**2, 552.0**2]  # deterministic: saturated to ±448
    fp16 = F.noise_power(F.get_format("fp16"), np.array([65510.0, 65520.0, 1.0], np.float32), None)
    assert fp16.tolist() == [6.0**2, np.inf, 2.0**-20 / 12]  # 65520 rounds to inf; 1.0 has spacing 2^-10


@pytest.mark.parametrize("name", ["fp8e4m3", "fp8e5m2", "bf16", "fp16", "mxfp4/32"])
def test_float_noise_model_predicts_the_rounding_error(name: str) -> None:
    """Averaged over values spread within binades, the measured squared error matches the model."""
    rng = np.random.default_rng(4)
    fmt = F.get_format(name)
    x = (np.exp(rng.uniform(-2, 2, size=(64, 256))) * rng.choice([-1, 1], size=(64, 256))).astype(np.float32)
    axis = 1 if fmt.granularity is not F.Granularity.TENSOR else None
    measured = float(np.mean((F.quantize_dequantize(x, fmt, axis).astype(np.float64) - x) ** 2))
    expected = float(np.mean(F.noise_power(fmt, x, axis)))
    assert measured == pytest.approx(expected, rel=0.1)


def test_integer_noise_power_is_delta_squared_over_12() -> None:
    x = np.array([[-1.0, 0.5], [3.0, 0.25]], np.float32)
    fmt = F.get_format("int8/ch")
    assert F.noise_power(fmt, x, 0).tolist() == [
        [np.float64(np.float32(1 / 127)) ** 2 / 12] * 2,
        [np.float64(np.float32(3 / 127)) ** 2 / 12] * 2,
    ]
    with pytest.raises(FitonnxError, match="noise_power"):
        F.group_delta_sq(F.get_format("fp8e4m3"), x, None)


def test_fisher_must_match_the_tensor() -> None:
    with pytest.raises(FitonnxError, match="Fisher"):
        F.fit_expected(F.get_format("int8"), np.ones((2, 3), np.float32), np.ones((3, 2)), None)


# --- quantization details -----------------------------------------------------------------------


def test_mx_scale_is_the_ocp_power_of_two() -> None:
    """OCP MX: X = 2^(floor(log2 max|x|) − emax); fp4 emax 2, e4m3 emax 8; values above 6·X clip."""
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [7.9, -3.0, 0.25, 0.26]  # 0.25 is a tie between 0 and 0.5: to even, 0
    p = F.qparams(x, F.get_format("mxfp4/32"), 1)
    assert p.scale.item() == 2.0 ** (2 - 2)
    assert F.quantize_dequantize(x, F.get_format("mxfp4/32"), 1)[0, :4].tolist() == [6.0, -3.0, 0.0, 0.5]
    assert F.qparams(x, F.get_format("mxfp8/32"), 1).scale.item() == 2.0 ** (2 - 8)


def test_nvfp4_two_level_scale() -> None:
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 16] = 12.0, 0.6  # block maxima
    p = F.qparams(x, F.get_format("nvfp4/16"), 1)
    tensor = np.float32(12.0 / (6 * 448))
    assert p.global_scale == tensor
    blocks = (np.array([12.0, 0.6], np.float32) / np.float32(6) / tensor).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(p.stored_scale.reshape(-1).astype(np.float32), blocks.astype(np.float32))
    assert np.array_equal(p.scale.reshape(-1), blocks.astype(np.float32) * tensor)


def test_all_zero_groups_stay_zero() -> None:
    x = np.zeros((2, 40), np.float32)
    x[1] = np.linspace(-1, 1, 40)
    for name in ("int4/b32", "uint4/ch", "fp8e4m3/ch", "mxfp4/32", "nvfp4/16", "uint8"):
        fmt = F.get_format(name)
        y = F.quantize_dequantize(x, fmt, 0 if fmt.granularity is F.Granularity.CHANNEL else 1)
        assert np.all(np.isfinite(y)) and np.all(y[0] == 0), name


# --- the ONNX writer ----------------------------------------------------------------------------

OPSETS = [
    ("int8", 10),
    ("uint8", 10),
    ("int8/ch", 13),
    ("int16", 21),
    ("uint4", 21),
    ("int4/b32", 21),
    ("fp8e4m3", 19),
    ("fp8e5m2/ch", 19),
    ("int2", 25),
    ("mxfp8/32", 24),
    ("mxfp4/32", 24),
    ("nvfp4/16", 23),
    ("bf16", 13),
    ("fp16", 6),
]


@pytest.mark.parametrize(("name", "opset"), OPSETS, ids=[o[0] for o in OPSETS])
def test_min_opset_by_hand(name: str, opset: int) -> None:
    assert F.min_opset(F.get_format(name)) == opset


def test_widths_without_an_onnx_type_and_float4_in_onnxruntime_fail_clearly() -> None:
    w = np.ones((4, 32), np.float32)
    with pytest.raises(UnsupportedError, match="no 3-bit integer type"):
        F.weight_qdq(F.get_format("int3"), "w", w, None)
    with pytest.raises(UnsupportedError, match=r"FLOAT4E2M1.*opset 23.*onnxruntime"):
        F.weight_qdq(F.get_format("nvfp4/16"), "w", w, 1)
    with pytest.raises(UnsupportedError, match="FLOAT4E2M1"):
        F.activation_qdq(F.get_format("mxfp4/32"), "x", (4, 32), 1, F.qparams(w, F.get_format("mxfp4/32"), 1))


ELEMENT_TYPES = [
    ("int8", TensorProto.INT8),
    ("uint8", TensorProto.UINT8),
    ("int4/ch", TensorProto.INT4),
    ("uint4/b32", TensorProto.UINT4),
    ("int16", TensorProto.INT16),
    ("uint16/ch", TensorProto.UINT16),
    ("int2", TensorProto.INT2),
    ("fp8e4m3", TensorProto.FLOAT8E4M3FN),
    ("fp8e5m2", TensorProto.FLOAT8E5M2),
    ("nvfp4/16", TensorProto.FLOAT4E2M1),
    ("mxfp4/32", TensorProto.FLOAT4E2M1),
]


@pytest.mark.parametrize(("name", "proto"), ELEMENT_TYPES, ids=[e[0] for e in ELEMENT_TYPES])
def test_written_pieces_are_valid_onnx_with_the_right_types(name: str, proto: int) -> None:
    fmt = F.get_format(name)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 64)).astype(np.float32)
    axis = None if fmt.granularity is F.Granularity.TENSOR else 1
    pieces = F.weight_qdq(fmt, "w", w, axis, runnable=False)
    types = {t.name: t.data_type for t in pieces.initializers}
    assert types["w_quantized"] == proto and types["w_zero_point"] == proto
    dq = pieces.nodes[-1]
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    if fmt.granularity is F.Granularity.BLOCK:
        assert attrs == {"axis": 1, "block_size": fmt.block_size}
    elif axis is not None:
        assert attrs == {"axis": 1}
    out = helper.make_tensor_value_info(pieces.output, TensorProto.FLOAT, [4, 64])
    graph = helper.make_graph(list(pieces.nodes), "g", [], [out], list(pieces.initializers))
    opsets = [helper.make_opsetid("", pieces.opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(model, full_check=True)


def test_two_level_scales_are_written_as_their_stored_types() -> None:
    w = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    nv = F.weight_qdq(F.get_format("nvfp4/16"), "w", w, 1, runnable=False)
    kinds = {t.name: t.data_type for t in nv.initializers}
    assert kinds["w_scale_e4m3"] == TensorProto.FLOAT8E4M3FN and kinds["w_scale_global"] == TensorProto.FLOAT
    assert [n.op_type for n in nv.nodes] == ["DequantizeLinear", "DequantizeLinear"]
    mx = F.weight_qdq(F.get_format("mxfp8/32"), "w", w, 1)
    assert {t.name: t.data_type for t in mx.initializers}["w_scale_e8m0"] == TensorProto.FLOAT8E8M0
    assert [n.op_type for n in mx.nodes] == ["Cast", "DequantizeLinear"]


def test_nan_and_infinite_ranges_fail() -> None:
    with pytest.raises(FitonnxError, match="NaN"):
        F.quantize_dequantize(
            np.array([1.0, np.nan], np.float32),
            F.get_format("int8"),
            None,
            F.params_from_range(F.get_format("int8"), -1, 1),
        )
    with pytest.raises(FitonnxError, match="finite range"):
        F.quantize_dequantize(np.array([1.0, np.inf], np.float32), F.get_format("fp8e4m3"), None)


def test_ties_round_to_even() -> None:
    fmt = F.get_format("int8")
    params = F.params_from_range(fmt, -31.75, 31.75)  # scale 31.75 / 127 = 0.25 exactly
    x = np.array([0.125, 0.375, -0.375, 0.625, -0.125, 40.0, -40.0], np.float32)
    y = F.quantize_dequantize(x, fmt, None, params)
    assert y.tolist() == [0.0, 0.5, -0.5, 0.5, 0.0, 31.75, -32.0]  # saturates to the int8 range −128…127


def test_the_package_imports_only_numpy_ml_dtypes_onnx_and_the_error_roots() -> None:
    import ast
    from pathlib import Path

    allowed = {"__future__", "dataclasses", "enum", "math", "re", "numpy", "ml_dtypes", "onnx", "fitonnx.errors"}
    for path in Path(F.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                ok = name.startswith("fitonnx.formats") or any(name == a or name.startswith(a + ".") for a in allowed)
                assert ok, f"{path.name} imports {name}"
