"""A BERT-sized encoder with random weights, built with onnx.helper (no torch): a benchmark model.

BERT-base's layer (hidden 768, 12 heads of 64, FFN 3072, GELU through Erf, post-LayerNorm
residuals) and vocabulary (30522 token embeddings, learned positions), ``--layers`` layers (4 by
default, to keep a benchmark short; 12 is BERT-base), a CLS pooler (768→768, tanh) and a 2-class
head. Input ``input_ids`` int64 [1, SEQ] (sequence 128, no attention mask), output ``logits``
[1, 2]. Weights N(0, 0.02) as BERT's initializer; opset 17, IR 8.

    python bench/bert_encoder.py [OUT.onnx] [--layers L] [--seed S]   # default: bench/out/bert_L4.onnx
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.files.atomic import write_atomic

OPSET = 17
HIDDEN, HEADS, FFN, VOCAB, SEQ, CLASSES = 768, 12, 3072, 30522, 128, 2
LAYERS = 4


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=value.dtype), name))
        return name

    def const(self, name: str, values: list[int]) -> str:
        return self.init(name, np.array(values, np.int64))

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def linear(self, x: str, name: str, cin: int, cout: int) -> str:
        w = self.init(f"{name}.weight", (self.rng.standard_normal((cin, cout)) * 0.02).astype(np.float32))
        b = self.init(f"{name}.bias", np.zeros(cout, np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}.mm"), b], f"{name}.out")

    def layer_norm(self, x: str, name: str) -> str:
        scale = self.init(f"{name}.weight", np.ones(HIDDEN, np.float32))
        bias = self.init(f"{name}.bias", np.zeros(HIDDEN, np.float32))
        return self.op("LayerNormalization", [x, scale, bias], f"{name}.out", axis=-1, epsilon=1e-12)

    def gelu(self, x: str, name: str) -> str:
        half = self.init(f"{name}.half", np.array(0.5, np.float32))
        one = self.init(f"{name}.one", np.array(1.0, np.float32))
        root = self.init(f"{name}.root2", np.array(math.sqrt(2.0), np.float32))
        erf = self.op("Erf", [self.op("Div", [x, root], f"{name}.div")], f"{name}.erf")
        return self.op("Mul", [self.op("Mul", [x, half], f"{name}.x2"), self.op("Add", [erf, one], f"{name}.e1")], name)

    def attention(self, x: str, name: str) -> str:
        heads = self.const(f"{name}.heads", [SEQ, HEADS, HIDDEN // HEADS])
        merged = self.const(f"{name}.merged", [SEQ, HIDDEN])
        split = {}
        for part in ("query", "key", "value"):
            y = self.op("Reshape", [self.linear(x, f"{name}.{part}", HIDDEN, HIDDEN), heads], f"{name}.{part}.heads")
            perm = [1, 2, 0] if part == "key" else [1, 0, 2]
            split[part] = self.op("Transpose", [y], f"{name}.{part}.t", perm=perm)
        scale = self.init(f"{name}.scale", np.array(1.0 / math.sqrt(HIDDEN // HEADS), np.float32))
        scores = self.op("Mul", [self.op("MatMul", [split["query"], split["key"]], f"{name}.qk"), scale], f"{name}.s")
        probs = self.op("Softmax", [scores], f"{name}.probs", axis=-1)
        ctx = self.op("MatMul", [probs, split["value"]], f"{name}.ctx")
        ctx = self.op("Transpose", [ctx], f"{name}.ctx.t", perm=[1, 0, 2])
        return self.linear(self.op("Reshape", [ctx, merged], f"{name}.ctx.merged"), f"{name}.output", HIDDEN, HIDDEN)

    def layer(self, x: str, name: str) -> str:
        x = self.layer_norm(self.op("Add", [x, self.attention(x, f"{name}.attention")], f"{name}.res1"), f"{name}.ln1")
        h = self.gelu(self.linear(x, f"{name}.intermediate", HIDDEN, FFN), f"{name}.gelu")
        y = self.linear(h, f"{name}.ffn_out", FFN, HIDDEN)
        return self.layer_norm(self.op("Add", [x, y], f"{name}.res2"), f"{name}.ln2")


def build_bert(layers: int = LAYERS, seed: int = 0) -> onnx.ModelProto:
    """The encoder graph with N(0, 0.02) weights drawn from ``seed``."""
    b = _Builder(np.random.default_rng(seed))
    words = b.init("embeddings.word", (b.rng.standard_normal((VOCAB, HIDDEN)) * 0.02).astype(np.float32))
    positions = b.init("embeddings.position", (b.rng.standard_normal((1, SEQ, HIDDEN)) * 0.02).astype(np.float32))
    x = b.op("Add", [b.op("Gather", [words, "input_ids"], "embeddings.gather"), positions], "embeddings.sum")
    x = b.layer_norm(x, "embeddings.ln")
    # Tokens as rows of one matrix [SEQ, HIDDEN]: onnxruntime's optimizer fuses each 3-D MatMul+Add
    # into Reshape-Gemm-Reshape, and its shape initializers then collide with the ones fitonnx's
    # prepare already holds when a later session optimizes the prepared model again.
    x = b.op("Reshape", [x, b.const("tokens", [SEQ, HIDDEN])], "embeddings.rows")
    for i in range(layers):
        x = b.layer(x, f"layer{i}")
    cls = b.op("Gather", [x, b.init("cls.index", np.array([0], np.int64))], "cls", axis=0)
    pooled = b.op("Tanh", [b.linear(cls, "pooler", HIDDEN, HIDDEN)], "pooler.tanh")
    w = b.init("classifier.weight", (b.rng.standard_normal((HIDDEN, CLASSES)) * 0.02).astype(np.float32))
    b.op("MatMul", [pooled, w], "logits")
    graph = helper.make_graph(
        b.nodes,
        "bert_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fitonnx-bench")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write_bert(path: Path, layers: int = LAYERS, seed: int = 0) -> Path:
    """Build the model and write it atomically to ``path`` (parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, build_bert(layers, seed).SerializeToString())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parent / "out" / f"bert_L{args.layers}.onnx"
    print(write_bert(out, args.layers, args.seed))


if __name__ == "__main__":
    main()
