"""A BERT-sized encoder built with onnx.helper and numpy (no torch): BERT-base's layer and vocabulary.

    python bench/encoder.py [OUT.onnx] [--layers 4]

Post-LayerNorm blocks of width 768 with 12 heads and a 3072-wide GELU (erf) MLP, 30,522 tokens,
learned positions, sequence 128, a tanh pooler on the first token and 2 classes; weights
N(0, 0.02²), LayerNorm scales 1 + N(0, 0.02²) (distinct per layer, as in a trained model). Input
``input_ids`` [batch, 128] (batch symbolic), output ``logits`` [batch, 2]. Used by
``bench/engines.py`` when torch is not installed (the onnx engine and ort-training compare on it
all the same).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, HEADS, FFN, SEQ = 30522, 768, 12, 3072, 128


def build_encoder(layers: int = 4, seq: int = SEQ, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def w(name: str, shape: tuple[int, ...], base: float = 0.0) -> str:
        inits.append(numpy_helper.from_array((base + 0.02 * rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def c(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    n = helper.make_node
    c("heads_shape", np.array([0, 0, HEADS, HIDDEN // HEADS], np.int64))
    c("merge_shape", np.array([0, 0, HIDDEN], np.int64))
    c("scale", np.array(1 / np.sqrt(HIDDEN // HEADS), np.float32))
    c("inv_sqrt2", np.array(1 / np.sqrt(2), np.float32))
    c("one", np.array(1, np.float32))
    c("half", np.array(0.5, np.float32))
    c("positions", np.arange(seq, dtype=np.int64)[None])
    c("split3", np.array([HIDDEN] * 3, np.int64))
    c("first", np.array([0], np.int64))
    nodes = [
        n("Gather", [w("embeddings.word", (VOCAB, HIDDEN)), "input_ids"], ["tok"]),
        n("Gather", [w("embeddings.position", (512, HIDDEN)), "positions"], ["pos"]),
        n("Add", ["tok", "pos"], ["emb"]),
        n("LayerNormalization", ["emb", w("embeddings.ln.w", (HIDDEN,), 1.0), w("embeddings.ln.b", (HIDDEN,))], ["h"]),
    ]
    h = "h"
    for i in range(layers):
        p = f"layer{i}."
        nodes += [
            n("MatMul", [h, w(p + "qkv.w", (HIDDEN, 3 * HIDDEN))], [p + "qkv0"]),
            n("Add", [p + "qkv0", w(p + "qkv.b", (3 * HIDDEN,))], [p + "qkv"]),
            n("Split", [p + "qkv", "split3"], [p + "q0", p + "k0", p + "v0"], axis=-1),
        ]
        for t in ("q", "k", "v"):
            nodes += [
                n("Reshape", [p + t + "0", "heads_shape"], [p + t + "1"]),
                n("Transpose", [p + t + "1"], [p + t], perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3]),
            ]
        nodes += [
            n("MatMul", [p + "q", p + "k"], [p + "s0"]),
            n("Mul", [p + "s0", "scale"], [p + "s"]),
            n("Softmax", [p + "s"], [p + "probs"], axis=-1),
            n("MatMul", [p + "probs", p + "v"], [p + "ctx0"]),
            n("Transpose", [p + "ctx0"], [p + "ctx1"], perm=[0, 2, 1, 3]),
            n("Reshape", [p + "ctx1", "merge_shape"], [p + "ctx"]),
            n("MatMul", [p + "ctx", w(p + "out.w", (HIDDEN, HIDDEN))], [p + "o0"]),
            n("Add", [p + "o0", w(p + "out.b", (HIDDEN,))], [p + "o"]),
            n("Add", [h, p + "o"], [p + "r1"]),
            n("LayerNormalization", [p + "r1", w(p + "ln1.w", (HIDDEN,), 1.0), w(p + "ln1.b", (HIDDEN,))], [p + "a"]),
            n("MatMul", [p + "a", w(p + "ffn1.w", (HIDDEN, FFN))], [p + "f0"]),
            n("Add", [p + "f0", w(p + "ffn1.b", (FFN,))], [p + "f1"]),
            n("Mul", [p + "f1", "inv_sqrt2"], [p + "g0"]),
            n("Erf", [p + "g0"], [p + "g1"]),
            n("Add", [p + "g1", "one"], [p + "g2"]),
            n("Mul", [p + "f1", p + "g2"], [p + "g3"]),
            n("Mul", [p + "g3", "half"], [p + "g"]),
            n("MatMul", [p + "g", w(p + "ffn2.w", (FFN, HIDDEN))], [p + "y0"]),
            n("Add", [p + "y0", w(p + "ffn2.b", (HIDDEN,))], [p + "y"]),
            n("Add", [p + "a", p + "y"], [p + "r2"]),
            n("LayerNormalization", [p + "r2", w(p + "ln2.w", (HIDDEN,), 1.0), w(p + "ln2.b", (HIDDEN,))], [p + "out"]),
        ]
        h = p + "out"
    nodes += [
        n("Gather", [h, "first"], ["cls0"], axis=1),
        n("Reshape", ["cls0", c("cls_shape", np.array([0, HIDDEN], np.int64))], ["cls"]),
        n("Gemm", ["cls", w("pooler.w", (HIDDEN, HIDDEN)), w("pooler.b", (HIDDEN,))], ["pool0"]),
        n("Tanh", ["pool0"], ["pool"]),
        n("Gemm", ["pool", w("classifier.w", (HIDDEN, 2)), w("classifier.b", (2,))], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bert_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).parent / "out" / "encoder.onnx")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = build_encoder(args.layers)
    onnx.save(model, args.out)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"wrote {args.out} ({params:,} parameters, {args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
