"""Per channel against per tensor at the same weight-size budget: the measured KL of the exported models.

For each model and ``--size-kb`` budget: ``recommend --formats --target qnn`` twice, once among the
per-tensor symmetric formats (int4, int8, int16) and once among the per-channel ones (int4/ch,
int8/ch, int16/ch; their scales counted in the budget), activations uint8. Each recommendation is
exported as a QDQ model (``export --format qdq``, activation ranges from the calibration data) and
run in onnxruntime (unoptimized, the Q/DQ semantics as written) on the evaluation data; damage is
the mean KL(float ‖ quantized) of the first output (read as logits, class probabilities or a
Bernoulli probability), computed here in numpy. ``--data DIR`` adds real trained zoo models with
the realistic sets of ``scripts/data/build_data.py --scale 4 --out DIR`` (held-out split evaluated).

    python bench/per_channel_vs_tensor.py [--data DIR] [--json OUT]
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
CASES = (  # model, calibration, evaluation, budgets in KB, how the first output is read
    ("mnist_cnn.onnx", "mnist_cnn.calib.npz", "mnist_cnn.heldout.npz", (26.0, 27.5, 30.0), "logits"),
    (
        "zoo/digits_cnn_jax2onnx.onnx",
        "zoo/digits_cnn_jax2onnx.calib.npz",
        "zoo/digits_cnn_jax2onnx.calib.npz",
        (5.6, 7.0, 9.0),
        "logits",
    ),
)
# Real trained models (authors' weights) with realistic data from scripts/data/build_data.py (--data DIR).
REAL = (
    ("ppocr_cls_mbv3", (75.0, 85.0, 100.0), "probabilities"),
    ("silero_vad_16k_op15", (155.0, 175.0, 200.0), "bernoulli"),
    # 1.16 M weights: all int4 is 568.5 KB per tensor, 598.0 KB per channel; all int8 1137 KB
    ("ppocrv4_det_dbnet", (640.0, 750.0, 900.0), "bernoulli"),
)
MENUS = {
    "per-tensor": ("int4", "int8", "int16"),
    "per-channel": ("int4/ch", "int8/ch", "int16/ch"),
    # each weight per tensor or per channel, whichever the knapsack finds worth its scales
    "either": ("int4", "int8", "int16", "int4/ch", "int8/ch", "int16/ch"),
}


def kl(p: np.ndarray, q: np.ndarray, kind: str = "logits") -> float:
    """Mean KL(float ‖ quantized) of the output read as logits (softmax), class probabilities, or a
    Bernoulli probability per element."""
    if kind == "bernoulli":
        a, b = np.clip(p, 1e-7, 1 - 1e-7), np.clip(q, 1e-7, 1 - 1e-7)
        per = a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))
        return float(np.mean(per.reshape(per.shape[0], -1).sum(-1)))
    if kind == "probabilities":
        lp, lq = np.log(np.clip(p, 1e-12, 1)), np.log(np.clip(q, 1e-12, 1))
    else:
        lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
        lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def run(path: str | Path, feeds: list[dict[str, np.ndarray]], output: str) -> np.ndarray:
    """The output over all samples (``feeds``: one batch, or one feed per sample), stacked on axis 0."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([output], feed)[0].astype(np.float64) for feed in feeds], axis=0)


def feeds_of(proto: onnx.ModelProto, data) -> list[dict[str, np.ndarray]]:
    """One feed of every sample, or one feed per sample when the data stacks per-sample inputs."""
    specs = graph.input_specs(proto)
    if any(data.arrays[name].ndim == spec.rank + 1 for name, spec in specs.items()):
        return [data.sample(i, specs) for i in range(data.num_samples)]
    return [{k: v for k, v in data.arrays.items() if k in specs}]


def cases(zoo_data: Path | None) -> list[tuple[Path, Path, Path, tuple[float, ...], str]]:
    out = [(MODELS / m, MODELS / c, MODELS / e, b, kind) for m, c, e, b, kind in CASES]
    if zoo_data is not None:
        out += [
            (MODELS / "zoo" / f"{m}.onnx", zoo_data / f"{m}.calib.npz", zoo_data / f"{m}.heldout.npz", b, kind)
            for m, b, kind in REAL
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--menus", default=",".join(MENUS))
    parser.add_argument("--only", help="comma-separated model stems (default: all)")
    parser.add_argument("--data", type=Path, help="scripts/data/build_data.py's folder: adds the real zoo models")
    args = parser.parse_args()
    rows = []
    for path, calib, evaluation, budgets, kind in cases(args.data):
        model = path.stem
        if args.only and model not in args.only.split(","):
            continue
        proto = onnx.load(path)
        data = load_npz(evaluation)
        feed = feeds_of(proto, data)
        output = proto.graph.output[0].name
        floating = run(path, feed, output)
        for kb in budgets:
            for label, menu in ((m, MENUS[m]) for m in args.menus.split(",")):
                with tempfile.TemporaryDirectory() as tmp:
                    result = api.recommend(
                        path,
                        calib,
                        budget=budget_from(size_kb=kb),
                        choices=FormatOptions("qnn", weight_formats=menu),
                        out_dir=Path(tmp) / "rec",
                    )
                    assert result.written is not None and result.written.recommendation is not None
                    rec = result.written.recommendation
                    exported = export_recommendation(path, rec, "qdq", Path(tmp) / "q.onnx", data=calib).path
                    damage = kl(floating, run(exported, feed, output), kind)
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
