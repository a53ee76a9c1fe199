"""`fitonnx recommend` end to end: the allocation against brute force on the real FIT numbers, the
files it writes, the annotated model's outputs, the targets' exports, and the measured damage."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from fitonnx import api
from fitonnx.allocate import recommendation as rec_mod
from fitonnx.allocate.knapsack import AllocationOptions, Budget, BudgetKind, allocate, budget_from
from fitonnx.analysis import simulate
from fitonnx.cli.main import cli
from fitonnx.export.annotate import FINN_KEY, METADATA_KEY
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset, load_npz
from fitonnx.model.graph import Kind
from tests.conftest import tiny_classifier

CNN_WEIGHTS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def numels(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}


def outputs(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


def fit_of(rec: rec_mod.Recommendation, bits: dict[str, int]) -> float:
    return math.fsum(rec.fit_per_tensor[n][b] for n, b in bits.items())


def brute_force_best(rec: rec_mod.Recommendation, sizes: dict[str, int], names: list[str], limit: int) -> float:
    """The least Σ FIT over every configuration of ``names`` with Σ numel·bits ≤ ``limit``."""
    menus = [sorted(rec.fit_per_tensor[n]) for n in names]
    best = math.inf
    for combo in itertools.product(*menus):
        if sum(sizes[n] * b for n, b in zip(names, combo, strict=True)) <= limit:
            best = min(best, fit_of(rec, dict(zip(names, combo, strict=True))))
    return best


@pytest.fixture(scope="module")
def generic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    cnn = Path(__file__).resolve().parent.parent / "models" / "mnist_cnn.onnx"
    out = tmp_path_factory.mktemp("rec") / "nested" / "rec"  # created by the command
    before = sha(cnn)
    code, stdout, stderr = run("recommend", str(cnn), "--avg-bits", "3.5", "--max-samples", "64", "--out", str(out))
    assert code == 0, stderr
    assert sha(cnn) == before
    return out, stdout


def test_recommendation_is_the_brute_force_optimum_within_the_budget(
    generic_run: tuple[Path, str], cnn_path: Path
) -> None:
    out, stdout = generic_run
    raw = json.loads((out / "recommendation.json").read_text())
    assert {"weight_bits", "activation_bits", "fit", "weight_bytes", "pareto"} <= set(raw)
    rec = rec_mod.load(out / "recommendation.json")
    model = onnx.load(cnn_path)
    sizes = numels(model)
    assert set(rec.weight_bits) == set(CNN_WEIGHTS)
    total_bits = sum(sizes[n] * b for n, b in rec.weight_bits.items())
    total = sum(sizes[n] for n in CNN_WEIGHTS)
    assert total_bits <= 3.5 * total
    assert rec.weight_bytes == math.ceil(total_bits / 8)
    assert set(rec.activation_bits.values()) == {8}  # the generic target's default
    assert rec.fit == pytest.approx(fit_of(rec, {**rec.weight_bits, **rec.activation_bits}), rel=1e-12)
    # Exhaustive search over all 8^4 weight configurations, from the per-tensor FIT it reports.
    best = brute_force_best(rec, sizes, list(CNN_WEIGHTS), int(3.5 * total))
    assert fit_of(rec, dict(rec.weight_bits)) == pytest.approx(best, rel=1e-12)
    # The generic target's FIT is the asymmetric grid's: ∝ 1/(2^b − 1)², and ranges are the weights'.
    for name in CNN_WEIGHTS:
        f = rec.fit_per_tensor[name]
        assert f[2] / f[8] == pytest.approx((255 / 3) ** 2, rel=1e-9)
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        assert rec.ranges[name] == pytest.approx((float(w.min()), float(w.max())))
    assert "uniform 3-bit weights" in stdout and "fc1.weight" in stdout and "exact Pareto front" in stdout


def test_pareto_files_hold_the_whole_front(generic_run: tuple[Path, str]) -> None:
    out, _ = generic_run
    rec = rec_mod.load(out / "recommendation.json")
    front = json.loads((out / "pareto.json").read_text())
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert len(rows) == len(front["points"]) > 10
    sizes = [int(r["weight_bytes"]) for r in rows]
    avg = [float(r["avg_weight_bits"]) for r in rows]
    fits = [float(r["fit"]) for r in rows]
    # Size up, FIT strictly down: no point of the front dominates another.
    assert sizes == sorted(sizes) and all(a < b for a, b in itertools.pairwise(avg))
    assert all(a > b for a, b in itertools.pairwise(fits))
    chosen = [r for r in rows if r["chosen"] == "1"]
    assert len(chosen) == 1 and int(chosen[0]["weight_bytes"]) == rec.weight_bytes
    assert {n: int(chosen[0][n]) for n in CNN_WEIGHTS} == dict(rec.weight_bits)
    act_fit = fit_of(rec, dict(rec.activation_bits))
    for r in rows[:: max(1, len(rows) // 10)]:
        assert float(r["fit"]) == pytest.approx(fit_of(rec, {n: int(r[n]) for n in CNN_WEIGHTS}) + act_fit, rel=1e-9)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_annotated_model_computes_the_same_and_carries_the_bits(generic_run: tuple[Path, str], cnn_path: Path) -> None:
    out, _ = generic_run
    original = onnx.load(cnn_path)
    annotated = onnx.load(out / "mnist_cnn.annotated.onnx")
    rec = rec_mod.load(out / "recommendation.json")
    held = load_npz(cnn_path.with_name("mnist_cnn.heldout.npz"))
    feed = {"input": held.arrays["input"][:200]}
    for a, b in zip(outputs(original, feed), outputs(annotated, feed), strict=True):
        assert np.array_equal(a, b)
    # Only metadata differs: strip it and the bytes are the original's.
    stripped = onnx.ModelProto()
    stripped.CopyFrom(annotated)
    del stripped.metadata_props[:]
    del stripped.graph.quantization_annotation[:]
    assert stripped.SerializeToString() == original.SerializeToString()
    props = {p.key: p.value for p in annotated.metadata_props}
    assert json.loads(props[METADATA_KEY]) == json.loads((out / "recommendation.json").read_text())
    assert props["fitonnx.target"] == "generic"
    finn = {
        a.tensor_name: {e.key: e.value for e in a.quant_parameter_tensor_names}[FINN_KEY]
        for a in annotated.graph.quantization_annotation
    }
    assert finn == {
        **{n: f"INT{b}" for n, b in rec.weight_bits.items()},  # weights span negative values
        **{n: "UINT8" for n in rec.activation_bits},  # pixels and post-ReLU/pool values are ≥ 0
    }
    assert annotated.ir_version == original.ir_version == 8  # no node metadata below IR 10
    assert all(len(n.metadata_props) == 0 for n in annotated.graph.node)


def tiny(tmp_path: Path, ir_version: int) -> tuple[Path, Path]:
    model = tiny_classifier()
    model.ir_version = ir_version
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(1)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=rng.normal(size=(24, 4)).astype(np.float32), labels=rng.integers(0, 3, 24))
    return path, data


def test_node_metadata_where_the_ir_version_has_it(tmp_path: Path) -> None:
    path, data = tiny(tmp_path, ir_version=10)
    result = api.recommend(path, data, budget=budget_from(avg_bits=4), out_dir=tmp_path / "out")
    rec = result.allocation.recommendation
    annotated = onnx.load(tmp_path / "out" / "tiny.annotated.onnx")
    meta = {n.name: {p.key: json.loads(p.value) for p in n.metadata_props} for n in annotated.graph.node}
    assert meta["mm1"]["fitonnx.weight_bits"] == {"w1": rec.weight_bits["w1"]}
    assert meta["mm1"]["fitonnx.activation_bits"] == {"x": 8}
    assert meta["fc"]["fitonnx.weight_bits"] == {"w2": rec.weight_bits["w2"]}
    assert meta["fc"]["fitonnx.activation_bits"] == {"r": 8}
    assert meta["fc"]["fitonnx.fit"]["w2"] == rec.fit_per_tensor["w2"][rec.weight_bits["w2"]]
    assert meta["relu"] == {}
    feed = {"x": np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)}
    assert np.array_equal(outputs(path, feed)[0], outputs(annotated, feed)[0])


def test_activation_average_budget_is_optimal(tmp_path: Path) -> None:
    path, data = tiny(tmp_path, ir_version=9)
    result = api.recommend(path, data, budget=budget_from(avg_bits=8), choices=AllocationOptions(act_avg_bits=4.5))
    rec = result.allocation.recommendation
    acts = {t.name: t.numel for t in result.report.tensors if t.kind is Kind.ACTIVATION}
    assert set(acts) == {"x", "r"} and set(rec.activation_bits) == {"x", "r"}
    limit = int(4.5 * sum(acts.values()))
    assert sum(acts[n] * b for n, b in rec.activation_bits.items()) <= limit
    best = brute_force_best(rec, acts, list(acts), limit)
    assert fit_of(rec, dict(rec.activation_bits)) == pytest.approx(best, rel=1e-12)
    assert len(set(rec.activation_bits.values())) == 2  # a real mix, not a uniform width


def test_cli_grid_noise_model_is_recorded(tmp_path: Path) -> None:
    path, data = tiny(tmp_path, ir_version=9)
    args = ["recommend", str(path), "--data", str(data), "--avg-bits", "4", "--noise-model", "grid"]
    code, _, err = run(*args, "--out", str(tmp_path / "rec"))
    assert code == 0, err
    rec = rec_mod.load(tmp_path / "rec" / "recommendation.json")
    uniform = api.recommend(path, data, budget=budget_from(avg_bits=4)).allocation.recommendation
    assert rec.noise_model == "grid" and uniform.noise_model == "uniform"
    # r is a ReLU output: the grid model takes the Fisher mass of its zeros out of its trace.
    assert rec.fit_per_tensor["r"][8] < 0.95 * uniform.fit_per_tensor["r"][8]


def test_max_fit_gives_the_smallest_weights_within_it(tmp_path: Path) -> None:
    path, data = tiny(tmp_path, ir_version=9)
    first = api.recommend(path, data, budget=budget_from(avg_bits=4)).allocation.recommendation
    act_fit = fit_of(first, dict(first.activation_bits))
    max_fit = act_fit + fit_of(first, {"w1": 5, "w2": 3}) * 1.0000001
    rec = api.recommend(path, data, budget=budget_from(max_fit=max_fit)).allocation.recommendation
    assert rec.fit <= max_fit
    sizes = {"w1": 24, "w2": 18}
    smallest = min(
        sizes["w1"] * a + sizes["w2"] * b
        for a, b in itertools.product(sorted(rec.fit_per_tensor["w1"]), repeat=2)
        if act_fit + fit_of(rec, {"w1": a, "w2": b}) <= max_fit
    )
    assert sum(sizes[n] * b for n, b in rec.weight_bits.items()) == smallest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "expected exactly one budget among --avg-bits, --size-kb and --max-fit; found none"),
        (("--avg-bits", "4", "--size-kb", "1"), "found --avg-bits, --size-kb"),
        (("--avg-bits", "1.5"), "expected an average of at least 2 bits (all weights at the lowest bits); found 1.5"),
        (("--size-kb", "0.001"), "expected a budget of at least 0.011 KB (all weights at the lowest bits)"),
        (("--avg-bits", "4", "--target", "ort", "--act-bits", "4"), "activation bits among target 'ort'"),
        (("--avg-bits", "4", "--target", "ort", "--weight-bits", "3,4"), "found 3"),
        (("--avg-bits", "4", "--act-bits", "4,8"), "expected one --act-bits width for every activation"),
        (("--avg-bits", "4", "--act-bits", "8", "--act-avg-bits", "6"), "average of at least 8 bits (all activations"),
        (("--max-fit", "1e-30"), "expected --max-fit of at least"),
        (("--avg-bits", "4", "--formats", "--weight-bits", "4"), "--weight-bits choose bit widths; with --formats"),
        (
            ("--avg-bits", "4", "--act-format", "int8", "--act-avg-bits", "6"),
            "--act-avg-bits of at least 8 (the narrow",
        ),
        (("--avg-bits", "4", "--act-format", "int8,fp16"), "expected one --act-format for every activation"),
        (("--avg-bits", "4", "--target", "qnn", "--act-format", "mxfp8/32"), "activation formats among target 'qnn'"),
    ],
)
def test_budget_and_option_errors_are_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    path, data = tiny(tmp_path, ir_version=9)
    code, _, err = run("recommend", str(path), "--data", str(data), "--out", str(tmp_path / "o"), *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_act_bits_is_a_list_of_candidates_with_act_avg_bits(tmp_path: Path) -> None:
    path, data = tiny(tmp_path, ir_version=9)
    code, _, err = run(
        "recommend",
        str(path),
        "--data",
        str(data),
        "-o",
        str(tmp_path / "o"),
        "--avg-bits",
        "4",
        "--act-bits",
        "4,8",
        "--act-avg-bits",
        "6",
    )
    assert code == 0, err
    rec = json.loads((tmp_path / "o" / "recommendation.json").read_text())
    assert set(rec["activation_bits"].values()) <= {4, 8}


def test_out_never_replaces_the_input_model(tmp_path: Path) -> None:
    path, data = tiny(tmp_path, ir_version=9)
    disguised = tmp_path / "pareto.png"  # a model file that happens to have an output's name
    disguised.write_bytes(path.read_bytes())
    before = sha(disguised)
    code, _, err = run("recommend", str(disguised), "--data", str(data), "--avg-bits", "4", "--out", str(tmp_path))
    assert code == 2 and "the folder holds an input of this command (the model)" in err
    assert sha(disguised) == before
    (tmp_path / "afile").write_text("x")
    code, _, err = run("recommend", str(path), "--data", str(data), "--avg-bits", "4", "--out", str(tmp_path / "afile"))
    assert code != 0 and "afile" in err


def accuracy(model: Path, held: dict[str, np.ndarray], labels: np.ndarray) -> float:
    return float((outputs(model, held)[0].argmax(axis=1) == labels).mean())


def test_ort_target_writes_overrides_and_a_qdq_model_that_runs(cnn_path: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType

    out = tmp_path / "ort"
    code, _, err = run(
        "recommend", str(cnn_path), "--size-kb", "30", "--target", "ort", "--max-samples", "64", "--out", str(out)
    )
    assert code == 0, err
    rec = rec_mod.load(out / "recommendation.json")
    assert set(rec.weight_bits.values()) <= {4, 8, 16} and rec.weight_bytes <= 30 * 1024
    overrides = json.loads((out / "ort_overrides.json").read_text())
    for name, bits in rec.weight_bits.items():
        assert QuantType[overrides[name][0]["quant_type"]] is QuantType[f"QInt{bits}"]
    held = load_npz(cnn_path.with_name("mnist_cnn.heldout.npz"))
    feed = {"input": held.arrays["input"]}
    float_acc = accuracy(cnn_path, feed, held.labels)
    qdq_acc = accuracy(out / "mnist_cnn.qdq.onnx", feed, held.labels)
    print(f"held-out accuracy: float {float_acc:.3f}, ort QDQ at {rec.weight_bytes} B weights {qdq_acc:.3f}")
    assert qdq_acc >= float_acc - 0.03


def test_qnn_and_tensorrt_targets_write_their_files(cnn_path: Path, tmp_path: Path) -> None:
    session = api.open_model(cnn_path)
    for target, name in (("qnn", "mnist_cnn.encodings"), ("tensorrt", "mnist_cnn.trt.qdq.onnx")):
        result = api.recommend(
            session,
            budget=budget_from(size_kb=30),
            choices=AllocationOptions(target=target),
            out_dir=tmp_path / target,
            options=FisherOptions(max_samples=32),
        )
        rec = result.allocation.recommendation
        assert (tmp_path / target / name) in result.written.paths
        if target == "qnn":
            doc = json.loads((tmp_path / target / name).read_text())
            assert doc["version"] == "0.6.1"
            assert {n: e[0]["bitwidth"] for n, e in doc["param_encodings"].items() if n in rec.weight_bits} == {
                n: b for n, b in rec.weight_bits.items()
            }
        else:
            held = load_npz(cnn_path.with_name("mnist_cnn.heldout.npz"))
            feed = {"input": held.arrays["input"][:100]}
            assert np.isfinite(outputs(tmp_path / target / name, feed)[0]).all()
            # TensorRT's 16 means float16: its FIT uses float16 spacing, far below int8's.
            f = rec.fit_per_tensor["fc1.weight"]
            assert f[16] < f[8] / 100


def kl_and_accuracy(ref: np.ndarray, z: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    def log_softmax(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64)
        return (
            v
            - v.max(axis=1, keepdims=True)
            - np.log(np.exp(v - v.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True))
        )

    lp, lq = log_softmax(ref), log_softmax(z)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean()), float((z.argmax(axis=1) == labels).mean())


def test_recommended_beats_uniform_and_random_configurations_on_held_out_data(cnn_path: Path) -> None:
    """Issue 4's done-when, measured: fake quantization in onnxruntime on the 1000 held-out samples.

    The bench script bench/recommend_vs_random.py runs the same measurement with more budgets,
    more random configurations and the digits MLP.
    """
    session = api.open_model(cnn_path)
    held = load_npz(cnn_path.with_name("mnist_cnn.heldout.npz")).head(500)
    report = api.score(session, weight_bits=(2, 3, 4, 5, 6, 7, 8, 16))
    acts = {t.name: (t.min, t.max) for t in report.tensors if t.kind is Kind.ACTIVATION}
    output = session.prepared.model.graph.output[0].name
    simulator = simulate.Simulator(
        simulate.build(session.prepared.model, session.tensors, output),
        session.prepared.model,
        session.tensors,
        acts,
        simulate.GridScheme(),
        held,
        session.specs,
        batch_size=500,
    )
    ref = simulator.run(simulate.Config.floating())
    act8 = dict.fromkeys(acts, 8)

    def damage(bits: dict[str, int]) -> tuple[float, float]:
        return kl_and_accuracy(ref, simulator.run(simulate.Config(weight_bits=bits, activation_bits=act8)), held.labels)

    sizes = {n: numels(session.prepared.model)[n] for n in CNN_WEIGHTS}
    total = sum(sizes.values())
    rng = np.random.default_rng(0)
    for avg, uniform_bits in ((3.0, 3), (4.0, 4), (4.5, 4)):
        rec = allocate(report, "generic", Budget(BudgetKind.AVG_BITS, avg)).recommendation
        rec_kl, rec_acc = damage(dict(rec.weight_bits))
        uni_kl, _ = damage(dict.fromkeys(CNN_WEIGHTS, uniform_bits))
        menu = sorted(rec.fit_per_tensor["fc1.weight"])
        same = [
            c
            for c in itertools.product(menu, repeat=4)
            if 0.9 * avg * total <= sum(sizes[n] * b for n, b in zip(CNN_WEIGHTS, c, strict=True)) <= avg * total
            and dict(zip(CNN_WEIGHTS, c, strict=True)) != dict(rec.weight_bits)
        ]
        picked = [same[i] for i in rng.choice(len(same), min(16, len(same)), replace=False)]
        random_kl = np.array([damage(dict(zip(CNN_WEIGHTS, c, strict=True)))[0] for c in picked])
        beaten = float(np.mean(random_kl > rec_kl))
        print(
            f"avg {avg} bits: recommended KL {rec_kl:.4f} acc {rec_acc:.3f}; uniform {uniform_bits}-bit KL {uni_kl:.4f}; "
            f"better than {100 * beaten:.0f}% of {len(picked)} random configurations of the same size"
        )
        if avg == uniform_bits:
            # At 3 and 4 bits the uniform configuration IS the FIT optimum for this model (fc1 holds
            # 96% of the weights): the same configuration, the same damage.
            assert dict(rec.weight_bits) == dict.fromkeys(CNN_WEIGHTS, uniform_bits) and rec_kl == uni_kl
            assert beaten >= 0.8
        else:
            # Between uniform sizes: better than the largest uniform configuration that fits, and
            # than the typical random configuration (they differ little at 4.5 bits: all keep fc1
            # at 4 bits and the small tensors at ≥ 5).
            assert rec_kl < uni_kl
            assert rec_kl <= float(np.median(random_kl))


def test_exports_name_the_original_models_tensors(tmp_path: Path) -> None:
    # The scored twin folds BatchNormalization into its convolutions ('stem.weight+stem_bn');
    # the files a toolchain reads must name the original model's tensors.
    from tests.test_prepare import mobilenet_block

    model = mobilenet_block()
    rng = np.random.default_rng(0)
    data = Dataset({"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)}, rng.integers(0, 5, 16))
    result = api.recommend(
        model, data, budget=budget_from(avg_bits=8), choices=AllocationOptions(target="ort"), out_dir=tmp_path / "out"
    )
    assert any("+" in name for name in result.allocation.recommendation.weight_bits)  # scored folded
    written = rec_mod.load(tmp_path / "out" / "recommendation.json")
    inits = {t.name for t in model.graph.initializer}
    tensors = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    assert set(written.weight_bits) <= inits and set(written.activation_bits) <= tensors
    assert written.scored_as["stem.weight"] == "stem.weight+stem_bn"
    assert set(written.ranges) == set(written.weight_bits) | set(written.activation_bits)
    assert any("named as in the original model" in note for note in result.written.notes)
    qdq = onnx.load(tmp_path / "out" / f"{model.graph.name}.qdq.onnx")
    assert any(n.op_type == "DequantizeLinear" for n in qdq.graph.node)


def test_a_tied_table_is_scored_and_exported_once(tmp_path: Path) -> None:
    # tiny_bert reads its word table by Gather ('word.weight') and, transposed, by MatMul: prepare
    # keeps the Transpose (no folded copy 't'), so one tensor is scored and written.
    zoo = Path(__file__).resolve().parent.parent / "models" / "zoo"
    opts = FisherOptions(fisher="mc", max_samples=4)
    result = api.recommend(
        zoo / "tiny_bert_dynamo.onnx",
        zoo / "tiny_bert_dynamo.calib.npz",
        budget=budget_from(avg_bits=4),
        choices=AllocationOptions(target="ort"),
        out_dir=tmp_path / "out",
        options=opts,
    )
    scored = result.allocation.recommendation.weight_bits
    written = rec_mod.load(tmp_path / "out" / "recommendation.json")
    assert "t" not in scored and "t" not in written.weight_bits
    assert written.weight_bits["word.weight"] == scored["word.weight"]


@pytest.mark.parametrize(
    ("budget", "least", "found"),
    [
        # int4 per output channel, a float32 scale each: w1 [4, 6] (MatMul, 6 channels) 24·4 + 6·32 = 288
        # bits, w2 [3, 6] (Gemm transB, 3 channels) 18·4 + 3·32 = 168: 456 bits over 42 elements.
        (("--avg-bits", "10"), "an average of at least 10.85715 bits", "10"),  # 456/42 = 10.857142..., rounded up
        (("--size-kb", "0.05"), "a budget of at least 0.056 KB", "0.05 KB"),  # 57 bytes = 0.0557 KB
    ],
)
def test_an_infeasible_formats_budget_states_the_minimum_with_scales(
    tmp_path: Path, budget: tuple[str, ...], least: str, found: str
) -> None:
    path, data = tiny(tmp_path, ir_version=9)
    args = ["recommend", str(path), "--data", str(data), "--weight-formats", "int4/ch", "-o", str(tmp_path / "o")]
    code, _, err = run(*args, *budget)
    why = "(all weights in their smallest formats, scales and zero points included)"
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: expected {least} {why}; found {found}"]
    assert not (tmp_path / "o").exists()


def test_the_stated_formats_minimum_is_feasible(tmp_path: Path) -> None:
    path, data = tiny(tmp_path, ir_version=9)
    args = ["recommend", str(path), "--data", str(data), "--weight-formats", "int4/ch", "-o", str(tmp_path / "o")]
    code, _, err = run(*args, "--avg-bits", "10.85715")
    assert code == 0, err
    rec = json.loads((tmp_path / "o" / "recommendation.json").read_text())
    assert rec["weight_bytes"] == 57
