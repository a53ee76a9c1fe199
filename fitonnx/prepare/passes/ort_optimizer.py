"""ONNX Runtime's own offline graph optimizer at the basic level (the library pass, not ours).

``SessionOptions.optimized_model_filepath`` with ``ORT_ENABLE_BASIC`` saves the graph after
ONNX Runtime's provider-independent rewrites: constant folding, Constant nodes to initializers,
Identity/Dropout/no-op elimination, common subexpression elimination, MatMul+Add to Gemm,
Relu+Clip fusion. Those compute the same function with fewer ops.

Disabled here, because fitonnx does them itself with names a user can map back
(``batchnorm.py``): the fusions that fold BatchNormalization, Mul or Add into a Conv/MatMul weight
(ONNX Runtime names the result ``ConvBnFusion_W_<weight>``, without the BN), and ConstantSharing,
which renames equal scalars.

Constant folding can replace a weight by a folded copy named after the folded tensor; the
``Change`` records where it came from. A copy made only by layout ops (Transpose, Reshape, Cast...)
of a weight that is no longer used takes that weight's name back, so reports name what a user knows.
A weight read both through a layout op and directly (a tied embedding table: Gather, and Transpose
then MatMul) is not folded at all: it stays one tensor, scored once with the gradient summed over
its readers.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from fitonnx.errors import UnsupportedError
from fitonnx.model import external
from fitonnx.model.graph import FLOAT_TYPES, LAYOUT_OPS, PREPARE_PASSTHROUGH, tensor_names, walk_upstream
from fitonnx.model.graph import producers as graph_producers
from fitonnx.model.runtime import CPU_PROVIDERS, session_options
from fitonnx.prepare.types import Change, ChangeKind

DISABLED = (
    "ConvBNFusion",
    "ConvMulFusion",
    "ConvAddFusion",
    "MatMul_BatchNormalization_Fusion",
    "ConstantSharing",
)
MADE_UP_PREFIX = "ort_optimizer/"  # before the names onnxruntime's optimizer gives new tensors
MAX_BYTES = 1 << 31  # protobuf cannot serialize a model of 2 GB or more in one piece


def ort_basic_optimize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Change]]:
    if model.ByteSize() >= MAX_BYTES or external.external_tensors(model):
        # Its saved graph would hold every weight in one protobuf; the weights stay in their files.
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out, [Change(ChangeKind.OPTIMIZER, "model", "skipped: the weights are kept as external data")]
    declared = {v.name for v in model.graph.input}
    protected = shared_layout_weights(model) - declared
    optimized = _run_optimizer(_as_inputs(model, protected) if protected else model)
    if protected:
        _drop_inputs(optimized, protected)
    optimized = _drop_unused_domains(optimized, model)
    _own_made_up_names(optimized, model)
    renames = _restore_layout_names(optimized, model)
    return optimized, _describe(model, optimized, renames)


def _run_optimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="fitonnx-ort-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        options = session_options(level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        options.optimized_model_filepath = path
        try:
            ort.InferenceSession(
                model.SerializeToString(), options, providers=list(CPU_PROVIDERS), disabled_optimizers=DISABLED
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedError(
                f"expected a model onnxruntime can load; loading it failed: {first[:300]}",
                hint=f"fitonnx runs models with the installed onnxruntime {ort.__version__} on the CPU (no custom-op libraries)",
            ) from None
        return onnx.load_model(path, load_external_data=True) if Path(path).is_file() else _copy(model)


def shared_layout_weights(model: onnx.ModelProto) -> set[str]:
    """Float initializers read by a layout op (Transpose, Reshape, ...) and by some other node: a
    tied embedding table read by Gather and, transposed, by the output MatMul. Folding the layout
    op would leave two initializers holding one tensor, scored (and counted) twice."""
    floats = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(node.input):
            if name in floats:
                readers.setdefault(name, []).append(node.op_type)
    return {name for name, ops in readers.items() if len(ops) > 1 and any(op in LAYOUT_OPS for op in ops)}


def _as_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy with ``names`` also declared as graph inputs: onnxruntime folds no node reading an
    initializer a caller may override, so the layout op stays and the one weight keeps its readers."""
    out = _copy(model)
    for tensor in out.graph.initializer:
        if tensor.name in names:
            out.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return out


