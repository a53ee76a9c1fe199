"""Every zoo model (models/zoo/), prepared and augmented as ``fitonnx score`` does, differentiated by
fitonnx's engine and by onnxruntime-training's GradientGraphBuilder: every gradient equal within
RTOL = 1e-4 relative (max |a − b| / max |b| per tensor; float32 rounding in different orders).
Only where the training build is installed (the reference needs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fitonnx import api
from fitonnx.fisher import instrument, losses, outputs
from fitonnx.fisher import session as fisher_session
from fitonnx.fisher.autodiff import build_gradient_graph
from fitonnx.fisher.options import FisherOptions
from tests.test_autodiff_harness import relative_error, session
from tests.test_autodiff_models import needs_training

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
RTOL = 1e-4


def _augmented(path: Path) -> tuple[instrument.AugmentedModel, object, dict[str, np.ndarray]]:
    """As ``api.gradient_model`` builds it (every output of the default loss, the tensors reaching
    them), with the feed of the first calibration sample."""
    s = api.open_model(path)
    mode = losses.default_mode(s.data.labels)
    labels_dtype = None if s.data.labels is None else s.data.labels.dtype
    feed = s.data.sample(0, s.specs)
    targets, values, _ = fisher_session._loss_targets(s, FisherOptions(), feed, 0, mode)
    tensors, _ = fisher_session._reaching(s, targets)
    head = outputs.combine([losses.build_head(t, mode, labels_dtype) for t in targets])
    shapes = {k: v.shape for k, v in values.items()}
    declared = {**shapes, **{k: v.shape for k, v in feed.items() if k in s.specs}}
    aug = instrument.augment(
        s.prepared.model, tensors, head, labels_dtype, {k: len(v) for k, v in shapes.items()}, declared
    )
    run_feed = {k: v for k, v in feed.items() if k in s.specs}
    run_feed |= {z: np.zeros(shapes[a], np.float32) for a, z in aug.perturbations}
    if s.data.labels is not None:
        run_feed[losses.LABELS] = np.asarray(s.data.labels[:1])
    rng = np.random.default_rng(0)
    for part in head.heads:
        if part.noise is not None:
            noise_shape = part.noise_shape(tuple(values[part.target.tap].shape))
            run_feed[part.noise_input] = losses.draw_noise(part.noise, noise_shape, rng)
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
