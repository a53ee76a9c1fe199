"""Rebuild models/zoo/ from scratch: wheel models, local exports, calibration data, inventory.

Steps, in order (each is also a script of its own in this folder):

1. fetch_wheels.py   -- PaddleOCR cls/det/rec (rapidocr-onnxruntime 1.4.4) and Silero VAD (silero-vad 6.2.3)
                        models, extracted from their PyPI wheels and checked by SHA-256;
2. export_torch.py   -- MobileNetV3-Small (TorchScript exporter, BN unfolded), tiny BERT and char-GRU
                        (dynamo exporter), random weights;
3. export_sklearn.py -- scikit-learn digits pipeline through skl2onnx (writes its own .calib.npz);
4. export_jax.py     -- a small CNN through jax2onnx, when jax2onnx is installed (skipped otherwise);
5. make_calib.py     -- realistic calibration data for every other model;
6. export_qdq.py     -- the PaddleOCR classifier quantized to QDQ by onnxruntime.quantization (qdq/);
7. zoo_inventory.py  -- the table of models and of the weights FIT must report.

Environment (a venv of its own; the project's venv stays torch-free)::

    apt-get install espeak-ng                      # speech for the VAD calibration data
    python3 -m venv /work/zoovenv
    /work/zoovenv/bin/pip install torch==2.13.0 onnxscript onnx onnxruntime scikit-learn skl2onnx pillow scipy
    /work/zoovenv/bin/pip install jax2onnx         # optional, for step 4
    /work/zoovenv/bin/python scripts/zoo/build_zoo.py

Versions used for the committed files: torch 2.13.0+cpu, onnxscript 0.7.2, onnx 1.23.2, onnxruntime
1.32.0, scikit-learn 1.9.1, skl2onnx 1.20.0, Pillow 13.0.0, numpy 2.4.6, espeak-ng 1.51, CPython 3.11.7.
The whole build took 2 min 7 s on 2 cores here (most of it importing JAX and torch); it reproduced
every committed file byte for byte (from /work/main: the dynamo exporter writes each node's source
file path and line number into the node's metadata).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = (
    "fetch_wheels.py",
    "export_torch.py",
    "export_sklearn.py",
    "export_jax.py",
    "make_calib.py",
    "export_qdq.py",
    "zoo_inventory.py",
)


def main() -> None:
    for step in STEPS:
        if step == "export_jax.py" and importlib.util.find_spec("jax2onnx") is None:
            print(f"== {step}: skipped (jax2onnx is not installed)")
            continue
        print(f"== {step}", flush=True)
        subprocess.run([sys.executable, str(HERE / step)], check=True)


if __name__ == "__main__":
    main()
