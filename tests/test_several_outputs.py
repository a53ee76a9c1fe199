"""A loss over several outputs (issue 14): every float output enters it with its own likelihood and
the per-sample losses are summed, so the per-sample gradient is the sum of the heads' gradients.

Checked against a float64 numpy twin that draws the same noise in the engine's documented order
(per sample, one draw per head in the order of the model's outputs), against each head scored
alone with --output, and for the runtime (not declared) shapes of the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.cli.main import cli
from fitonnx.errors import FitonnxError
from fitonnx.fisher import losses
from fitonnx.fisher.engines import ENGINES as GRADIENT_ENGINES
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset

RNG = np.random.default_rng(3)
W0 = (RNG.normal(size=(8, 6)) * 0.6).astype(np.float32)
WC = (RNG.normal(size=(6, 5)) * 0.6).astype(np.float32)
WB = (RNG.normal(size=(6, 4)) * 0.6).astype(np.float32)
X = RNG.normal(size=(12, 1, 8)).astype(np.float32)


def two_heads(box_name: str = "boxes", stale: bool = False) -> onnx.ModelProto:
    """x → MatMul w0 → Relu → {MatMul wc → logits [N, 5], MatMul wb → boxes [N, 4]}."""
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("MatMul", ["h", "wc"], ["logits"]),
        helper.make_node("MatMul", ["h", "wb"], [box_name]),
    ]
    logits_shape = [1] if stale else ["N", 5]  # a stale declared shape: rank 1, one "class"
    g = helper.make_graph(
        nodes,
        "two_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits_shape),
            helper.make_tensor_value_info(box_name, TensorProto.FLOAT, ["N", 4]),
        ],
        [numpy_helper.from_array(W0, "w0"), numpy_helper.from_array(WC, "wc"), numpy_helper.from_array(WB, "wb")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _numpy_per_sample(heads: tuple[str, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """‖∂ℓ_i/∂t‖² per sample for the heads in ``heads`` (MC: Gumbel-max labels, Gaussian surrogate)."""
    rng = np.random.default_rng(seed)
    w0, wc, wb = (w.astype(np.float64) for w in (W0, WC, WB))
    rows: dict[str, list[float]] = {k: [] for k in ("x", "h", "w0", "wc", "wb")}
    for x in X.astype(np.float64):
        h0 = x @ w0
        h = np.maximum(h0, 0)
        z = h @ wc
        dz, db = np.zeros_like(z), np.zeros((1, 4))
        for head in heads:
            if head == "logits":
                gumbel = losses.draw_noise(losses.Noise.GUMBEL, (1, 5), rng).astype(np.float64)
                y = int(np.argmax(z + gumbel))
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                dz = p - np.eye(5)[y]
            else:
                # The head's surrogate is Σ ε⊙f (gradient +ε; −ε is as likely, so either sign is the MC
                # Fisher, but the cross term with the other head in one draw depends on it).
                db = losses.draw_noise(losses.Noise.NORMAL, (1, 4), rng).astype(np.float64)
        dh = dz @ wc.T + db @ wb.T
        dh0 = dh * (h0 > 0)
        grads = {"x": dh0 @ w0.T, "h": dh, "w0": x.T @ dh0, "wc": h.T @ dz, "wb": h.T @ db}
        for k, g in grads.items():
            rows[k].append(float(np.sum(g * g)))
    return {k: np.array(v) for k, v in rows.items()}


def _fitonnx_per_sample(model: onnx.ModelProto, **options: object) -> tuple[dict[str, np.ndarray], object]:
    data = Dataset(arrays={"x": X}, source="x")
    traces, _, _ = api.fisher_traces(api.open_model(model, data), FisherOptions(fisher="mc", **options))
    return {t.name: traces.per_sample[:, j] for j, t in enumerate(traces.tensors)}, traces


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(
            "ort-training",
            marks=pytest.mark.skipif(
                not GRADIENT_ENGINES["ort-training"].available(),
                reason="the reference engine needs onnxruntime-training",
            ),
        ),
        "onnx",
    ],
)
def test_two_heads_sum_of_gradients_matches_numpy(engine: str) -> None:
    got, traces = _fitonnx_per_sample(two_heads(), engine=engine)
    want = _numpy_per_sample(("logits", "boxes"))
    assert [t.output for t in traces.targets] == ["logits", "boxes"]
    assert [t.likelihood for t in traces.targets] == [losses.Likelihood.CATEGORICAL, losses.Likelihood.GAUSSIAN]
    for name, values in want.items():
        np.testing.assert_allclose(got[name], values, rtol=2e-4, atol=1e-7, err_msg=name)
    # The trace of the shared trunk is that of the SUM of the heads' gradients, not the sum of traces.
    cls_only, boxes_only = _numpy_per_sample(("logits",)), _numpy_per_sample(("boxes",))
    assert not np.allclose(want["w0"], cls_only["w0"] + boxes_only["w0"], rtol=1e-3)


@pytest.mark.parametrize("head", ["logits", "boxes"])
def test_each_head_alone_with_output(head: str) -> None:
    """--output narrows the loss to one head: its weights match numpy, the other head's are left out."""
    got, traces = _fitonnx_per_sample(two_heads(), output=head)
    want = _numpy_per_sample((head,))
    other = "wb" if head == "logits" else "wc"
    assert other not in got and any(other in n for n in traces.notes)
    for name, values in got.items():
        np.testing.assert_allclose(values, want[name], rtol=2e-4, atol=1e-7, err_msg=name)


