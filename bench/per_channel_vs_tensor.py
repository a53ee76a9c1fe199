"""Per channel against per tensor at the same weight-size budget: the measured KL of the exported models.

For each model and ``--size-kb`` budget: ``recommend --formats --target qnn`` twice, once among the
per-tensor symmetric formats (int4, int8, int16) and once among the per-channel ones (int4/ch,
int8/ch, int16/ch; their scales counted in the budget), activations uint8. Each recommendation is
exported as a QDQ model (``export --format qdq``) and run in onnxruntime (unoptimized, the Q/DQ
semantics as written) on the evaluation data; damage is the mean KL(float ‖ quantized) of the
softmax of the first output, computed here in numpy.

    python bench/per_channel_vs_tensor.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from fitonnx import api
from fitonnx.allocate.formats_alloc import FormatOptions
from fitonnx.allocate.knapsack import budget_from
from fitonnx.export import export_recommendation
from fitonnx.model import graph
from fitonnx.model.data import load_npz

MODELS = Path(__file__).resolve().parent.parent / "models"
CASES = (  # model, calibration, evaluation, budgets in KB
    ("mnist_cnn.onnx", "mnist_cnn.calib.npz", "mnist_cnn.heldout.npz", (26.0, 27.5, 30.0)),
    (
        "zoo/digits_cnn_jax2onnx.onnx",
        "zoo/digits_cnn_jax2onnx.calib.npz",
        "zoo/digits_cnn_jax2onnx.calib.npz",
        (5.6, 7.0, 9.0),
    ),
)
MENUS = {"per-tensor": ("int4", "int8", "int16"), "per-channel": ("int4/ch", "int8/ch", "int16/ch")}


def kl(p: np.ndarray, q: np.ndarray) -> float:
    lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def run(path: str | Path, feed: dict[str, np.ndarray], output: str) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run([output], feed)[0].astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for model, calib, evaluation, budgets in CASES:
        path = MODELS / model
        proto = onnx.load(path)
        data = load_npz(MODELS / evaluation)
        feed = {k: v for k, v in data.arrays.items() if k in graph.input_specs(proto)}
        output = proto.graph.output[0].name
        floating = run(path, feed, output)
        for kb in budgets:
            for label, menu in MENUS.items():
                with tempfile.TemporaryDirectory() as tmp:
                    result = api.recommend(
                        path,
                        MODELS / calib,
                        budget=budget_from(size_kb=kb),
                        choices=FormatOptions("qnn", weight_formats=menu),
                        out_dir=Path(tmp) / "rec",
                    )
                    assert result.written is not None and result.written.recommendation is not None
                    rec = result.written.recommendation
                    exported = export_recommendation(path, rec, "qdq", Path(tmp) / "q.onnx", data=data).path
                    damage = kl(floating, run(exported, feed, output))
                row = {
                    "model": model,
                    "size_kb": kb,
                    "menu": label,
                    "weight_bytes": rec.weight_bytes,
                    "fit": rec.fit,
                    "kl": damage,
                    "formats": dict(rec.weight_formats),
                }
                rows.append(row)
                print(f"{model} ≤{kb} KB {label:<11} {rec.weight_bytes:>7} B  FIT {rec.fit:.4g}  KL {damage:.4g}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
