"""Write a wide MLP over 2 GiB with its weights as external data, and its calibration data.

    python scripts/big_mlp.py OUT_DIR [--width 24576]

The model: x[1, W] -> MatMul(W x W) -> Relu -> MatMul(W x 10) -> logits, weights random normal
scaled by 1/sqrt(W) and saved beside the model (``big_mlp.onnx.data``), so that the ModelProto
itself stays small while the weights exceed protobuf's 2 GiB limit. Used to measure whether and
how fitonnx scores a model of that size (see the issue on the portable engine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def _external(name: str, array: np.ndarray, data: Path, offset: int) -> tuple[onnx.TensorProto, int]:
    """A TensorProto whose values live in ``data`` at ``offset`` (appended there now)."""
    with open(data, "ab") as f:
        f.write(array.tobytes())
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
    for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = TensorProto.EXTERNAL
    return tensor, offset + array.nbytes


def build(width: int, data: Path, seed: int = 0) -> onnx.ModelProto:
    """The model, its weights written to ``data`` as they are drawn (never a >2 GiB protobuf)."""
    rng = np.random.default_rng(seed)
    data.unlink(missing_ok=True)
    w1 = np.empty((width, width), np.float32)
    for start in range(0, width, 1024):  # drawn in slices: one float64 copy of W1 would need 2x more
        w1[start : start + 1024] = rng.standard_normal((min(1024, width - start), width)) / np.sqrt(width)
    t1, offset = _external("w1", w1, data, 0)
    del w1
    w2 = (rng.standard_normal((width, 10)) / np.sqrt(width)).astype(np.float32)
    t2, _ = _external("w2", w2, data, offset)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [t1, t2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=24576)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "big_mlp.onnx"
    model = build(args.width, args.out / "big_mlp.onnx.data")
    path.write_bytes(model.SerializeToString())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 1, args.width)).astype(np.float32)
    np.savez(args.out / "big_mlp.calib.npz", x=x, labels=rng.integers(0, 10, size=(8, 1)))
    size = (args.out / "big_mlp.onnx.data").stat().st_size
    print(f"wrote {path} with {size / 2**30:.2f} GiB of external data")


if __name__ == "__main__":
    main()
