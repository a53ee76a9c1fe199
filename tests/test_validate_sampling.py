"""validate's budget sampler, damage threshold and format families (issues 17 and 11).

The formats' arithmetic is checked against ml_dtypes and fitonnx.formats (an independent
implementation: numpy casts), the simulation against numpy forward passes of a small model.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fitonnx.analysis import choices
from fitonnx.analysis.damage import Damage, Threshold
from fitonnx.analysis.harness import SimulationOptions, harness
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.simulate import Config, float_constants, float_quantizer_nodes
from fitonnx.analysis.validate import Sampler, SamplingOptions, validate
from fitonnx.cli.main import cli
from fitonnx.fisher.options import FisherOptions
from fitonnx.formats import fit_expected, fit_measured, params_from_range, parse_format, qparams, quantize_dequantize
from fitonnx.model.data import Dataset

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "mnist_cnn.onnx"


def _probe_values(rng: np.random.Generator) -> np.ndarray:
    """Normal values, ±0, subnormals of e4m3 (below 2^-6), values at and beyond the range."""
    x = rng.normal(0, 50, 400)
    extra = [0.0, -0.0, 2.0**-8, -(2.0**-9), 3 * 2.0**-9, 448.0, -448.0, 460.0, 500.0, -1e4, 2.0**-6, 7.5]
    return np.concatenate([x, extra]).astype(np.float32)


@pytest.mark.parametrize("name", ["fp8e4m3", "fp8e5m2", "fp16"])
def test_float_quantizer_equals_ml_dtypes_casts(name: str) -> None:
    """The simulation's floating fake quantizer (ONNX nodes) and its numpy twin equal the cast
    through ml_dtypes (saturated at the format's largest value), at scale 1 and at a tensor scale."""
    fmt = parse_format(name)
    rng = np.random.default_rng(0)
    x = _probe_values(rng)
    info = ml_dtypes.finfo(fmt.dtype)
    for scale in (1.0, 0.37):
        grid = choices.float_grid(fmt, scale)
        want = (np.clip(x / np.float32(scale), -float(info.max), float(info.max)).astype(fmt.dtype)).astype(np.float64)
        want = want * scale
        got_np = choices.float_quantize(x, grid)
        np.testing.assert_allclose(got_np, want, rtol=1e-6, atol=0)
        p = "q_"
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])]
        consts = [
            numpy_helper.from_array(np.array(v, np.float32), p + k)
            for k, v in (("s", scale), ("m", grid.mant), ("e", grid.emin), ("t", grid.top))
        ]
        nodes = float_quantizer_nodes("x", p, p + "s", p + "m", p + "e", p + "t")
        graph = helper.make_graph(
            nodes,
            "fq",
            inputs,
            [helper.make_tensor_value_info(p + "fout", TensorProto.FLOAT, [len(x)])],
            [*consts, *float_constants(p, np.dtype(np.float32))],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)  # ORT 1.19: IR<=10
        (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float32), rtol=1e-6, atol=0)


def test_float_quantizer_matches_the_format_registry() -> None:
    """Per tensor, the floating grid from a calibrated range equals fitonnx.formats' quantize-dequantize."""
    fmt = parse_format("fp8e4m3")
    x = _probe_values(np.random.default_rng(1))[:400]
    params = qparams(x, fmt, None)
    grid = choices.float_grid(fmt, float(np.asarray(params.scale).reshape(())))
    np.testing.assert_allclose(choices.float_quantize(x, grid), quantize_dequantize(x, fmt, None), rtol=1e-6)


def test_families_group_formats_and_pair_single_float_widths_with_fp16() -> None:
    fams = {f.name: f for f in choices.families(["int4/ch", "int8/ch", "uint4", "fp8e4m3", "nvfp4/16"], False)}
    assert fams["int/ch"].weights == ("int4/ch", "int8/ch") and fams["int/ch"].activations == ("int4", "int8")
    assert fams["uint"].weights == ("uint4",)
    assert fams["fp8"].weights == ("fp8e4m3", "fp16") and fams["fp8"].activations == ("fp8e4m3", "fp16")
    # MX/NVFP4 activations take the block format itself: scales per block of each sample (test_activation_blocks)
    assert fams["nvfp4/16"].weights == ("nvfp4/16", "fp16") and fams["nvfp4/16"].activations == ("nvfp4/16", "fp16")
    assert all(f.activations == () for f in choices.families(["all"], True))
    # fp16 named beside a floating format joins that family instead of a one-choice family of its own
    assert [f.name for f in choices.families(["fp8e4m3", "fp16"], True)] == ["fp8"]
    assert [f.weights for f in choices.families(["fp16"], True)] == [("fp16",)]