def test_box_head_gradient_factorises() -> None:
    """wb sees only the box head: ∂ℓ/∂wb = hᵀε, so its squared norm is ‖h‖²·‖ε‖² per sample."""
    got, _ = _fitonnx_per_sample(two_heads())
    h = np.maximum(X[:, 0].astype(np.float64) @ W0.astype(np.float64), 0)
    rng = np.random.default_rng(0)
    eps = []
    for _ in range(len(X)):
        losses.draw_noise(losses.Noise.GUMBEL, (1, 5), rng)  # the logits head draws first
        eps.append(losses.draw_noise(losses.Noise.NORMAL, (1, 4), rng).astype(np.float64))
    np.testing.assert_allclose(got["wb"], (h * h).sum(1) * np.array([(e * e).sum() for e in eps]), rtol=2e-4)


def test_report_says_how_each_output_is_read(tmp_path: Path) -> None:
    path, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "r.json"
    onnx.save(two_heads("head2"), path)
    np.savez(data, x=X[:, 0])
    result = CliRunner().invoke(cli, ["score", str(path), "--data", str(data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["output"] == "logits+head2" and report["likelihood"] == "categorical+categorical"
    assert any("output 'head2'" in n for n in report["notes"])
    # Saying what head2 is changes its reading and the note says so.
    result = CliRunner().invoke(
        cli, ["score", str(path), "--data", str(data), "--json", str(out), "--output-kind", "head2=boxes"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["likelihood"] == "categorical+gaussian"
    assert any("'head2': gaussian (--output-kind boxes)" in n for n in report["notes"])


def test_runtime_shapes_win_over_stale_declared_ones() -> None:
    """logits declared [1] (one class, rank 1) but really [1, 5]: read as 5 classes, traces non-zero."""
    got, traces = _fitonnx_per_sample(two_heads(stale=True))
    assert traces.targets[0].likelihood is losses.Likelihood.CATEGORICAL and traces.targets[0].class_axis == 1
    want = _numpy_per_sample(("logits", "boxes"))
    np.testing.assert_allclose(got["wc"], want["wc"], rtol=2e-4)
    assert all(v.mean() > 0 for v in got.values())


def test_output_kind_is_checked() -> None:
    with pytest.raises(FitonnxError, match="--output-kind"):
        FisherOptions(output_kinds=("boxes=squares",))
    with pytest.raises(FitonnxError, match="--output-kind"):
        FisherOptions(output_kinds=("boxes",))
    data = Dataset(arrays={"x": X}, source="x")
    with pytest.raises(FitonnxError, match="--output-kind to name model outputs"):
        api.fisher_traces(api.open_model(two_heads(), data), FisherOptions(output_kinds=("nope=boxes",)))


def test_exact_fisher_reads_one_output() -> None:
    """--fisher exact enumerates one output's classes: the first float output, the other head left out."""
    data = Dataset(arrays={"x": X}, source="x")
    traces, _, _ = api.fisher_traces(api.open_model(two_heads(), data), FisherOptions(fisher="exact"))
    assert [t.output for t in traces.targets] == ["logits"]
    assert "wb" not in {t.name for t in traces.tensors} and any("'wb'" in n for n in traces.notes)
