"""A ResNet-18 with random weights, built with onnx.helper (no torch): the benchmark model.

torchvision's layout: conv1 7x7/2 + ReLU + maxpool 3x3/2, four stages of two BasicBlocks
(64/128/256/512 channels, a 1x1/2 downsample conv where the shape changes), global average pool,
fc 512->1000. BatchNorm is taken as already folded into the convs (Conv with bias), as exporters
do for inference. He-normal weights, small random biases; opset 17; input ``input``
[batch, 3, 224, 224] with a symbolic batch axis, output ``logits`` [batch, 1000].

    python bench/resnet18.py [OUT.onnx] [--seed S]     # default: bench/out/resnet18.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.files.atomic import write_atomic

OPSET = 17
STAGES: tuple[tuple[int, int], ...] = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, first stride)
BLOCKS_PER_STAGE = 2
NUM_CLASSES = 1000
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "resnet18.onnx"


class _Builder:
    """Collects nodes and initializers; names follow torchvision's state_dict keys."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int) -> str:
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)
        b = self.rng.standard_normal(cout) * 0.01
        self.inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"))
        self.inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}.bias"))
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [f"{name}.out"],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        return f"{name}.out"

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"

    def basic_block(self, x: str, name: str, cin: int, cout: int, stride: int) -> str:
        y = self.conv(x, f"{name}.conv1", cin, cout, 3, stride)
        y = self.op("Relu", [y], f"{name}.relu1")
        y = self.conv(y, f"{name}.conv2", cout, cout, 3, 1)
        shortcut = x
        if stride != 1 or cin != cout:
            shortcut = self.conv(x, f"{name}.downsample.0", cin, cout, 1, stride)
        y = self.op("Add", [y, shortcut], f"{name}.add")
        return self.op("Relu", [y], f"{name}.relu2")


def build_resnet18(seed: int = 0) -> onnx.ModelProto:
    """The ResNet-18 graph with He-normal random weights drawn from ``seed``."""
    b = _Builder(np.random.default_rng(seed))
    x = b.conv("input", "conv1", 3, 64, 7, 2)
    x = b.op("Relu", [x], "relu")
    x = b.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for s, (cout, stride) in enumerate(STAGES, start=1):
        for i in range(BLOCKS_PER_STAGE):
            x = b.basic_block(x, f"layer{s}.{i}", cin, cout, stride if i == 0 else 1)
            cin = cout
    x = b.op("GlobalAveragePool", [x], "avgpool")
    x = b.op("Flatten", [x], "flatten", axis=1)
    w = b.rng.standard_normal((NUM_CLASSES, cin)) * np.sqrt(1.0 / cin)
    b.inits.append(numpy_helper.from_array(w.astype(np.float32), "fc.weight"))
    b.inits.append(numpy_helper.from_array(np.zeros(NUM_CLASSES, np.float32), "fc.bias"))
    b.nodes.append(helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        b.nodes,
        "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fitonnx-bench")
    model.ir_version = 8  # opset 17's IR version; older onnxruntime builds reject newer ones
    onnx.checker.check_model(model, full_check=True)
    return model


def write_resnet18(path: Path, seed: int = 0) -> Path:
    """Build the model and write it atomically to ``path`` (parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, build_resnet18(seed).SerializeToString())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help="where to write the .onnx file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    path = write_resnet18(args.out, args.seed)
    model = onnx.load(str(path))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"wrote {path} ({params:,} parameters, {path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
