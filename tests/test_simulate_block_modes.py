"""Dynamic block formats as modes of the simulation's activation patterns: a block format picks its
own model variant, whose only nodes on that activation are the format's block quantize-dequantize
(no Where branches), and its own session. Numerics: tests/test_activation_blocks.py."""

from __future__ import annotations

import numpy as np
import onnx

from fitonnx import api
from fitonnx.analysis import simulate
from fitonnx.analysis.block_sim import BlockMode
from fitonnx.analysis.simulate import ActMode, Config
from fitonnx.formats import parse_format
from fitonnx.formats.block_nodes import block_layout, block_qdq_nodes
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind
from tests.test_activation_blocks import BLOCK_FORMATS, _attention


def test_a_block_format_is_a_mode_with_its_own_variant_and_session() -> None:
    rng = np.random.default_rng(3)
    data = Dataset({"x": rng.normal(0, 1, (2, 1, 4, 48)).astype(np.float32)}, rng.integers(0, 10, (2, 1)))
    s = api.open_model(_attention(), data)
    fmts = [parse_format(f) for f in BLOCK_FORMATS]
    sim = simulate.build(s.prepared.model, s.tensors, "logits", s.specs, fmts)
    acts = [t.name for t in s.tensors if t.kind is Kind.ACTIVATION]
    ranges = {a: (-3.0, 2.0) for a in acts}
    simulator = simulate.Simulator(sim, s.prepared.model, s.tensors, ranges, simulate.GridScheme(), data, s.specs)
    k = acts.index("q")
    base = onnx.load_from_string(sim.model_bytes)
    assert not {n.op_type for n in base.graph.node} & {"Round", "Where"}
    for f, fmt in zip(BLOCK_FORMATS, fmts, strict=True):
        modes = simulator.modes(simulator.feed(Config({}, {"q": f, acts[0]: 8})))
        assert modes[k] == BlockMode(f, -1) and modes[0] is ActMode.INTEGER
        assert all(m is ActMode.KEPT for j, m in enumerate(modes) if j not in (0, k))
        only = [ActMode.KEPT] * len(acts)
        only[k] = modes[k]
        model = onnx.load_from_string(simulate.variant(sim, only))
        ts = sim.activations[k].blocks[BLOCK_FORMATS.index(f)].tensor_scale
        want, _ = block_qdq_nodes("q", "p_", fmt, block_layout((1, 4, 40), -1, fmt.block_size or 1), 17, ts)
        assert len(model.graph.node) - len(base.graph.node) == len(want)
        declared = {i.name for i in model.graph.input} - {i.name for i in base.graph.input}
        assert declared == ({ts} if f.startswith("nvfp4") else set())
        simulator.run(Config({}, {"q": f}))
    assert {m[k] for m in simulator._sessions} >= {
        BlockMode(f, -1) for f in BLOCK_FORMATS
    }  # K: MatMul counts from the end
