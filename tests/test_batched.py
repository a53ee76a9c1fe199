"""The batched per-sample loop of the ``onnx`` engine against the same engine one sample per run.

Batch-1 and batched runs share no per-sample arithmetic (per-sample weight norms come from each
layer's input and output gradient in the batch, ``autodiff.per_sample_sqnorms``), so equal rows
within 1e-5 relative check the batched path against an independent computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli
from fitonnx.fisher.engine import FisherTraces, StopReason
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import Session, fisher_traces, open_model

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
RTOL = 1e-5
# The onnx engine's onnxruntime (>= 1.20; CI's first environment). onnxruntime 1.19's batched
# kernels round logits differently from its batch-1 ones, and a confidently classified sample's
# loss gradient (p_y - 1) is below float32 resolution, so its per-sample values differ in relative
# terms there (BENCHMARKS.md); its traces still agree, tests/test_engine_agreement.py.
pytestmark = pytest.mark.skipif(
    tuple(int(v) for v in onnxruntime.__version__.split(".")[:2]) < (1, 20), reason="needs onnxruntime >= 1.20"
)


def _both(s: Session, batch: int, **options: object) -> tuple[FisherTraces, FisherTraces]:
    one, _, _ = fisher_traces(s, FisherOptions(engine="onnx", batch_size=1, **options))  # type: ignore[arg-type]
    many, _, _ = fisher_traces(s, FisherOptions(engine="onnx", batch_size=batch, **options))  # type: ignore[arg-type]
    return one, many


def _assert_same(one: FisherTraces, many: FisherTraces, batch: int) -> None:
    assert many.batch_size == batch, many.notes
    assert one.batch_size == 1
    assert many.per_sample.shape == one.per_sample.shape
    assert np.all(one.per_sample > 0)
    rel = np.abs(many.per_sample - one.per_sample) / one.per_sample
    assert rel.max() <= RTOL, (rel.max(), one.tensors[int(np.argmax(rel.max(axis=0)))].name)
    assert one.act_min == pytest.approx(many.act_min, rel=RTOL)
    assert one.act_max == pytest.approx(many.act_max, rel=RTOL)
    assert one.stop_reason == many.stop_reason
    assert one.act_shapes == many.act_shapes


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_bundled_cnn_batched_equals_batch_1(cnn_path: Path, fisher: str) -> None:
    """10 samples at batch 4: two full batches and a padded partial one; MC noise drawn in sample order."""
    s = open_model(cnn_path, cnn_path.with_suffix(".calib.npz"), max_samples=10)
    _assert_same(*_both(s, 4, fisher=fisher, max_samples=10), 4)


def test_bundled_mlp_batched_equals_batch_1(mlp_path: Path) -> None:
    s = open_model(mlp_path, mlp_path.with_suffix(".calib.npz"), max_samples=7)
    _assert_same(*_both(s, 3, max_samples=7), 3)


@pytest.mark.parametrize(
    "name",
    [
        "mbv3_small_ts",  # depthwise and grouped convolutions
        "encoder_two_outputs",  # samples stored whole, a batch axis of 1 inside
        "digits_cnn_jax2onnx",
    ],
)
def test_zoo_batched_equals_batch_1(name: str) -> None:
    path = ZOO / f"{name}.onnx"
    s = open_model(path, path.with_suffix(".calib.npz"), max_samples=5)
    _assert_same(*_both(s, 4, max_samples=5), 4)


def test_a_tied_table_runs_at_batch_1_with_a_note() -> None:
    """tiny_bert's word table is read by its Gather and, transposed, by the output MatMul: one weight
    with two readers, whose per-sample norm the batched form cannot split; it says so and runs at 1."""
    path = ZOO / "tiny_bert_dynamo.onnx"
    s = open_model(path, path.with_suffix(".calib.npz"), max_samples=3)
    many, _, _ = fisher_traces(s, FisherOptions(engine="onnx", batch_size=4, max_samples=3))
    assert many.batch_size == 1
    assert "word.weight" in many.batch_note and not any("word.weight" in note for note in many.notes)


def test_tol_stops_at_the_same_sample(cnn_path: Path) -> None:
    s = open_model(cnn_path, cnn_path.with_suffix(".calib.npz"), max_samples=160)
    one, many = _both(s, 16, tol=0.5, max_samples=160)
    assert one.stop_reason is StopReason.TOL
    assert one.samples < 160 and one.samples % 16 != 0  # stops inside a batch
    _assert_same(one, many, 16)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("encoder_shared_ln_ts", "input 'input_ids' has a fixed batch size of 1"),
        ("shared_layernorm", "expected weight 'tied.w' to be read by one node"),  # tied: norms do not add
    ],
)
def test_models_that_cannot_batch_run_at_batch_1_with_a_note(name: str, why: str) -> None:
    path = ZOO / f"{name}.onnx"
    s = open_model(path, path.with_suffix(".calib.npz"), max_samples=3)
    one, many = _both(s, 4, max_samples=3)
    assert many.batch_size == 1
    assert why in many.batch_note and not any(why in note for note in many.notes), many.notes
    np.testing.assert_array_equal(one.per_sample, many.per_sample)


def test_cli_batch_size_is_checked(cnn_path: Path) -> None:
    result = CliRunner().invoke(cli, ["score", str(cnn_path), "--batch-size", "0"])
    assert result.exit_code == 2
    assert "--batch-size" in result.output


def test_a_fixed_batch_model_says_why_once_beside_the_batch_size(tmp_path: Path) -> None:
    """The reason batching is off is stated once, in the header line with the batch size, not as a
    note repeated among the report's notes (text and JSON)."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "fixed.onnx")
    np.savez(tmp_path / "fixed.npz", x=np.random.default_rng(1).standard_normal((6, 1, 4)).astype(np.float32))
    args = ["score", str(tmp_path / "fixed.onnx"), "--data", str(tmp_path / "fixed.npz"), "--engine", "onnx"]
    result = CliRunner().invoke(cli, [*args, "--output-kind", "y=hidden", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    why = "input 'x' has a fixed batch size of 1"
    assert result.stdout.count(why) == 1
    assert f"batch 1 ({why})" in result.stdout.splitlines()[0]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batch_size"] == 1 and report["batch_note"] == why
    assert not any(why in note for note in report["notes"])


FORMATS = ("int4/ch", "uint4/b32", "fp8e4m3", "fp16", "nvfp4/16", "mxfp8/32")


@pytest.mark.parametrize("fixture", ["cnn_path", "mlp_path"])
def test_format_statistics_batched_equal_batch_1(fixture: str, request: pytest.FixtureRequest) -> None:
    """score --format at batch 4 over 10 samples (a padded last batch: its weight g² totals are the
    masked ones), calibrated on the batched twin, against the batch-1 loop, whose per-sample weight
    gradients come from the batch-1 gradient graph and whose max|a| from batch-1 forwards."""
    from fitonnx.score.run import score_session

    path = request.getfixturevalue(fixture)
    s = open_model(path, path.with_suffix(".calib.npz"), max_samples=10)
    one, many = (
        score_session(s, options=FisherOptions(engine="onnx", batch_size=b, max_samples=10), formats=FORMATS)
        for b in (1, 4)
    )
    assert (one.batch_size, many.batch_size) == (1, 4), many.batch_note
    columns = 0
    for a, b in zip(one.tensors, many.tensors, strict=True):
        assert b.ef_trace == pytest.approx(a.ef_trace, rel=RTOL)
        assert set(a.formats) == set(b.formats)
        for name, fit in a.formats.items():
            assert b.formats[name].expected == pytest.approx(fit.expected, rel=1e-6), (a.name, name)
            if fit.measured is not None:
                assert b.formats[name].measured == pytest.approx(fit.measured, rel=1e-6), (a.name, name)
            columns += 1
    assert columns > 20


def test_tol_with_floating_weight_statistics_runs_at_batch_1(cnn_path: Path) -> None:
    """A weight's g² arrives as one total per batch, so --tol (which may stop inside a batch) runs
    the format statistics one sample per run and says why."""
    s = open_model(cnn_path, cnn_path.with_suffix(".calib.npz"), max_samples=40)
    from fitonnx.score.run import score_session

    report = score_session(s, options=FisherOptions(engine="onnx", batch_size=8, tol=0.5), formats=("fp8e4m3",))
    assert report.batch_size == 1
    assert "--tol" in report.batch_note
