"""Real models nobody on the team trained (models/zoo/), scored end to end from the command line.

Each is checked against scripts/zoo/zoo_inventory.py, an independent count (onnx only) of the
constants that Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/Gather read: every one must be reported
(alone or as part of a folded weight "w+bn"), and every trace must be finite.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "models" / "zoo"


def _inventory():
    spec = importlib.util.spec_from_file_location("zoo_inventory", ROOT / "scripts" / "zoo" / "zoo_inventory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("zoo_inventory", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.inventory


# Options a model needs beyond --data: skl2onnx's first output is the int64 label (fitonnx skips
# non-float outputs by itself; the option is kept to exercise --output).
EXTRA: dict[str, tuple[str, ...]] = {"digits_skl2onnx": ("--output", "probabilities")}
# silero_vad switches on its sample-rate input; the calibration data is 16 kHz, so the 8 kHz
# branch is not taken and its weights cannot be scored (the prepare stage says so).
UNTAKEN_PREFIX: dict[str, str] = {"silero_vad": "If_0_else_branch"}

# How each model's output is read (losses.resolve_output): silero's speech probability is a mean
# of sigmoids (Bernoulli on probabilities), DBNet's map a Sigmoid, the rest class scores.
LIKELIHOOD: dict[str, str] = {
    "digits_cnn_jax2onnx": "categorical",
    "digits_skl2onnx": "categorical",
    "gru_charlm_dynamo": "categorical",
    "mbv3_small_ts": "categorical",
    "ppocr_cls_mbv3": "categorical",
    "ppocrv4_det_dbnet": "bernoulli",
    "ppocrv4_rec_svtr": "categorical",
    # issue 14's kinds (scripts/zoo/export_kinds.py): a loss over every float output, '+'-joined.
    "ctc_stale_shape": "categorical",
    "detector_two_heads": "categorical+gaussian",
    "encoder_two_outputs": "gaussian+gaussian",
    "encoder_shared_ln_dynamo": "gaussian+gaussian",
    "encoder_shared_ln_ts": "gaussian+gaussian",
    "qdq_mlp": "categorical",
    "shared_layernorm": "categorical",
    "silero_vad": "bernoulli",
    "silero_vad_16k_op15": "bernoulli",
    "silero_vad_16k_sequence": "bernoulli",
    "tiny_bert_dynamo": "categorical",
}

# The inventory counts float stored tensors; a QDQ weight's only one is its scale, and fitonnx reports
# the float weight DequantizeLinear computes from it (named after the DequantizeLinear's output).
ROOT_ALIASES: dict[str, dict[str, str]] = {"qdq_mlp": {"w1_scale": "w1_dq", "w2_scale": "w2_dq"}}

MODELS = sorted(p.stem for p in ZOO.glob("*.onnx"))


def test_zoo_is_there() -> None:
    assert len(MODELS) >= 8


def test_integer_op_model_is_refused_naming_the_ops() -> None:
    name = "refused/matmulinteger_mlp"
    args = ["score", str(ZOO / f"{name}.onnx"), "--data", str(ZOO / f"{name}.calib.npz")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "found integer ops DynamicQuantizeLinear ×2, MatMulInteger ×2" in result.stderr


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_scores_every_weight(name: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["score", str(ZOO / f"{name}.onnx"), "--data", str(ZOO / f"{name}.calib.npz"), "--fisher", "mc"]
    result = CliRunner().invoke(cli, [*args, "--max-samples", "4", "--json", str(out), *EXTRA.get(name, ())])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    tensors = report["tensors"]
    assert all(math.isfinite(t["ef_trace"]) and t["ef_trace"] >= 0 for t in tensors)
    # A loss that does not depend on the tensors (a softmax over one class) gives traces of exactly 0.
    assert report["likelihood"] == LIKELIHOOD[name] and sum(t["ef_trace"] for t in tensors) > 0
    assert any(t["kind"] == "activation" for t in tensors)
    reported = {part for t in tensors if t["kind"] == "weight" for part in t["name"].split("+")}
    expected = {ROOT_ALIASES.get(name, {}).get(r, r) for r in _inventory()(onnx.load(ZOO / f"{name}.onnx")).roots}
    untaken = UNTAKEN_PREFIX.get(name)
    missing = {r for r in expected - reported if not (untaken and r.startswith(untaken))}
    assert not missing, f"weights not reported: {sorted(missing)}"


# Each exercises an export failure found on the zoo: BatchNormalization folded in the scored twin
# (names), an If body reading outer weights (pruning), a tied table and opset-21 QLinearMatMul
# (TensorRT check), a classifier ending in Softmax (onnxruntime's quantizer).
EXPORTS = [
    ("mbv3_small_ts", "ort"),
    ("silero_vad_16k_op15", "ort"),
    ("tiny_bert_dynamo", "tensorrt"),
    ("digits_skl2onnx", "ort"),
    ("ppocrv4_det_dbnet", "qnn"),
]


@pytest.mark.parametrize(("name", "target"), EXPORTS)
def test_zoo_model_recommends_and_exports(name: str, target: str, tmp_path: Path) -> None:
    args = ["recommend", str(ZOO / f"{name}.onnx"), "--data", str(ZOO / f"{name}.calib.npz"), "--fisher", "mc"]
    args += ["--max-samples", "4", "--avg-bits", "4", "--target", target, "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [*args, *EXTRA.get(name, ())])
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "out" / "recommendation.json").read_text())
    original = onnx.load(ZOO / f"{name}.onnx")
    g = original.graph
    names = {t.name for t in g.initializer} | {v.name for v in g.input} | {o for n in g.node for o in n.output}
    assert set(rec["weight_bits"]) | set(rec["activation_bits"]) <= names


def test_a_model_onnxruntime_cannot_load_is_refused_in_one_line(tmp_path: Path) -> None:
    args = ["recommend", str(ZOO / "digits_cnn_jax2onnx.onnx"), "--data", str(ZOO / "digits_cnn_jax2onnx.calib.npz")]
    result = CliRunner().invoke(
        cli, [*args, "--max-samples", "4", "--avg-bits", "4", "--target", "ort", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "expected a model this onnxruntime loads (opset <= 21" in result.stderr and "found opset 23" in result.stderr


def test_per_channel_validation_falls_back_per_tensor_where_channels_are_unknown() -> None:
    # The unrolled GRU's recurrent weight reaches its MatMul through Slice/Transpose: its output
    # channels are not known, so it is quantized per tensor (and the report says so), not refused.
    from fitonnx.analysis.harness import SimulationOptions
    from fitonnx.analysis.validate import SamplingOptions, validate
    from fitonnx.fisher.options import FisherOptions

    calib = ZOO / "gru_charlm_dynamo.calib.npz"
    opts = FisherOptions(fisher="mc", max_samples=8)
    report = validate(
        ZOO / "gru_charlm_dynamo.onnx",
        calib,
        calib,
        simulation=SimulationOptions(per_channel=True),
        sampling=SamplingOptions(configs=4, resamples=0),
        options=opts,
    )
    assert any("'gru.weight_hh_l0'" in note and "per tensor" in note for note in report.notes)
    assert report.scheme.per_channel and len(report.configs) == 10
