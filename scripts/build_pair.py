"""Build models/pair/: the bundled MNIST CNN as exported by two different frameworks.

* ``cnn_torch.onnx``: ``models/mnist_cnn.onnx`` as it is (PyTorch's TorchScript exporter, NCHW
  input ``[N, 1, 28, 28]``, Linear layers as Gemm with ``transB=1``).
* ``cnn_jax.onnx``: the same network rebuilt in Flax NNX with the same weights and exported by
  jax2onnx: NHWC input ``[N, 28, 28, 1]``, Linear layers as Gemm with ``[in, out]`` weights,
  SAME-padded Convs, Transposes around the conv stack, Flatten as Shape/Gather/Concat/Reshape.

Flax flattens the last feature map in (H, W, C) order where torch flattens (C, H, W), so fc1's
weight columns are permuted to keep the function the same. The script checks that both ONNX
models give the same logits on the held-out split, each fed in its own layout, and fails above
``MAX_ABS_DIFF``.

Calibration data: ``<stem>.calib.npz`` beside each model, the same 256 samples in the same order
with the same labels, NCHW for torch and NHWC for JAX.

Needs (in a separate venv; the project's own venv stays free of JAX)::

    python3 -m venv /tmp/jaxvenv
    /tmp/jaxvenv/bin/pip install jax jaxlib flax jax2onnx onnx onnxruntime

Run from the repository root::

    /tmp/jaxvenv/bin/python scripts/build_pair.py
"""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from flax import nnx
from jax2onnx import to_onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "models" / "mnist_cnn.onnx"
OUT_DIR = ROOT / "models" / "pair"
OPSET = 21  # the newest opset onnxruntime-training 1.19 loads
MAX_ABS_DIFF = 1e-4
C, H, W = 16, 7, 7  # the feature map fc1 reads


class Cnn(nnx.Module):
    """``MnistCnn`` of models/build_models.py in Flax NNX, NHWC."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 8, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), padding="SAME", rngs=rngs)
        self.fc1 = nnx.Linear(C * H * W, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nnx.max_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        return self.fc2(x)


def torch_weights() -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(SOURCE)).graph.initializer}


def flax_cnn(w: dict[str, np.ndarray]) -> Cnn:
    """The Flax network carrying torch's weights: OIHW -> HWIO kernels, [out, in] -> [in, out]."""
    net = Cnn(nnx.Rngs(0))
    net.conv1.kernel.value = jnp.asarray(w["conv1.weight"].transpose(2, 3, 1, 0))
    net.conv1.bias.value = jnp.asarray(w["conv1.bias"])
    net.conv2.kernel.value = jnp.asarray(w["conv2.weight"].transpose(2, 3, 1, 0))
    net.conv2.bias.value = jnp.asarray(w["conv2.bias"])
    # torch's column index is c·H·W + h·W + w; Flax's row index is h·W·C + w·C + c.
    fc1 = w["fc1.weight"].reshape(64, C, H, W).transpose(2, 3, 1, 0).reshape(C * H * W, 64)
    net.fc1.kernel.value = jnp.asarray(fc1)
    net.fc1.bias.value = jnp.asarray(w["fc1.bias"])
    net.fc2.kernel.value = jnp.asarray(w["fc2.weight"].T)
    net.fc2.bias.value = jnp.asarray(w["fc2.bias"])
    return net


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def main() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    torch_path, jax_path = OUT_DIR / "cnn_torch.onnx", OUT_DIR / "cnn_jax.onnx"
    shutil.copyfile(SOURCE, torch_path)
    net = flax_cnn(torch_weights())
    model = to_onnx(
        net, [("batch", 28, 28, 1)], opset=OPSET, model_name="cnn_jax", input_names=["input"], output_names=["logits"]
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(jax_path))

    with np.load(SOURCE.with_name("mnist_cnn.calib.npz"), allow_pickle=False) as calib:
        x, y = calib["input"], calib["labels"]
    np.savez_compressed(OUT_DIR / "cnn_torch.calib.npz", input=x, labels=y)
    np.savez_compressed(OUT_DIR / "cnn_jax.calib.npz", input=nhwc(x), labels=y)

    with np.load(SOURCE.with_name("mnist_cnn.heldout.npz"), allow_pickle=False) as heldout:
        hx, hy = heldout["input"], heldout["labels"]
    a, b = logits(torch_path, hx), logits(jax_path, nhwc(hx))
    eager = np.asarray(net(jnp.asarray(nhwc(hx))))
    diff, diff_eager = float(np.abs(a - b).max()), float(np.abs(eager - b).max())
    print(
        f"jax {version('jax')}, flax {version('flax')}, jax2onnx {version('jax2onnx')}, onnx {version('onnx')}, "
        f"onnxruntime {version('onnxruntime')}"
    )
    print(
        f"held-out {len(hy)}: max |torch onnx - jax onnx| = {diff:.3g}, max |jax eager - jax onnx| = "
        f"{diff_eager:.3g}, accuracy torch {np.mean(a.argmax(1) == hy):.4f}, jax {np.mean(b.argmax(1) == hy):.4f}, "
        f"same argmax {np.mean(a.argmax(1) == b.argmax(1)):.4f}"
    )
    if diff >= MAX_ABS_DIFF or diff_eager >= MAX_ABS_DIFF:
        raise SystemExit(f"the exports differ: {diff} (torch vs jax onnx), {diff_eager} (jax eager vs onnx)")


if __name__ == "__main__":
    main()