def test_threshold_on_decisions_and_kl() -> None:
    def d(kl: float, agree: float | None) -> Damage:
        return Damage(np.array([kl]), None, None, None if agree is None else np.array([agree]))

    t = Threshold(0.95)
    assert t.works(d(3.0, 0.96)) and not t.works(d(0.01, 0.94))
    assert t.works(d(0.5, None)) and not t.works(d(1.5, None))  # no decisions: the second-order limit
    assert not Threshold(0.95, max_kl=0.1).works(d(0.2, 1.0))


@pytest.fixture(scope="module")
def cnn_report():
    return validate(
        CNN,
        MODELS / "mnist_cnn.calib.npz",
        simulation=SimulationOptions(weight_bits=(2, 3, 4, 6, 8), activation_bits=(2, 3, 4, 6, 8)),
        sampling=SamplingOptions(configs=10, resamples=0, threshold=Threshold(0.97)),
        options=FisherOptions(max_samples=32),
    )


def test_budget_sampler_draws_between_the_cheapest_working_uniform_width_and_the_dearest(cnn_report) -> None:
    (fam,) = cnn_report.families
    ladder = [c for c in cnn_report.configs if c.uniform]
    assert [next(iter(c.weight_bits.values())) for c in ladder] == [2, 3, 4, 6, 8]
    works = [c.working for c in ladder]
    lo = works.index(True)
    assert not works[0] and fam.band == (ladder[lo].weight_bits["conv1.weight"], 8)  # 2 bits breaks the CNN
    drawn = [c for c in cnn_report.configs if not c.uniform]
    assert len(drawn) == 10
    lo_bits = fam.band[0]
    for c in drawn:
        assert all(lo_bits <= b <= 8 for b in c.weight_bits.values())
    # Every flag is the threshold applied to the measured agreement, and the count is theirs.
    for c in cnn_report.configs:
        assert c.working == (c.agreement >= 0.97)
    assert cnn_report.rejected == fam.rejected == sum(not c.working for c in cnn_report.configs)
    assert fam.working and all(c.measure for c in fam.working)


def test_random_sampler_stays_available() -> None:
    r = validate(
        CNN,
        MODELS / "mnist_cnn.calib.npz",
        simulation=SimulationOptions(weight_bits=(3, 8), activation_bits=(8,)),
        sampling=SamplingOptions(configs=6, resamples=0, sampler=Sampler.RANDOM),
        options=FisherOptions(max_samples=16),
    )
    assert r.sampler is Sampler.RANDOM and r.families[0].band is None
    assert len(r.configs) == 6 + 1  # 8 bits is the one width both lists share


def test_format_configurations_simulate_and_predict_as_the_registry_says() -> None:
    """Per-channel and fp8 weights are fed exactly as fitonnx.formats quantizes them; their FIT is
    fit_expected/fit_measured of the registry with the diagonal Fisher; fp8 activations follow the
    floating grid of their calibrated range."""
    h = harness(
        CNN,
        MODELS / "mnist_cnn.calib.npz",
        simulation=SimulationOptions(formats=("int4/ch", "fp8e4m3")),
        options=FisherOptions(max_samples=16),
    )
    assert {f.name for f in h.families} == {"int/ch", "fp8"}
    w = "conv2.weight"
    value = h.simulator.sim.weights[w]
    feed = h.simulator.feed(Config({w: "int4/ch"}, {}))
    # int4/ch: symmetric per output channel (axis 0 of a Conv weight), levels −8..7, by hand.
    m = np.abs(value).max(axis=(1, 2, 3), keepdims=True) / 7.0
    np.testing.assert_allclose(feed[w], np.clip(np.round(value / m), -8, 7) * m, rtol=1e-6, atol=1e-7)
    diag = np.asarray(h.traces.diag[w], np.float64).reshape(value.shape)
    row, col = h.tables.names.index(w), h.tables.bits.index("fp8e4m3")
    fmt = parse_format("fp8e4m3")
    assert h.tables.values[Predictor.FIT_MEASURED][row, col] == pytest.approx(fit_measured(fmt, value, diag, None))
    assert h.tables.values[Predictor.FIT][row, col] == pytest.approx(fit_expected(fmt, value, diag, None))
    # The model input as an fp8 activation: the simulation equals the float model fed the input
    # quantized by the registry from the calibrated range.
    specs = h.session.specs
    (act,) = [a for a in h.activations if a in specs]
    lo, hi = h.simulator.act_ranges[act]
    held = h.held_out
    x = held.arrays[act]
    xq = quantize_dequantize(x, fmt, None, params_from_range(fmt, lo, hi))
    quantized = h.simulator.run(Config({}, {act: "fp8e4m3"}))
    simulator_fed = h.simulator
    simulator_fed_data = Dataset({act: xq}, held.labels, "q")
    ref = type(simulator_fed)(
        simulator_fed.sim, simulator_fed.model, [], simulator_fed.act_ranges, simulator_fed.scheme,
        simulator_fed_data, specs,
    ).run(Config.floating())  # fmt: skip
    np.testing.assert_allclose(quantized, ref, rtol=1e-5, atol=1e-5)


