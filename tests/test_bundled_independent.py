"""The bundled models' per-sample traces against a hand-written numpy float64 forward and backward pass.

The backward pass is written out by hand (softmax cross-entropy, Gemm, Relu, MaxPool routed to
its window's argmax, Conv by im2col and its transpose), independent of onnxruntime, and gives
‖∂ℓ_i/∂t‖² for every weight and activation fitonnx reports, on the first calibration samples.

Float32 limit: onnxruntime forms ∂ℓ/∂z = softmax(z) − onehot(y) in float32, so each component
carries an absolute error of a few float32 epsilons (measured: 1–2.3e-7). On a confidently right
sample ‖∂ℓ/∂z‖ is far smaller than that (down to 1e-9 here), and its per-sample norms are noise in
relative terms, though negligible in the trace. Per-sample values are therefore compared at RTOL
where ‖∂ℓ/∂z‖ ≥ RESOLVED = 1e4·ε32 (relative error of g ≲ 2e-4, of ‖g‖² ≲ 4e-4), and elsewhere
in absolute terms against the tensor's trace; the traces themselves at RTOL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

import fitonnx
from fitonnx.model.data import load_npz
from tests.models import softmax

MODELS = Path(__file__).resolve().parent.parent / "models"
SAMPLES = 64
RTOL = 1e-3
RESOLVED = 1e4 * float(np.finfo(np.float32).eps)
NEGLIGIBLE = 1e-6  # of the trace: bound for samples below float32 resolution


@dataclass(frozen=True)
class Reference:
    """Per-sample squared gradient norms by tensor name, the logits and ‖∂ℓ/∂z‖, from the numpy pass."""

    sqnorms: dict[str, np.ndarray]  # name -> [samples]
    logits: np.ndarray
    loss_grad_norm: np.ndarray  # [samples]


def load(stem: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Float64 initializers, the first SAMPLES calibration inputs and their labels."""
    model = onnx.load(str(MODELS / f"{stem}.onnx"))
    params = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    with np.load(MODELS / f"{stem}.calib.npz", allow_pickle=False) as npz:
        return params, npz["input"][:SAMPLES].astype(np.float64), npz["labels"][:SAMPLES]


def sq(g: np.ndarray) -> np.ndarray:
    """Per-sample squared norm of a gradient batch [samples, ...]."""
    return np.sum(g.reshape(len(g), -1) ** 2, axis=1)


