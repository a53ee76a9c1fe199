"""Small models of the kinds issue 14 found fitonnx misreading, built with onnx.helper (random weights).

- ``detector_two_heads``: a Conv trunk with two heads, class logits [N, 6] and box deltas [N, 4];
  each head reaches only its own Gemm, so no single output reaches every weight.
- ``encoder_two_outputs``: a BERT-like encoder exporting ``last_hidden_state`` [N, T, 16] (a
  LayerNormalization output) and ``pooler_output`` [N, 16] (a Tanh output), both hidden states.
- ``shared_layernorm``: three LayerNormalization nodes sharing one scale and one bias initializer
  (as exporters write an untouched initialisation), and a weight read by two MatMuls through
  Identity nodes (the TorchScript exporter's deduplication).
- ``ctc_stale_shape``: time-major CTC logits [T=20, N=1, 50] (LogSoftmax over axis 2) whose
  declared output shape is a stale ``[1, seqlen]``.
- ``qdq_mlp``: an MLP already quantized in QDQ form (int8 weights behind DequantizeLinear,
  activations through QuantizeLinear → DequantizeLinear).
- ``refused/matmulinteger_mlp``: the same MLP with integer ops (DynamicQuantizeLinear, MatMulInteger),
  which fitonnx refuses (it is in a subfolder: ``tests/test_zoo.py`` scores every model at the top).

Each gets ``<name>.calib.npz`` (random inputs, the leading axis the sample axis). Rebuilt byte for
byte by ``python scripts/zoo/export_kinds.py`` (numpy's seeded generator, onnx.helper).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
OPSET = 17


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng: np.random.Generator, name: str, *shape: int, scale: float | None = None) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
    return numpy_helper.from_array((rng.normal(size=shape) * s).astype(np.float32), name)


def _model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fitonnx-zoo")
    model.ir_version = 9
    return model


def detector_two_heads() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = _rng(140)
    n = helper.make_node
    nodes = [
        n("Conv", ["image", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["c1"], ["r1"]),
        n("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1]),
        n("Relu", ["c2"], ["r2"]),
        n("GlobalAveragePool", ["r2"], ["pooled"]),
        n("Flatten", ["pooled"], ["feat"]),
        n("Gemm", ["feat", "cls.w", "cls.b"], ["cls_logits"], transB=1),
        n("Gemm", ["feat", "box.w", "box.b"], ["box_deltas"], transB=1),
    ]
    inits = [
        _w(rng, "c1.w", 8, 3, 3, 3),
        _w(rng, "c1.b", 8, scale=0.1),
        _w(rng, "c2.w", 16, 8, 3, 3),
        _w(rng, "c2.b", 16, scale=0.1),
        _w(rng, "cls.w", 6, 16, scale=1.0),
        _w(rng, "cls.b", 6, scale=0.1),
        _w(rng, "box.w", 4, 16, scale=1.0),
        _w(rng, "box.b", 4, scale=0.1),
    ]
    g = helper.make_graph(
        nodes,
        "detector_two_heads",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [
            helper.make_tensor_value_info("cls_logits", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("box_deltas", TensorProto.FLOAT, ["N", 4]),
        ],
        inits,
    )
    return _model(g), {"image": rng.normal(size=(16, 1, 3, 16, 16)).astype(np.float32)}


def encoder_two_outputs() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = _rng(141)
    n = helper.make_node
    d, t, vocab = 16, 8, 40
    nodes = [
        n("Gather", ["emb.w", "input_ids"], ["e"]),
        n("LayerNormalization", ["e", "ln0.s", "ln0.b"], ["x0"], axis=-1),
        n("MatMul", ["x0", "ffn.w1"], ["f1"]),
        n("Add", ["f1", "ffn.b1"], ["f1b"]),
        n("Relu", ["f1b"], ["f1r"]),
        n("MatMul", ["f1r", "ffn.w2"], ["f2"]),
        n("Add", ["x0", "f2"], ["res"]),
        n("LayerNormalization", ["res", "ln1.s", "ln1.b"], ["last_hidden_state"], axis=-1),
        n("Gather", ["last_hidden_state", "first"], ["cls"], axis=1),
        n("MatMul", ["cls", "pool.w"], ["p"]),
        n("Add", ["p", "pool.b"], ["pb"]),
        n("Tanh", ["pb"], ["pooler_output"]),
    ]
    inits = [
        _w(rng, "emb.w", vocab, d, scale=1.0),
        numpy_helper.from_array((1 + 0.1 * rng.normal(size=d)).astype(np.float32), "ln0.s"),
        _w(rng, "ln0.b", d, scale=0.1),
        _w(rng, "ffn.w1", d, 32),
        _w(rng, "ffn.b1", 32, scale=0.1),
        _w(rng, "ffn.w2", 32, d),
        numpy_helper.from_array((1 + 0.1 * rng.normal(size=d)).astype(np.float32), "ln1.s"),
        _w(rng, "ln1.b", d, scale=0.1),
        numpy_helper.from_array(np.array(0, np.int64), "first"),
        _w(rng, "pool.w", d, d),
        _w(rng, "pool.b", d, scale=0.1),
    ]
    g = helper.make_graph(
        nodes,
        "encoder_two_outputs",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", t])],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", t, d]),
            helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["N", d]),
        ],
        inits,
    )
    return _model(g), {"input_ids": rng.integers(0, vocab, size=(16, 1, t)).astype(np.int64)}


def shared_layernorm() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = _rng(142)
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w0"], ["h0"]), n("LayerNormalization", ["h0", "ln.s", "ln.b"], ["n0"], axis=-1)]
    for k in (1, 2):
        nodes += [
            n("MatMul", [f"n{k - 1}", f"w{k}"], [f"h{k}"]),
            n("LayerNormalization", [f"h{k}", "ln.s", "ln.b"], [f"n{k}"], axis=-1),
        ]
    nodes += [
        n("Identity", ["tied.w"], ["tied.a"]),
        n("Identity", ["tied.a"], ["tied.b"]),
        n("MatMul", ["n2", "tied.a"], ["t1"]),
        n("Relu", ["t1"], ["t1r"]),
        n("MatMul", ["t1r", "tied.b"], ["logits"]),
    ]
    inits = [
        _w(rng, "w0", 12, 12),
        _w(rng, "w1", 12, 12),
        _w(rng, "w2", 12, 12),
        numpy_helper.from_array((1 + 0.2 * rng.normal(size=12)).astype(np.float32), "ln.s"),
        _w(rng, "ln.b", 12, scale=0.1),
        _w(rng, "tied.w", 12, 12, scale=0.6),
    ]
    g = helper.make_graph(
        nodes,
        "shared_layernorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 12])],
        inits,
    )
    return _model(g), {"x": rng.normal(size=(16, 1, 12)).astype(np.float32)}


def ctc_stale_shape() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = _rng(143)
    n = helper.make_node
    nodes = [
        n("MatMul", ["features", "enc.w"], ["h"]),
        n("Relu", ["h"], ["hr"]),
        n("MatMul", ["hr", "ctc.w"], ["z"]),
        n("LogSoftmax", ["z"], ["log_probs"], axis=2),
    ]
    g = helper.make_graph(
        nodes,
        "ctc_stale_shape",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [20, 1, 12])],
        # Stale: the exporter traced an older head; the tensor is really [20, 1, 50].
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, [1, "seqlen"])],
        [_w(rng, "enc.w", 12, 24), _w(rng, "ctc.w", 24, 50, scale=0.5)],
    )
    return _model(g), {"features": rng.normal(size=(8, 20, 1, 12)).astype(np.float32)}


def _mlp_weights(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return (rng.normal(size=(10, 16)) / np.sqrt(10)).astype(np.float32), (rng.normal(size=(16, 5)) / 4).astype(
        np.float32
    )


def _int8(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    scale = np.float32(np.abs(w).max() / 127)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def qdq_mlp() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = _rng(144)
    w1, w2 = _mlp_weights(rng)
    n = helper.make_node
    inits, nodes = [], []
    for name, w in (("w1", w1), ("w2", w2)):
        q, scale = _int8(w)
        inits += [
            numpy_helper.from_array(q, f"{name}_q"),
            numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{name}_zp"),
        ]
        nodes.append(n("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"]))
    for name, scale in (("x", 3.0 / 127), ("h", 4.0 / 127)):
        inits += [
            numpy_helper.from_array(np.array(scale, np.float32), f"{name}_ascale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{name}_azp"),
        ]
    nodes += [
        n("QuantizeLinear", ["x", "x_ascale", "x_azp"], ["x_q"]),
        n("DequantizeLinear", ["x_q", "x_ascale", "x_azp"], ["x_dq"]),
        n("MatMul", ["x_dq", "w1_dq"], ["h0"]),
        n("Relu", ["h0"], ["h"]),
        n("QuantizeLinear", ["h", "h_ascale", "h_azp"], ["h_q"]),
        n("DequantizeLinear", ["h_q", "h_ascale", "h_azp"], ["h_dq"]),
        n("MatMul", ["h_dq", "w2_dq"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "qdq_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    return _model(g), {"x": rng.normal(size=(16, 1, 10)).astype(np.float32)}


def matmulinteger_mlp() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = _rng(144)
    w1, w2 = _mlp_weights(rng)
    n = helper.make_node
    inits, nodes, current = [], [], "x"
    for k, w in enumerate((w1, w2), 1):
        q, scale = _int8(w)
        q_u8 = (q.astype(np.int16) + 128).astype(np.uint8)
        inits += [
            numpy_helper.from_array(q_u8, f"w{k}_q"),
            numpy_helper.from_array(np.array(128, np.uint8), f"w{k}_zp"),
            numpy_helper.from_array(np.array(scale, np.float32), f"w{k}_scale"),
        ]
        nodes += [
            n("DynamicQuantizeLinear", [current], [f"a{k}_q", f"a{k}_scale", f"a{k}_zp"]),
            n("MatMulInteger", [f"a{k}_q", f"w{k}_q", f"a{k}_zp", f"w{k}_zp"], [f"m{k}_i32"]),
            n("Cast", [f"m{k}_i32"], [f"m{k}_f"], to=TensorProto.FLOAT),
            n("Mul", [f"a{k}_scale", f"w{k}_scale"], [f"s{k}"]),
            n("Mul", [f"m{k}_f", f"s{k}"], [f"y{k}"]),
        ]
        current = f"y{k}"
        if k == 1:
            nodes.append(n("Relu", ["y1"], ["y1r"]))
            current = "y1r"
    nodes.append(n("Identity", [current], ["logits"]))
    g = helper.make_graph(
        nodes,
        "matmulinteger_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    return _model(g), {"x": rng.normal(size=(16, 1, 10)).astype(np.float32)}


BUILDERS = {
    "detector_two_heads": detector_two_heads,
    "encoder_two_outputs": encoder_two_outputs,
    "shared_layernorm": shared_layernorm,
    "ctc_stale_shape": ctc_stale_shape,
    "qdq_mlp": qdq_mlp,
    "refused/matmulinteger_mlp": matmulinteger_mlp,
}


def main(names: list[str]) -> None:
    for name in names or list(BUILDERS):
        model, calib = BUILDERS[name]()
        onnx.checker.check_model(model)
        path = ZOO / f"{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, path)
        np.savez(ZOO / f"{name}.calib.npz", **calib)
        print(f"wrote {path.relative_to(ZOO.parent.parent)} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
