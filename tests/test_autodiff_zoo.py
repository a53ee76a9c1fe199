"""Every zoo model (models/zoo/), prepared and augmented as ``fitonnx score`` does, differentiated by
fitonnx's engine and by onnxruntime-training's GradientGraphBuilder: every gradient equal within
RTOL = 1e-4 relative (max |a − b| / max |b| per tensor; float32 rounding in different orders).
Only where the training build is installed (the reference needs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fitonnx import api
from fitonnx.fisher import engine, instrument, losses
from fitonnx.fisher.autodiff import build_gradient_graph
from fitonnx.model import graph
from tests.test_autodiff_harness import relative_error, session
from tests.test_autodiff_models import needs_training

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
RTOL = 1e-4


def _augmented(path: Path) -> tuple[instrument.AugmentedModel, object, dict[str, np.ndarray]]:
    """As ``api.gradient_model`` builds it, with the feed of the first calibration sample."""
    s = api.open_model(path)
    mode = losses.default_mode(s.data.labels)
    labels_dtype = None if s.data.labels is None else s.data.labels.dtype
    target = losses.resolve_output(s.prepared.model, s.ranks, None, None, s.data.labels, None)
    activations = [t for t in s.tensors if t.kind is graph.Kind.ACTIVATION]
    probe, names = instrument.build_probe(s.prepared.model, activations, target.tap)
    feed = s.data.sample(0, s.specs)
    values = engine.probe_values(probe, names, feed, 0)
    shapes = {k: v.shape for k, v in values.items()}
    target = losses.check_probabilities(target, values[target.tap])
    head = losses.build_head(target, mode, labels_dtype)
    declared = {**shapes, **{k: v.shape for k, v in feed.items() if k in s.specs}}
    aug = instrument.augment(
        s.prepared.model, s.tensors, head, labels_dtype, {k: len(v) for k, v in shapes.items()}, declared
    )
    run_feed = {k: v for k, v in feed.items() if k in s.specs}
    run_feed |= {z: np.zeros(shapes[a], np.float32) for a, z in aug.perturbations}
    if s.data.labels is not None:
        run_feed[losses.LABELS] = np.asarray(s.data.labels[:1])
    if head.noise is not None:
        noise_shape = head.noise_shape(tuple(values[target.tap].shape))
        run_feed[losses.NOISE] = losses.draw_noise(head.noise, noise_shape, np.random.default_rng(0))
    return aug, s.prepared.model, run_feed


@needs_training
@pytest.mark.parametrize("path", sorted(ZOO.glob("*.onnx")), ids=lambda p: p.stem)
def test_zoo_model_matches_gradient_graph_builder(path: Path) -> None:
    aug, prepared, feed = _augmented(path)
    wrt = list(aug.differentiate)
    fetch = [f"{w}_grad" for w in wrt]
    ours = session(build_gradient_graph(aug.model, losses.LOSS, wrt)).run(fetch, feed)
    theirs = session(instrument.gradient_graph(aug, prepared)).run(fetch, feed)
    errors = {w: relative_error(a, b) for w, a, b in zip(wrt, ours, theirs, strict=True)}
    print(f"{path.stem}: max relative difference {max(errors.values()):.2e} over {len(wrt)} tensors")
    assert max(errors.values()) <= RTOL, {w: e for w, e in errors.items() if e > RTOL}
