"""Inventory of the zoo's models, computed independently of fitonnx (onnx only, no onnxruntime).

For each ``models/zoo/*.onnx`` it prints the producer, opsets, inputs/outputs, ops of note, and the
quantizable tensors FIT should report, by the definition of the issue: every weight that a
Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/RNN (or a Gather embedding) reads from a constant, and the
non-constant float data inputs of those ops (activations). A tensor counts as constant when it is an
initializer, a Constant output, or the output of a node whose inputs are all constant (so
``MatMul(x, Transpose(W))`` and a GRU's ``R = Unsqueeze(Concat(Slice(W_hh)))`` count); subgraphs of
If/Loop/Scan are searched too, with outer-scope names resolved in the enclosing graph. Shape-reading
ops (Shape, Size) make nothing constant here, since their input's shape may vary.

This is the yardstick to check ``fitonnx score``'s tensor counts against (the lead's acceptance check),
not a reimplementation of fitonnx. Run with any Python that has onnx::

    /work/venv/bin/python scripts/zoo/zoo_inventory.py [--markdown] [model.onnx ...]
"""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import AttributeProto, GraphProto, TensorProto

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"

# Which inputs of each op hold a weight when constant (the others, when float and not constant, are activations).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
    "Gather": (0,),
}
DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (0,),
    "ConvTranspose": (0,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "LSTM": (0,),
    "GRU": (0,),
    "RNN": (0,),
    "Gather": (),
}
NOT_FOLDABLE = {
    "Shape",
    "Size",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "If",
    "Loop",
    "Scan",
}
OPS_OF_NOTE = (
    "BatchNormalization",
    "HardSwish",
    "HardSigmoid",
    "Resize",
    "ConvTranspose",
    "LayerNormalization",
    "Gelu",
    "Erf",
    "Softmax",
    "Sigmoid",
    "LSTM",
    "GRU",
    "If",
    "Loop",
    "Scan",
    "Scaler",
)


@dataclass
class Inventory:
    """What one model holds: op counts over all subgraphs, weights and activations of quantizable ops."""

    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    weights: dict[str, str] = field(default_factory=dict)  # weight tensor -> op type reading it
    weights_in_subgraphs: set[str] = field(default_factory=set)
    roots: set[str] = field(default_factory=set)  # the initializers/Constants the weights are computed from
    activations: dict[str, str] = field(default_factory=dict)


def _float_types() -> set[int]:
    return {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def _walk(graph: GraphProto, outer: dict[str, frozenset[str]], depth: int, inv: Inventory) -> None:
    """Constant propagation through ``graph`` in node order, then classification of quantizable inputs.

    ``constants`` maps each constant tensor to the float initializers/Constant outputs it is computed from.
    """
    constants = dict(outer)
    for init in graph.initializer:
        is_float = init.data_type in _float_types()
        constants[init.name] = frozenset({init.name}) if is_float else frozenset()
    for node in graph.node:
        inv.ops[node.op_type] += 1
        subgraphs = [a.g for a in node.attribute if a.type == AttributeProto.GRAPH]
        subgraphs += [g for a in node.attribute if a.type == AttributeProto.GRAPHS for g in a.graphs]
        for sub in subgraphs:
            _walk(sub, constants, depth + 1, inv)
        if node.op_type == "Constant":
            is_float = any(a.name == "value" and a.t.data_type in _float_types() for a in node.attribute)
            constants[node.output[0]] = frozenset({node.output[0]}) if is_float else frozenset()
            continue
        inputs = [name for name in node.input if name]
        if node.op_type not in NOT_FOLDABLE and inputs and all(name in constants for name in inputs):
            for out in node.output:
                constants[out] = frozenset().union(*(constants[name] for name in inputs))
        if node.op_type in WEIGHT_INPUTS:
            for index in WEIGHT_INPUTS[node.op_type]:
                if index < len(node.input) and node.input[index] in constants:
                    name = node.input[index]
                    if node.op_type == "Gather" and (len(node.input) < 2 or node.input[1] in constants):
                        continue
                    inv.weights.setdefault(name, node.op_type)
                    inv.roots |= constants[name]
                    if depth:
                        inv.weights_in_subgraphs.add(name)
            for index in DATA_INPUTS[node.op_type]:
                if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                    inv.activations.setdefault(node.input[index], node.op_type)


def inventory(model: onnx.ModelProto) -> Inventory:
    inv = Inventory()
    _walk(model.graph, {}, 0, inv)
    return inv


def _value_info(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return f"{value.name} {TensorProto.DataType.Name(tensor.elem_type).lower()}[{', '.join(dims)}]"


def describe(path: Path, markdown: bool) -> str:
    model = onnx.load(path)
    inv = inventory(model)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_value_info(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_value_info(v) for v in model.graph.output]
    opsets = ", ".join(
        f"{o.domain or 'ai.onnx'} {o.version}"
        for o in model.opset_import
        if o.domain in ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
    )
    by_op = collections.Counter(inv.weights.values())
    weights = (
        f"{len(inv.weights)} ("
        + ", ".join(f"{op} {n}" for op, n in sorted(by_op.items()))
        + f"), from {len(inv.roots)} stored tensors"
    )
    if inv.weights_in_subgraphs:
        weights += f", {len(inv.weights_in_subgraphs)} inside subgraphs"
    notes = ", ".join(f"{op} {inv.ops[op]}" for op in OPS_OF_NOTE if inv.ops[op])
    size = f"{path.stat().st_size / 1e6:.2f} MB"
    producer = f"{model.producer_name or '(empty)'} {model.producer_version}".strip()
    if markdown:
        return f"| `{path.name}` | {size} | {producer} | {opsets} | {notes} | {'; '.join(inputs)} | {'; '.join(outputs)} | {weights} | {len(inv.activations)} |"
    return (
        f"{path.name}: {size}, producer {producer}, opsets {opsets}\n"
        f"  inputs:  {'; '.join(inputs)}\n  outputs: {'; '.join(outputs)}\n"
        f"  ops of note: {notes}\n  weights: {weights}\n  activations: {len(inv.activations)}"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--markdown", action="store_true", help="one table row per model")
    args = parser.parse_args(argv)
    paths = args.models or sorted(ZOO.glob("*.onnx"))
    if args.markdown:
        print(
            "| model | size | producer | opsets | ops of note | inputs | outputs | weights (by consuming op) | activations |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        print(describe(path, args.markdown))


if __name__ == "__main__":
    main(sys.argv[1:])
