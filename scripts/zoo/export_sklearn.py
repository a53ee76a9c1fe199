"""Fit a scikit-learn pipeline on the 8x8 digits and convert it with skl2onnx into models/zoo/.

``digits_skl2onnx.onnx``: ``Pipeline(StandardScaler, MLPClassifier(hidden_layer_sizes=(64, 32)))``
fitted by scikit-learn (default adam solver, fixed seed) on 1437 of the 1797 digits, converted by
skl2onnx with ``zipmap=False`` (the usual deployment choice: a plain [N, 10] probability tensor
instead of a sequence of maps). The graph starts with ``ai.onnx.ml`` Scaler, then MatMul/Add/Relu
layers and a Softmax; its FIRST output is ``label`` (int64 argmax), the second ``probabilities``.

Needs::

    /work/zoovenv/bin/pip install scikit-learn skl2onnx onnx onnxruntime

Run from anywhere: ``/work/zoovenv/bin/python scripts/zoo/export_sklearn.py``. It also writes
``digits_skl2onnx.calib.npz`` (input ``X`` (skl2onnx's default name) float32 [64, 64] raw pixel counts 0-16 from the held-out
360 digits, ``labels`` int64 [64]) and prints the held-out accuracy of onnxruntime's labels.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_common

SEED = 0
TRAIN = 1437
CALIB = 64


def main() -> None:
    warnings.filterwarnings("ignore")
    digits = load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    x = digits.data[order].astype(np.float32)
    y = digits.target[order].astype(np.int64)
    pipeline = Pipeline(
        [
            ("scale", StandardScaler()),
            ("mlp", MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300, random_state=SEED)),
        ]
    )
    pipeline.fit(x[:TRAIN], y[:TRAIN])
    model = to_onnx(pipeline, x[:1], options={MLPClassifier: {"zipmap": False}})
    onnx.checker.check_model(model, full_check=True)
    out = zoo_common.ZOO / "digits_skl2onnx.onnx"
    out.write_bytes(model.SerializeToString())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    heldout_x, heldout_y = x[TRAIN:], y[TRAIN:]
    labels, probabilities = session.run(["label", "probabilities"], {"X": heldout_x})
    sklearn_probabilities = pipeline.predict_proba(heldout_x)
    print(
        f"  wrote {out.relative_to(zoo_common.REPO)} ({out.stat().st_size / 1e3:.0f} kB), opsets "
        f"{[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]}, held-out accuracy {np.mean(labels == heldout_y):.4f}, "
        f"max |ort - sklearn| = {np.abs(probabilities - sklearn_probabilities).max():.1e}"
    )
    zoo_common.save_npz(
        zoo_common.ZOO / "digits_skl2onnx.calib.npz", {"X": heldout_x[:CALIB], "labels": heldout_y[:CALIB]}
    )


if __name__ == "__main__":
    main()