def _drop_inputs(model: onnx.ModelProto, names: set[str]) -> None:
    """Undo ``_as_inputs`` on the optimized model (in place)."""
    kept = [v for v in model.graph.input if v.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _own_made_up_names(optimized: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Prefix the tensor names onnxruntime made up with ``MADE_UP_PREFIX``, and mark the Reshapes it
    added as looked through (in place).

    Its MatMulAddFusion turns a 3-D MatMul+Add into Reshape-Gemm-Reshape with initializers named
    ``gemm_input_shape``/``gemm_output_shape``; a later session that fuses another MatMul+Add (one
    whose shapes became static after this pass) makes up the same names and fails with "Attempt to
    replace the existing tensor". The added Reshape only flattens the activation the Gemm reads,
    so ``find_quantizable`` reports that activation under the model's own name.
    """
    known = tensor_names(model.graph)
    made_up = {t.name for t in optimized.graph.initializer} | {o for n in optimized.graph.node for o in n.output}
    renames = {name: MADE_UP_PREFIX + name for name in made_up - known if name}
    if not renames:
        return
    for tensor in optimized.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in optimized.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and node.output[0] in renames.values():
            node.doc_string = PREPARE_PASSTHROUGH


def _drop_unused_domains(optimized: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime imports every domain it knows; keep the model's own and those a node uses."""
    used = {n.domain for n in optimized.graph.node} | {o.domain for o in model.opset_import}
    kept = [o for o in optimized.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del optimized.opset_import[:]
    optimized.opset_import.extend(kept)
    optimized.producer_name, optimized.producer_version = model.producer_name, model.producer_version
    return optimized


def _const_sources(model: onnx.ModelProto, name: str) -> tuple[tuple[str, ...], set[str]]:
    """The initializers/Constant outputs ``name`` is computed from in ``model``, and the op types on the way."""
    producers = graph_producers(model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    sources: list[str] = []
    ops: set[str] = set()

    def expand(current: str) -> Iterable[str]:
        node = producers.get(current)
        if current in inits or node is None or node.op_type == "Constant":
            sources.append(current)
            return ()
        ops.add(node.op_type)
        return node.input

    walk_upstream(name, expand)
    return tuple(sources), ops


# Ops that only move or select values: a fold of one float tensor through them is a rearrangement.
MOVE_OPS = LAYOUT_OPS | {"Slice", "Concat", "Gather", "Split"}


def _constant_info(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Name -> (element type, element count) of initializers and Constant-node tensors."""
    info = {t.name: (t.data_type, int(np.prod(t.dims, dtype=np.int64))) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = node.attribute[0].t
            info[node.output[0]] = (t.data_type, int(np.prod(t.dims, dtype=np.int64)))
    return info


def _restore_layout_names(optimized: onnx.ModelProto, model: onnx.ModelProto) -> dict[str, str]:
    """Give a folded rearrangement of one now-unused float weight that weight's name back (in place).

    A rearrangement (Transpose, Reshape, Cast, gate-reordering Slice/Concat...) holds exactly the
    weight's values, so its range and Fisher trace are the weight's. Returns old -> new names.
    """
    before = {t.name for t in model.graph.initializer}
    after = {t.name for t in optimized.graph.initializer}
    used = {i for n in optimized.graph.node for i in n.input} | {o.name for o in optimized.graph.output}
    info = _constant_info(model)
    renames: dict[str, str] = {}
    for tensor in optimized.graph.initializer:
        if tensor.name in before or tensor.data_type not in FLOAT_TYPES:
            continue
        sources, ops = _const_sources(model, tensor.name)
        floats = [src for src in sources if info.get(src, (0, 0))[0] in FLOAT_TYPES]
        if len(floats) != 1 or not ops or not ops <= MOVE_OPS:
            continue
        target = floats[0]
        if target in after or target in used or target in renames.values():
            continue
        if info[target][1] != int(np.prod(tensor.dims, dtype=np.int64)):
            continue  # a selection of part of the weight is not the weight
        renames[tensor.name] = target
    if not renames:
        return renames
    for tensor in optimized.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in optimized.graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    for value in optimized.graph.input:
        value.name = renames.get(value.name, value.name)
    return renames


def _describe(model: onnx.ModelProto, optimized: onnx.ModelProto, renames: dict[str, str]) -> list[Change]:
    changes: list[Change] = []
    before_inits = {t.name for t in model.graph.initializer}
    back = {new: old for old, new in renames.items()}
    promoted: list[str] = []
    for tensor in optimized.graph.initializer:
        if tensor.name in before_inits:
            continue
        folded = back.get(tensor.name, tensor.name)
        if tensor.name.startswith(MADE_UP_PREFIX):
            continue  # a fusion's own constant (its ops are counted below)
        sources, ops = _const_sources(model, folded)
        if not ops:
            promoted.append(tensor.name)
            continue
        if folded != tensor.name:
            detail = f"folded {'/'.join(sorted(ops))} of {tensor.name!r} into its data (name kept)"
        else:
            named = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
            detail = f"constant-folded {'/'.join(sorted(ops))} of {named or 'nothing'}"
        changes.append(
            Change(ChangeKind.OPTIMIZER, tensor.name, detail, origins=((tensor.name, sources or (folded,)),))
        )
    if promoted:
        shown = ", ".join(promoted[:4]) + (f", ... ({len(promoted)} in all)" if len(promoted) > 4 else "")
        changes.append(Change(ChangeKind.CONSTANT, "model", f"Constant nodes -> initializers: {shown}"))
    removed = Counter(n.op_type for n in model.graph.node) - Counter(n.op_type for n in optimized.graph.node)
    added = Counter(n.op_type for n in optimized.graph.node) - Counter(n.op_type for n in model.graph.node)
    if promoted:
        removed -= Counter({"Constant": len(promoted)})
    if removed or added:
        parts = [f"-{k} {op}" for op, k in sorted(removed.items())] + [f"+{k} {op}" for op, k in sorted(added.items())]
        changes.append(Change(ChangeKind.OPTIMIZER, "model", "onnxruntime basic optimizer: " + ", ".join(parts)))
    return changes
