"""Score every zoo model with the ``fitonnx`` command line and check the result against the inventory.

For each model: ``fitonnx score models/zoo/<m>.onnx --data models/zoo/<m>.calib.npz --fisher mc
--max-samples N --json ...`` (plus the model's own extra options below), timed; then the JSON report
is compared with zoo_inventory.py's independent count of the weights that Conv/ConvTranspose/Gemm/
MatMul/LSTM/GRU/Gather read from constants and of their activations. Prints one line per model:
status and wall time, tensors reported against expected, whether every trace is finite, and, on
failure, fitonnx's error line. This is the acceptance check of the "real models" issue.

Run with the project's venv (only onnx and the fitonnx command are needed)::

    /work/venv/bin/python scripts/zoo/score_zoo.py [--max-samples 16] [--fitonnx PATH] [model ...]

"Stored tensors" are the initializers/Constants the weights are computed from; a reported weight
name is matched to them by splitting it on "+" (fitonnx names a BN-folded weight "conv.w+bn").
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_inventory

ZOO = zoo_inventory.ZOO

# Options a model needs beyond --data/--fisher: skl2onnx's first output is the int64 label.
EXTRA_OPTIONS: dict[str, tuple[str, ...]] = {"digits_skl2onnx": ("--output", "probabilities")}


@dataclass(frozen=True)
class Outcome:
    """What one fitonnx run gave, next to what the inventory expects."""

    model: str
    exit_code: int
    seconds: float
    expected_weights: int
    expected_roots: int
    expected_activations: int
    weights: int | None
    activations: int | None
    finite: bool | None
    likelihood: str | None
    total_trace: float | None
    missing_roots: tuple[str, ...]
    samples: int | None
    detail: str


def run(model: str, fitonnx: str, max_samples: int, out_dir: Path) -> Outcome:
    inv = zoo_inventory.inventory(onnx.load(ZOO / f"{model}.onnx"))
    report = out_dir / f"{model}.json"
    command = [
        fitonnx,
        "score",
        str(ZOO / f"{model}.onnx"),
        "--data",
        str(ZOO / f"{model}.calib.npz"),
        "--fisher",
        "mc",
        "--max-samples",
        str(max_samples),
        "--json",
        str(report),
        *EXTRA_OPTIONS.get(model, ()),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    common = {
        "model": model,
        "exit_code": done.returncode,
        "seconds": seconds,
        "expected_weights": len(inv.weights),
        "expected_roots": len(inv.roots),
        "expected_activations": len(inv.activations),
    }
    if done.returncode != 0 or not report.exists():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        error = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "(no output)")
        return Outcome(
            **common,
            weights=None,
            activations=None,
            finite=None,
            likelihood=None,
            total_trace=None,
            missing_roots=(),
            samples=None,
            detail=error,
        )
    result = json.loads(report.read_text())
    tensors = result["tensors"]
    weights = [t for t in tensors if t["kind"] == "weight"]
    parts = {part for t in weights for part in t["name"].split("+")}
    return Outcome(
        **common,
        weights=len(weights),
        activations=sum(1 for t in tensors if t["kind"] == "activation"),
        finite=all(math.isfinite(t["ef_trace"]) and math.isfinite(t["ef_trace_se"]) for t in tensors),
        likelihood=f"{result['likelihood']} on {result['output']!r}",
        total_trace=sum(t["ef_trace"] for t in tensors),
        missing_roots=tuple(sorted(inv.roots - parts)),
        samples=result["samples"],
        detail="",
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--max-samples", type=int, default=16)
    parser.add_argument("--fitonnx", default=str(Path(sys.executable).parent / "fitonnx"))
    args = parser.parse_args(argv)
    models = args.models or sorted(p.stem for p in ZOO.glob("*.onnx"))
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            o = run(model, args.fitonnx, args.max_samples, Path(tmp))
            expected = f"expected W {o.expected_weights} (from {o.expected_roots} stored) A {o.expected_activations}"
            if o.weights is None:
                print(f"{model:26s} FAIL exit {o.exit_code} {o.seconds:6.1f}s  {expected}\n    {o.detail[:400]}")
                continue
            missing = (
                f", stored tensors not named in the report: {', '.join(o.missing_roots[:6])}" if o.missing_roots else ""
            )
            print(
                f"{model:26s} ok   {o.seconds:6.1f}s  {expected}; {o.samples} samples: reported W {o.weights} A {o.activations}, finite {o.finite}, {o.likelihood}, total trace {o.total_trace:.3g}{missing}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