def test_cli_formats_json_and_a_bad_format(tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    args = ["validate", str(CNN), "--configs", "4", "--resamples", "0", "--max-samples", "8", "--weights-only"]
    result = CliRunner().invoke(cli, [*args, "--format", "fp8e4m3", "--format", "int8/ch", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [f["name"] for f in doc["families"]] == ["fp8", "int/ch"] and doc["sampler"] == "budget"
    assert all(c["activation_bits"] == {} for c in doc["configs"])
    assert "Spearman ρ with KL per family" in result.output and "past it" in result.output
    bad = CliRunner().invoke(cli, [*args, "--format", "int9/zz"])
    assert bad.exit_code == 2 and "error: expected a format" in bad.output and "Traceback" not in bad.output
    assert "Fisher samples" not in bad.output  # refused before any work
    assert not (tmp_path / "w.json").exists()


def _transposed_mlp() -> onnx.ModelProto:
    """small_mlp with w1 stored transposed and read through a Transpose (as an unrolled LSTM's
    weights reach their MatMuls through layout ops)."""
    from tests.test_validate import small_mlp

    model, p = small_mlp()
    g = model.graph
    w1 = next(t for t in g.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(p["w1"].T), "w1"))
    g.node[0].input[1] = "w1_t"
    g.node.insert(0, helper.make_node("Transpose", ["w1"], ["w1_t"], name="tr", perm=[1, 0]))
    return model


@pytest.mark.parametrize("transposed", [False, True])
def test_output_space_sensitivity_matches_numpy(transposed: bool) -> None:
    """ModelOpt's score Σ(∂ℓ/∂y ⊙ Δy)² at each reader's output, against hand-written gradients of the
    small MLP (empirical Fisher): weights and activations, each alone at its width; also with the
    weight reaching its MatMul through a Transpose."""
    from tests.test_validate import log_softmax, np_forward, np_quant, small_mlp

    model, p = small_mlp()
    if transposed:
        model = _transposed_mlp()
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 40).astype(np.int64)
    calib = Dataset({"x": x[:24]}, labels[:24], "calib")
    held = Dataset({"x": x[24:]}, labels[24:], "held")
    h = harness(model, calib, held, simulation=SimulationOptions(weight_bits=(3,), activation_bits=(4,)))
    xs, ys = x[:24].astype(np.float64), labels[:24]
    f = np_forward(p64, xs)
    gz = np.exp(log_softmax(f["z"]))
    gz[np.arange(24), ys] -= 1.0
    gh = (gz @ p64["w2"]) * (f["h"] > 0)
    lo_hi = {n: (float(f[n].min()), float(f[n].max())) for n in ("x", "r")}
    q = {n: np_quant(p64[n], p64[n].min(), p64[n].max(), 3) for n in ("w1", "w2")}
    want = {
        "w1": np.mean(np.sum((gh * (xs @ (q["w1"] - p64["w1"]))) ** 2, axis=1)),
        "w2": np.mean(np.sum((gz * (f["r"] @ (q["w2"] - p64["w2"]).T)) ** 2, axis=1)),
        "x": np.mean(np.sum((gh * ((np_quant(xs, *lo_hi["x"], 4) - xs) @ p64["w1"])) ** 2, axis=1)),
        "r": np.mean(np.sum((gz * ((np_quant(f["r"], *lo_hi["r"], 4) - f["r"]) @ p64["w2"].T)) ** 2, axis=1)),
    }
    table = h.tables.values[Predictor.OUTPUT_SPACE]
    for name, value in want.items():
        col = h.tables.bits.index(3 if name.startswith("w") else 4)
        assert table[h.tables.names.index(name), col] == pytest.approx(value, rel=2e-3), name
    # The data-free weight error: Σ (Q(w) − w)².
    err = h.tables.values[Predictor.WEIGHT_ERROR]
    for name in ("w1", "w2"):
        want_err = float(np.sum((q[name] - p64[name]) ** 2))
        assert err[h.tables.names.index(name), h.tables.bits.index(3)] == pytest.approx(want_err, rel=1e-5)


def test_oracle_finds_the_least_damaging_assignment_within_each_budget() -> None:
    """Exhaustive oracle on the small MLP: every assignment's KL from a numpy forward pass; the
    oracle's best is their minimum within the budget, and each scorer's regret and rank follow."""
    from fitonnx.analysis.oracle import assignments, average_bits, oracle, predictor_scorers
    from tests.test_validate import log_softmax, np_forward, np_quant, small_mlp

    model, p = small_mlp()
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 80).astype(np.int64)
    calib, held = Dataset({"x": x[:30]}, labels[:30], "c"), Dataset({"x": x[30:]}, labels[30:], "h")
    widths = (2, 3, 4, 8)
    h = harness(model, calib, held, simulation=SimulationOptions(weight_bits=widths, weights_only=True))
    results = oracle(h, (3.0, 5.0), predictor_scorers(h, (Predictor.FIT, Predictor.FIT_MEASURED)))
    ref = log_softmax(np_forward(p64, x[30:])["z"])

    def kl(a: dict[str, int]) -> float:
        pq = dict(p64) | {w: np_quant(p64[w], p64[w].min(), p64[w].max(), b) for w, b in a.items()}
        lq = log_softmax(np_forward(pq, x[30:])["z"])
        return float(np.mean(np.sum(np.exp(ref) * (ref - lq), axis=1)))

    numels = [40, 24]
    for r in results:
        inside = assignments(["w1", "w2"], numels, widths, r.budget)
        assert r.assignments == len(inside) and all(average_bits(list(a.values()), numels) <= r.budget for a in inside)
        kls = {tuple(a.values()): kl(a) for a in inside}
        best = min(kls, key=kls.get)
        assert tuple(r.best.values()) == best and r.best_kl == pytest.approx(kls[best], rel=1e-4)
        for label, a in r.recommended.items():
            assert r.regret[label] == pytest.approx(kls[tuple(a.values())] / kls[best], rel=1e-4)
            assert r.regret[label] >= 1.0 and r.rank[label] == 1 + sum(
                v < kls[tuple(a.values())] - 1e-12 for v in kls.values()
            )