def ce_grad(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∂/∂z of softmax cross-entropy against integer labels: softmax(z) − onehot(y)."""
    return softmax(z, axis=1) - np.eye(z.shape[1])[y]


def gemm_backward(g_out: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For out = x·wᵀ + b (Gemm transB=1): per-sample ∂/∂w [samples, out, in] and ∂/∂x."""
    return np.einsum("no,ni->noi", g_out, x), g_out @ w


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Conv, stride 1, pad 1, by im2col; returns the output and the columns for the backward."""
    cols = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))  # n c i j p q
    return np.einsum("ncijpq,ocpq->noij", cols, w) + b[None, :, None, None], cols


def conv_backward(g_out: np.ndarray, cols: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample ∂/∂w [samples, o, c, 3, 3] and ∂/∂x (col2im: scatter-add each tap's contribution)."""
    g_w = np.einsum("noij,ncijpq->nocpq", g_out, cols)
    n, _, h, wd = g_out.shape
    g_pad = np.zeros((n, w.shape[1], h + 2, wd + 2))
    for p in range(3):
        for q in range(3):
            g_pad[:, :, p : p + h, q : q + wd] += np.einsum("noij,oc->ncij", g_out, w[:, :, p, q])
    return g_w, g_pad[:, :, 1:-1, 1:-1]


def maxpool_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2×2 MaxPool, stride 2; returns the output and each window's argmax (0..3, first maximum)."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    return windows.max(axis=-1), windows.argmax(axis=-1)


def maxpool_backward(g_out: np.ndarray, argmax: np.ndarray) -> np.ndarray:
    """Route each window's gradient to the element that was its maximum."""
    n, c, h, w = g_out.shape
    routed = np.eye(4)[argmax] * g_out[..., None]  # n c h w 4
    return routed.reshape(n, c, h, w, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h, 2 * w)


def digits_mlp_reference(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Reference:
    w1, w2, w3 = params["fc1.weight"], params["fc2.weight"], params["fc3.weight"]
    a1 = x @ w1.T + params["fc1.bias"]
    h1 = np.maximum(a1, 0)
    a2 = h1 @ w2.T + params["fc2.bias"]
    h2 = np.maximum(a2, 0)
    z = h2 @ w3.T + params["fc3.bias"]
    g_z = ce_grad(z, y)
    g_w3, g_h2 = gemm_backward(g_z, h2, w3)
    g_w2, g_h1 = gemm_backward(g_h2 * (a2 > 0), h1, w2)
    g_w1, g_x = gemm_backward(g_h1 * (a1 > 0), x, w1)
    grads = {
        "input": g_x,
        "fc1.weight": g_w1,
        "/relu/Relu_output_0": g_h1,
        "fc2.weight": g_w2,
        "/relu_1/Relu_output_0": g_h2,
        "fc3.weight": g_w3,
    }
    return Reference({k: sq(v) for k, v in grads.items()}, z, np.linalg.norm(g_z, axis=1))


def mnist_cnn_reference(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Reference:
    c1, cols1 = conv_forward(x, params["conv1.weight"], params["conv1.bias"])
    p1, arg1 = maxpool_forward(np.maximum(c1, 0))
    c2, cols2 = conv_forward(p1, params["conv2.weight"], params["conv2.bias"])
    p2, arg2 = maxpool_forward(np.maximum(c2, 0))
    f = p2.reshape(len(x), -1)
    a3 = f @ params["fc1.weight"].T + params["fc1.bias"]
    h3 = np.maximum(a3, 0)
    z = h3 @ params["fc2.weight"].T + params["fc2.bias"]
    g_z = ce_grad(z, y)
    g_fc2, g_h3 = gemm_backward(g_z, h3, params["fc2.weight"])
    g_fc1, g_f = gemm_backward(g_h3 * (a3 > 0), f, params["fc1.weight"])
    g_c2 = maxpool_backward(g_f.reshape(p2.shape), arg2) * (c2 > 0)
    g_conv2, g_p1 = conv_backward(g_c2, cols2, params["conv2.weight"])
    g_c1 = maxpool_backward(g_p1, arg1) * (c1 > 0)
    g_conv1, g_x = conv_backward(g_c1, cols1, params["conv1.weight"])
    grads = {
        "input": g_x,
        "conv1.weight": g_conv1,
        "/pool/MaxPool_output_0": g_p1,
        "conv2.weight": g_conv2,
        "/flatten/Flatten_output_0": g_f,
        "fc1.weight": g_fc1,
        "/relu_2/Relu_output_0": g_h3,
        "fc2.weight": g_fc2,
    }
    return Reference({k: sq(v) for k, v in grads.items()}, z, np.linalg.norm(g_z, axis=1))


EXPECTED = {
    "digits_mlp": (
        digits_mlp_reference,
        {
            ("input", "activation"),
            ("fc1.weight", "weight"),
            ("/relu/Relu_output_0", "activation"),
            ("fc2.weight", "weight"),
            ("/relu_1/Relu_output_0", "activation"),
            ("fc3.weight", "weight"),
        },
    ),
    "mnist_cnn": (
        mnist_cnn_reference,
        {
            ("input", "activation"),
            ("conv1.weight", "weight"),
            ("/pool/MaxPool_output_0", "activation"),
            ("conv2.weight", "weight"),
            ("/flatten/Flatten_output_0", "activation"),
            ("fc1.weight", "weight"),
            ("/relu_2/Relu_output_0", "activation"),
            ("fc2.weight", "weight"),
        },
    ),
}


@pytest.mark.parametrize("stem", list(EXPECTED))
def test_bundled_per_sample_traces_match_manual_backprop(stem: str) -> None:
    reference_fn, expected_tensors = EXPECTED[stem]
    params, x, y = load(stem)
    ref = reference_fn(params, x, y)

    import onnxruntime as ort

    session = ort.InferenceSession(str(MODELS / f"{stem}.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x.astype(np.float32)})[0]
    np.testing.assert_allclose(ref.logits, logits, rtol=0, atol=1e-4 * np.abs(logits).max())  # same function

    data = load_npz(MODELS / f"{stem}.calib.npz").head(SAMPLES)
    traces, target, mode = fitonnx.fisher_traces(fitonnx.open_model(MODELS / f"{stem}.onnx", data))
    assert mode.value == "empirical" and target.likelihood.value == "categorical" and target.tap == "logits"
    names = [t.name for t in traces.tensors]
    assert len(names) == len(set(names))
    assert {(t.name, t.kind.value) for t in traces.tensors} == expected_tensors
    assert traces.per_sample.shape == (SAMPLES, len(expected_tensors))

    want = np.stack([ref.sqnorms[name] for name in names], axis=1)
    got = traces.per_sample
    assert np.all(want > 0)
    np.testing.assert_allclose(got.mean(axis=0), want.mean(axis=0), rtol=RTOL)  # the traces
    resolved = ref.loss_grad_norm >= RESOLVED
    assert resolved.sum() >= 10, "too few samples above float32 resolution to test per-sample values"
    err = np.abs(got[resolved] - want[resolved]) / want[resolved]
    np.testing.assert_allclose(got[resolved], want[resolved], rtol=RTOL, err_msg=f"max rel err {err.max():.2e}")
    off = np.abs(got[~resolved] - want[~resolved]) / want.mean(axis=0)
    assert np.all(off <= NEGLIGIBLE), f"unresolved samples off by {off.max():.2e} of the trace"
