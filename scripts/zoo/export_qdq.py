"""A real model already quantized in QDQ form: the PaddleOCR text-direction classifier of the zoo
(authors' weights) quantized by onnxruntime.quantization.quantize_static, as a user would.

``models/zoo/qdq/ppocr_cls_qdq.onnx``: opset 13 (the classifier's opset 11 lifted first, since
per-channel DequantizeLinear needs 13), ``quant_pre_process`` (BatchNormalization folded), per-channel
int8 weights, uint8 activations, MinMax calibration on the first 16 samples of
``ppocr_cls_mbv3.calib.npz`` (which the tests also score it on). In a subfolder, as ``refused/``:
``tests/test_zoo.py`` scores every model at the top with the zoo inventory.

Needs only onnx and onnxruntime (the quantization tools ship with it). Run:
``python scripts/zoo/export_qdq.py``; versions used: onnx 1.23.2, onnxruntime 1.32.0.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"


class _Samples(CalibrationDataReader):
    """One sample at a time, as the calibrator asks for them."""

    def __init__(self, x: np.ndarray) -> None:
        self._feeds = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def main() -> None:
    x = np.load(ZOO / "ppocr_cls_mbv3.calib.npz")["x"][:16].astype(np.float32)
    out = ZOO / "qdq" / "ppocr_cls_qdq.onnx"
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        lifted, pre = Path(tmp) / "op13.onnx", Path(tmp) / "pre.onnx"
        onnx.save(onnx.version_converter.convert_version(onnx.load(ZOO / "ppocr_cls_mbv3.onnx"), 13), lifted)
        quant_pre_process(str(lifted), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _Samples(x),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
