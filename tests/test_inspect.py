"""``fitonnx inspect`` and ``fitonnx.inspect_model``: tensors, changes and unsupported ops without data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import fitonnx
from fitonnx.analysis.inspection import inspect_model
from fitonnx.cli.main import cli
from fitonnx.model.graph import Kind
from fitonnx.render.inspection import format_inspection, to_dict
from tests.test_output_kinds import _softmax_model
from tests.test_prepare import grid_sample_model, mobilenet_block, paddle_style

GOLDEN = Path(__file__).parent / "golden"


def test_inspect_golden_mobilenet_block() -> None:
    text = format_inspection(inspect_model(mobilenet_block())) + "\n"
    path = GOLDEN / "inspect_mobilenet_block.txt"
    if os.environ.get("FITONNX_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def test_inspect_lists_prepared_tensors_with_counts_and_origins() -> None:
    insp = fitonnx.inspect_model(mobilenet_block())
    weights = {w.name: w for w in insp.weights}
    assert set(weights) == {
        "stem.weight+stem_bn",
        "expand.weight+expand_bn",
        "dw.weight+dw_bn",
        "se1.weight",
        "se2.weight",
        "project.weight+project_bn",
        "fc.weight",
    }
    assert all(w.kind is Kind.WEIGHT for w in insp.weights)
    # Parameter counts from the shapes of the prepared initializers, counted independently here.
    model = mobilenet_block()
    originals = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    for w in insp.weights:
        assert w.numel == originals[w.origins[0]]
    assert insp.parameters == sum(originals[w.origins[0]] for w in insp.weights)
    assert weights["dw.weight+dw_bn"].origins[0] == "dw.weight" and weights["fc.weight"].origins == ("fc.weight",)
    acts = {a.name: a for a in insp.activations}
    assert acts["x"].shape == ("N", 3, 8, 8) and acts["x"].numel is None
    assert acts["f"].op_types == ("MatMul",) and acts["f"].nodes == ("fc",)
    assert [c.kind for c in insp.changes].count("fold") == 4 and insp.unsupported == () and insp.problems == ()


def test_input_shapes_fix_symbolic_sizes() -> None:
    insp = inspect_model(mobilenet_block(), input_shapes={"x": (2, 3, 8, 8)})
    acts = {a.name: a for a in insp.activations}
    assert acts["x"].shape == (2, 3, 8, 8) and acts["x"].numel == 2 * 3 * 8 * 8
    assert acts["d3"].shape == (2, 8, 4, 4)
    assert any(c.kind == "shapes" for c in insp.changes)


def test_inspect_names_unsupported_ops_and_the_outputs_they_block() -> None:
    insp = inspect_model(grid_sample_model())
    (blocker,) = insp.unsupported
    assert (blocker.op_type, blocker.node, blocker.outputs) == ("GridSample", "warp/grid_sample", ("y",))
    assert "GridSample (node 'warp/grid_sample'): no gradient" in format_inspection(insp)


def test_an_op_on_another_output_only_blocks_that_output() -> None:
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w"], ["h"], name="fc"),
        n("Relu", ["h"], ["logits"], name="relu"),
        n("Unsqueeze", ["h", "axes"], ["h4"], name="to4d"),
        n("RoiAlign", ["h4", "rois", "idx"], ["pooled"], name="roi_align"),
    ]
    inits = [
        numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([[0, 0, 1, 1]], np.float32), "rois"),
        numpy_helper.from_array(np.zeros(1, np.int64), "idx"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 4, 1, 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (blocker,) = inspect_model(model).unsupported
    assert (blocker.op_type, blocker.outputs) == ("RoiAlign", ("pooled",))


def test_a_model_prepare_rejects_is_still_described() -> None:
    n = helper.make_node
    graph = helper.make_graph(
        [n("MatMul", ["x", "w"], ["h"], name="fc"), n("MyOp", ["h"], ["y"], name="custom", domain="my.domain")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)], ir_version=8
    )
    insp = inspect_model(model)
    assert [w.name for w in insp.weights] == ["w"]
    (problem,) = insp.problems
    assert "expected a model onnxruntime can load" in problem
    assert "prepare failed" in format_inspection(insp)


def test_cli_inspect_prints_and_writes_json(tmp_path: Path) -> None:
    path = tmp_path / "paddle.onnx"
    onnx.save(paddle_style(), path)
    out = tmp_path / "inspect.json"
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "opset 11 -> 13" in result.output and "DepthToSpace" in result.output
    doc = json.loads(out.read_text())
    assert doc["opset"] == 11 and doc["prepared_opset"] == 13
    assert [w["name"] for w in doc["weights"]] == ["conv_w", "head_w"]
    assert doc["totals"] == {"weights": 2, "activations": 2, "parameters": 8 * 3 * 3 * 3 + 4 * 8}
    assert {c["detail"].split(" ")[0] for c in doc["changes"] if c["kind"] == "rewrite"} == {
        "PRelu",
        "BatchNormalization",
        "Resize",
        "DepthToSpace",
    }
    assert doc["unsupported"] == [] and doc["problems"] == []


def test_cli_inspect_rejects_a_bad_input_shape_and_a_missing_model(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mobilenet_block(), path)
    bad = CliRunner().invoke(cli, ["inspect", str(path), "--input-shape", "x=1,3,a"])
    assert bad.exit_code == 2 and "expected NAME=D1,D2" in bad.output
    missing = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 2 and "error: expected an ONNX model file" in missing.output


def test_inspect_says_how_the_loss_reads_the_output() -> None:
    # An opset-12 Softmax the converter flattened: the loss must read the logits before it.
    insp = inspect_model(_softmax_model(12, 2, hide_rank=True))
    assert insp.loss is not None and insp.loss.class_axis == 2 and insp.loss.tap not in ("probs", None)
    assert "loss (default, no labels): categorical over axis 2 on 'probs', from " in format_inspection(insp)
    assert to_dict(insp)["loss"]["likelihood"] == "categorical"