def _dearer_shares(fam: choices.Family, n: int = 200, tensors: int = 20) -> np.ndarray:
    from types import SimpleNamespace

    from fitonnx.analysis.validate import budget_configs

    h = SimpleNamespace(weights=[f"w{k}" for k in range(tensors)], activations=[])
    drawn = budget_configs(h, fam, (0, len(fam.weights) - 1), n, np.random.default_rng(0))
    top = fam.weights[-1]
    return np.array([np.mean([c == top for c in cfg.weight_bits.values()]) for cfg in drawn])


def test_budget_sampler_mixes_a_two_choice_family() -> None:
    """fp8e4m3 against fp16 (8 bits apart): configurations mix the two over the whole range, instead
    of nearly all landing on one side (what a 1-bit spread did: the FP8 family held its uniform mixes)."""
    shares = _dearer_shares(choices.Family("fp8", ("fp8e4m3", "fp16"), ()))
    mixed = (shares > 0) & (shares < 1)
    assert mixed.mean() > 0.9
    assert (shares < 0.25).any() and (shares > 0.75).any()
    assert len({round(s, 3) for s in shares}) > 10


def test_budget_sampler_spread_is_unchanged_for_integer_ladders() -> None:
    from fitonnx.analysis.validate import BUDGET_SPREAD, _spread

    assert _spread(np.array([4.0, 5.0, 6.0, 8.0])) == BUDGET_SPREAD
    assert _spread(np.array([8.0, 16.0])) == 4.0
