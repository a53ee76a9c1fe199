"""Write a GPT-2-medium-shaped decoder (random weights, external data) and token calibration data.

    python scripts/big_decoder.py OUT_DIR [--layers 24] [--width 1024] [--heads 16] [--seq 128]

GPT-2 medium's shapes: 24 pre-LayerNorm blocks of width 1024 with 16 heads and a 4096-wide GELU
MLP, a 50,257-token embedding and 1,024 positions, the output head tied to the token embedding
(as GPT-2's): 355 M parameters, 1.42 GB in float32 — the size of the export the issue on the
portable engine measured at 15.5 GB peak. Built with onnx.helper and numpy (no torch), weights
drawn N(0, 0.02²) and appended to ``big_decoder.onnx.data`` as they are drawn, so the model is
never one large protobuf. Input ``input_ids`` [batch, seq] (batch symbolic), output ``logits``
[batch, seq, vocab]; the calibration file holds random token ids (no labels: the MC Fisher).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

VOCAB, POSITIONS = 50257, 1024


class Weights:
    """Initializers whose values are appended to one external data file."""

    def __init__(self, data: Path, seed: int) -> None:
        self.data, self.offset, self.tensors = data, 0, []
        self.rng = np.random.default_rng(seed)
        data.unlink(missing_ok=True)

    def add(self, name: str, shape: tuple[int, ...], scale: float | None = 0.02, fill: float = 0.0) -> str:
        array = np.full(shape, fill, np.float32) if scale is None else self._normal(shape, scale)
        with open(self.data, "ab") as f:
            f.write(array.tobytes())
        tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        for key, value in (("location", self.data.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = TensorProto.EXTERNAL
        self.tensors.append(tensor)
        self.offset += array.nbytes
        return name

    def _normal(self, shape: tuple[int, ...], scale: float) -> np.ndarray:
        out = np.empty(shape, np.float32)
        flat = out.reshape(shape[0], -1)
        for start in range(0, shape[0], 4096):  # in slices: no float64 copy of a whole table
            stop = min(start + 4096, shape[0])
            flat[start:stop] = self.rng.standard_normal((stop - start, flat.shape[1])) * scale
        return out


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array, name)


def block(i: int, h: str, w: Weights, width: int, heads: int) -> tuple[list[onnx.NodeProto], str]:
    """One pre-LayerNorm transformer block reading ``h``; its nodes and output name."""
    p, n = f"h{i}.", helper.make_node
    d = width // heads
    ln1 = [w.add(p + "ln_1.weight", (width,), None, 1.0), w.add(p + "ln_1.bias", (width,), None)]
    ln2 = [w.add(p + "ln_2.weight", (width,), None, 1.0), w.add(p + "ln_2.bias", (width,), None)]
    nodes = [
        n("LayerNormalization", [h, *ln1], [p + "a"], axis=-1, epsilon=1e-5),
        n("MatMul", [p + "a", w.add(p + "attn.c_attn.weight", (width, 3 * width))], [p + "qkv0"]),
        n("Add", [p + "qkv0", w.add(p + "attn.c_attn.bias", (3 * width,), None)], [p + "qkv"]),
        n("Split", [p + "qkv", "split3"], [p + "q0", p + "k0", p + "v0"], axis=-1),
    ]
    for t in ("q", "k", "v"):
        nodes += [
            n("Reshape", [p + t + "0", "heads_shape"], [p + t + "1"]),
            n("Transpose", [p + t + "1"], [p + t], perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3]),
        ]
    nodes += [
        n("MatMul", [p + "q", p + "k"], [p + "s0"]),
        n("Mul", [p + "s0", "inv_sqrt_d"], [p + "s1"]),
        n("Add", [p + "s1", "causal"], [p + "s2"]),
        n("Softmax", [p + "s2"], [p + "probs"], axis=-1),
        n("MatMul", [p + "probs", p + "v"], [p + "ctx0"]),
        n("Transpose", [p + "ctx0"], [p + "ctx1"], perm=[0, 2, 1, 3]),
        n("Reshape", [p + "ctx1", "merge_shape"], [p + "ctx"]),
        n("MatMul", [p + "ctx", w.add(p + "attn.c_proj.weight", (width, width))], [p + "o0"]),
        n("Add", [p + "o0", w.add(p + "attn.c_proj.bias", (width,), None)], [p + "o"]),
        n("Add", [h, p + "o"], [p + "r1"]),
        n("LayerNormalization", [p + "r1", *ln2], [p + "m"], axis=-1, epsilon=1e-5),
        n("MatMul", [p + "m", w.add(p + "mlp.c_fc.weight", (width, 4 * width))], [p + "f0"]),
        n("Add", [p + "f0", w.add(p + "mlp.c_fc.bias", (4 * width,), None)], [p + "f1"]),
        # GELU as 0.5·x·(1 + erf(x/√2)) (the Gelu op is opset 20)
        n("Mul", [p + "f1", "inv_sqrt2"], [p + "g0"]),
        n("Erf", [p + "g0"], [p + "g1"]),
        n("Add", [p + "g1", "one"], [p + "g2"]),
        n("Mul", [p + "f1", p + "g2"], [p + "g3"]),
        n("Mul", [p + "g3", "half"], [p + "g"]),
        n("MatMul", [p + "g", w.add(p + "mlp.c_proj.weight", (4 * width, width))], [p + "y0"]),
        n("Add", [p + "y0", w.add(p + "mlp.c_proj.bias", (width,), None)], [p + "y"]),
        n("Add", [p + "r1", p + "y"], [p + "out"]),
    ]
    del d
    return nodes, p + "out"


def build(out: Path, layers: int, width: int, heads: int, seq: int) -> onnx.ModelProto:
    w = Weights(out / "big_decoder.onnx.data", seed=0)
    n = helper.make_node
    wte, wpe = w.add("wte", (VOCAB, width)), w.add("wpe", (POSITIONS, width), 0.01)
    causal = np.triu(np.full((seq, seq), -1e4, np.float32), k=1)
    small = [
        const("split3", np.array([width] * 3, np.int64)),
        const("heads_shape", np.array([0, 0, heads, width // heads], np.int64)),
        const("merge_shape", np.array([0, 0, width], np.int64)),
        const("inv_sqrt_d", np.array(1 / np.sqrt(width // heads), np.float32)),
        const("causal", causal),
        const("inv_sqrt2", np.array(1 / np.sqrt(2), np.float32)),
        const("one", np.array(1, np.float32)),
        const("half", np.array(0.5, np.float32)),
        const("positions", np.arange(seq, dtype=np.int64)),
    ]
    nodes = [
        n("Gather", [wte, "input_ids"], ["tok"]),
        n("Gather", [wpe, "positions"], ["pos"]),
        n("Add", ["tok", "pos"], ["h"]),
    ]
    h = "h"
    for i in range(layers):
        more, h = block(i, h, w, width, heads)
        nodes += more
    lnf = [w.add("ln_f.weight", (width,), None, 1.0), w.add("ln_f.bias", (width,), None)]
    nodes += [
        n("LayerNormalization", [h, *lnf], ["hf"], axis=-1, epsilon=1e-5),
        n("Transpose", [wte], ["wte_t"], perm=[1, 0]),  # the head tied to the token embedding
        n("MatMul", ["hf", "wte_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "big_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq, VOCAB])],
        [*w.tensors, *small],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build(args.out, args.layers, args.width, args.heads, args.seq)
    path = args.out / "big_decoder.onnx"
    path.write_bytes(model.SerializeToString())
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(args.samples, args.seq))
    np.savez(args.out / "big_decoder.calib.npz", input_ids=ids)
    size = (args.out / "big_decoder.onnx.data").stat().st_size + path.stat().st_size
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"wrote {path}: {params / 1e6:.1f} M parameters, {size / 1e9:.2f} GB with its external data")


if __name__ == "__main__":
    main()
