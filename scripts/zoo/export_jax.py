"""Train a small Flax NNX CNN on the 8x8 digits and convert it with jax2onnx into models/zoo/.

``digits_cnn_jax2onnx.onnx``: NHWC input ``input`` [B, 8, 8, 1] (JAX's own layout; the ONNX graph
transposes it), Conv(1->16, 3x3)-BatchNorm-ReLU, Conv(16->32, 3x3, stride 2)-BatchNorm-ReLU, flatten,
Linear(512->10) logits. Trained by this script (optax adam, 300 steps, fixed seed) on 1437 digits;
BatchNorm in inference form. Its value_info carries stale NHWC shapes from jax2onnx's layout pass
(kept: fitonnx must not trust value_info blindly). Exported at jax2onnx's DEFAULT opset (23), as a user would, which is
above what onnxruntime-training 1.19.2 runs (21): the model tests opset down-conversion.

Also writes ``digits_cnn_jax2onnx.calib.npz``: ``input`` float32 [64, 8, 8, 1] (pixels / 16) from the
held-out digits and ``labels`` int64 [64]; prints held-out accuracy in onnxruntime and the max
difference between onnxruntime and JAX.

Needs /work/zoovenv with ``pip install jax2onnx`` (brings jax, jaxlib, flax, optax; about 600 MB).
Run: ``/work/zoovenv/bin/python scripts/zoo/export_jax.py``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import optax
from flax import nnx
from jax2onnx import to_onnx
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_common

SEED = 0
TRAIN = 1437
CALIB = 64
STEPS = 300
BATCH = 64


class DigitsCnn(nnx.Module):
    """Two Conv-BN-ReLU blocks and a linear classifier over NHWC 8x8 images."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.bn2 = nnx.BatchNorm(32, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.reshape(x.shape[0], -1))


def main() -> None:
    warnings.filterwarnings("ignore")
    digits = load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    x = (digits.images[order] / 16.0).astype(np.float32)[..., None]
    y = digits.target[order].astype(np.int64)
    model = DigitsCnn(nnx.Rngs(SEED))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model: DigitsCnn, optimizer: nnx.Optimizer, xb: jax.Array, yb: jax.Array) -> jax.Array:
        def loss_fn(m: DigitsCnn) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(SEED)
    model.train()
    for _ in range(STEPS):
        pick = rng.integers(0, TRAIN, BATCH)
        step(model, optimizer, jnp.asarray(x[pick]), jnp.asarray(y[pick]))
    model.eval()

    onnx_model = to_onnx(
        model, [("B", 8, 8, 1)], model_name="digits_cnn", input_names=["input"], output_names=["logits"]
    )
    # Structural check only: jax2onnx 0.17.1 leaves stale NHWC shapes in value_info after its layout
    # pass (e.g. Relu annotated [B, 8, 8, 16] on an NCHW tensor), which full_check's shape inference rejects.
    # The file is kept as the exporter wrote it; onnxruntime runs it and matches JAX (checked below).
    onnx.checker.check_model(onnx_model)
    out = zoo_common.ZOO / "digits_cnn_jax2onnx.onnx"
    out.write_bytes(onnx_model.SerializeToString())
    heldout_x, heldout_y = x[TRAIN:], y[TRAIN:]
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": heldout_x})[0]
    diff = float(np.abs(logits - np.asarray(model(jnp.asarray(heldout_x)))).max())
    opsets = [(o.domain or "ai.onnx", o.version) for o in onnx_model.opset_import]
    print(
        f"  wrote {out.relative_to(zoo_common.REPO)} ({out.stat().st_size / 1e3:.0f} kB), opsets {opsets}, "
        f"held-out accuracy {np.mean(logits.argmax(1) == heldout_y):.4f}, max |ort - jax| = {diff:.1e}"
    )
    zoo_common.save_npz(
        zoo_common.ZOO / "digits_cnn_jax2onnx.calib.npz", {"input": heldout_x[:CALIB], "labels": heldout_y[:CALIB]}
    )


if __name__ == "__main__":
    main()
