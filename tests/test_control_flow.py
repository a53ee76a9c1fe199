"""Loop and Scan unrolled over a static trip count (prepare/rewrites/control_flow.py).

- A tanh RNN as a Scan over the time axis of x [1, T, 4] (forward and reverse), and a Loop with a
  constant trip count or one computed from x's static shape (TorchScript's ``range(x.size(1))``): the twin has no Loop/Scan, gives the original's outputs (onnxruntime runs both,
  scan outputs included), and the per-sample empirical Fisher of the weights read inside the body,
  in both engines, equals backpropagation through time in float64 numpy.
- The weights are counted once each (an independent count of the initializers); the body's
  activations are not scored (a quantizer in a body is one tensor over every step).
- A Loop whose trip count is computed from values, or whose body can end it early, is refused with
  one line naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fitonnx import api
from fitonnx.cli.main import cli
from fitonnx.fisher.engines import ENGINES as GRADIENT_ENGINES
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from fitonnx.model.runtime import make_session
from fitonnx.prepare.pipeline import prepare, relative_error

ENGINES = [
    pytest.param(
        "ort-training",
        marks=pytest.mark.skipif(
            not GRADIENT_ENGINES["ort-training"].available(), reason="the reference engine needs onnxruntime-training"
        ),
    ),
    "onnx",
]
RNG = np.random.default_rng(21)
W = (RNG.normal(size=(4, 3)) * 0.6).astype(np.float32)
R = (RNG.normal(size=(3, 3)) * 0.6).astype(np.float32)
WO = (RNG.normal(size=(3, 5)) * 0.8).astype(np.float32)
STEPS = 6
XS = RNG.normal(size=(8, 1, STEPS, 4)).astype(np.float32)
LABELS = RNG.integers(0, 5, size=(8, 1))
H0 = np.zeros((8, 1, 3), np.float32)  # the initial state, an input as many RNN exports have it
vi = helper.make_tensor_value_info


def _model(nodes: list[onnx.NodeProto], inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "control_flow", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _cell(h: str, x: str, out: str) -> list[onnx.NodeProto]:
    """out = tanh(x·W + h·R), W and R read from the outer graph."""
    return [
        helper.make_node("MatMul", [x, "W"], [f"{out}_xw"]),
        helper.make_node("MatMul", [h, "R"], [f"{out}_hr"]),
        helper.make_node("Add", [f"{out}_xw", f"{out}_hr"], [f"{out}_a"]),
        helper.make_node("Tanh", [f"{out}_a"], [out]),
    ]


def _weights() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(R, "R"),
        numpy_helper.from_array(WO, "Wo"),
    ]


INPUTS = [vi("x", TensorProto.FLOAT, [1, STEPS, 4]), vi("h0", TensorProto.FLOAT, [1, 3])]


def scan_rnn(reverse: bool = False) -> onnx.ModelProto:
    """x [1, T, 4] → Scan over axis 1 → final state · Wo = logits [1, 5]; states also stacked [1, T, 3]."""
    body = helper.make_graph(
        [*_cell("h_prev", "x_t", "h_next"), helper.make_node("Identity", ["h_next"], ["h_out"])],
        "cell",
        [vi("h_prev", TensorProto.FLOAT, [1, 3]), vi("x_t", TensorProto.FLOAT, [1, 4])],
        [vi("h_next", TensorProto.FLOAT, [1, 3]), vi("h_out", TensorProto.FLOAT, [1, 3])],
    )
    scan = helper.make_node(
        "Scan",
        ["h0", "x"],
        ["h_last", "states"],
        body=body,
        num_scan_inputs=1,
        scan_input_axes=[1],
        scan_input_directions=[1 if reverse else 0],
        scan_output_axes=[1],
    )
    return _model(
        [scan, helper.make_node("MatMul", ["h_last", "Wo"], ["logits"])],
        INPUTS,
        [vi("logits", TensorProto.FLOAT, [1, 5]), vi("states", TensorProto.FLOAT, [1, STEPS, 3])],
        _weights(),
    )


def loop_rnn(trip: str = "M", body_cond: str = "identity") -> onnx.ModelProto:
    """The same cell as a Loop of M steps over x_t = x[:, i] (Gather by the iteration number)."""
    cond_nodes = {
        "identity": [helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "early": [
            helper.make_node("ReduceSum", ["h_next"], ["total"], keepdims=0),
            helper.make_node("Less", ["total", "limit"], ["cond_out"]),
        ],
    }[body_cond]
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["x", "i"], ["x_t"], axis=1),
            *_cell("h_prev", "x_t", "h_next"),
            helper.make_node("Identity", ["h_next"], ["h_out"]),
            *cond_nodes,
        ],
        "loop_cell",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("h_prev", TensorProto.FLOAT, [1, 3])],
        [
            vi("cond_out", TensorProto.BOOL, []),
            vi("h_next", TensorProto.FLOAT, [1, 3]),
            vi("h_out", TensorProto.FLOAT, [1, 3]),
        ],
    )
    m = {"M": "M", "shape": "M_shape"}.get(trip, "M_run")
    nodes = [helper.make_node("Loop", [m, "", "h0"], ["h_last", "states"], body=body)]
    inits = [*_weights(), numpy_helper.from_array(np.array(100.0, np.float32), "limit")]
    if trip == "M":
        inits.append(numpy_helper.from_array(np.array(STEPS, np.int64), "M"))
    elif trip == "shape":  # x.size(1) as TorchScript writes a `for t in range(x.size(1))` loop
        nodes[:0] = [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Gather", ["x_shape", "one"], ["M_shape"], axis=0),
        ]
        inits.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    else:  # a trip count computed from the data's values (always 6 here, but only known at run time)
        nodes[:0] = [
            helper.make_node("ReduceSum", ["x"], ["x_sum"], keepdims=0),
            helper.make_node("Mul", ["x_sum", "zero"], ["x_zero"]),
            helper.make_node("Add", ["x_zero", "six"], ["x_six"]),
            helper.make_node("Cast", ["x_six"], ["M_run"], to=TensorProto.INT64),
        ]
        inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("zero", 0.0), ("six", STEPS))]
    nodes.append(helper.make_node("MatMul", ["h_last", "Wo"], ["logits"]))
    return _model(
        nodes,
        INPUTS,
        [vi("logits", TensorProto.FLOAT, [1, 5]), vi("states", TensorProto.FLOAT, [STEPS, 1, 3])],
        inits,
    )


MODELS = {
    "scan": scan_rnn,
    "scan-reverse": lambda: scan_rnn(reverse=True),
    "loop": loop_rnn,
    "loop-shape": lambda: loop_rnn(trip="shape"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unrolled_twin_gives_the_original_outputs(name: str) -> None:
    model = MODELS[name]()
    prepared = prepare(model)
    ops = {n.op_type for n in prepared.model.graph.node}
    assert not ops & {"Loop", "Scan"}
    assert any(c.kind == "unroll" and f"unrolled over {STEPS} steps" in c.detail for c in prepared.changes)
    a, b = make_session(model.SerializeToString()), make_session(prepared.model.SerializeToString())
    for x in XS:
        feed = {"x": x, "h0": np.full((1, 3), 0.1, np.float32)}
        for want, got in zip(a.run(None, feed), b.run(None, feed), strict=True):
            assert relative_error(want, got) <= 1e-6


def _bptt(x: np.ndarray, label: int, reverse: bool) -> dict[str, np.ndarray]:
    """Gradients of the cross-entropy of the tanh RNN, backpropagated through time (float64)."""
    w, r, wo = (a.astype(np.float64) for a in (W, R, WO))
    steps = x[0, ::-1] if reverse else x[0]
    hs = [np.zeros((1, 3))]
    for x_t in steps:
        hs.append(np.tanh(x_t[None].astype(np.float64) @ w + hs[-1] @ r))
    z = hs[-1] @ wo
    dz = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    dz[0, label] -= 1
    grads = {"W": np.zeros_like(w), "R": np.zeros_like(r), "Wo": hs[-1].T @ dz}
    dh = dz @ wo.T
    for t in range(len(steps), 0, -1):
        da = dh * (1 - hs[t] ** 2)
        grads["W"] += steps[t - 1][None].T @ da
        grads["R"] += hs[t - 1].T @ da
        dh = da @ r.T
    return grads


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_inside_the_body_are_scored_once(name: str, engine: str) -> None:
    model = MODELS[name]()
    data = Dataset(arrays={"x": XS, "h0": H0}, labels=LABELS, source="x")
    options = FisherOptions(fisher="empirical", output="logits", engine=engine)
    traces, _, _ = api.fisher_traces(api.open_model(model, data), options)
    weights = [t for t in traces.tensors if t.kind.value == "weight"]
    assert sorted(t.name for t in weights) == ["R", "W", "Wo"]
    assert sum(t.numel for t in weights) == W.size + R.size + WO.size == 36
    got = {t.name: traces.per_sample[:, j] for j, t in enumerate(traces.tensors)}
    want = {k: [] for k in ("W", "R", "Wo")}
    for x, label in zip(XS, LABELS[:, 0], strict=True):
        for k, g in _bptt(x, int(label), name == "scan-reverse").items():
            want[k].append(np.sum(g**2))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, err_msg=k)
        assert np.all(got[k] > 0)


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (lambda: loop_rnn(trip="values"), "expected a trip count M known before running"),
        (lambda: loop_rnn(body_cond="early"), "expected the body to keep the loop condition true"),
    ],
)
def test_loop_without_a_static_trip_count_is_refused(tmp_path, model, why: str) -> None:
    path = tmp_path / "loop.onnx"
    onnx.save(model(), path)
    data = tmp_path / "x.npz"
    np.savez(data, x=XS[:, 0], h0=H0[:, 0])
    result = CliRunner().invoke(cli, ["score", str(path), "--data", str(data), "--output", "logits"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Loop" in lines[0] and why in lines[0], result.output
    assert "Traceback" not in result.output
