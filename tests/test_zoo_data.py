"""The shipped realistic sets of models/zoo/data (scripts/data/build_data.py): each pairs a calibration
and a held-out file that feed their model, stay small, and share no sample; the detector's scenes
are ones the real DBNet finds text in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
DATA = ZOO / "data"
MAX_BYTES = 560_000  # the data README's "about 550 kB each"
# The VAD's held-out chunks must span minutes of speech to measure damage reliably (256 chunks)
LARGER = {"silero_vad_16k_op15.heldout.npz": 850_000}
MODELS = sorted(p.name.removesuffix(".calib.npz") for p in DATA.glob("*.calib.npz"))


def test_every_model_has_both_sets() -> None:
    assert "ppocrv4_det_dbnet" in MODELS
    held = sorted(p.name.removesuffix(".heldout.npz") for p in DATA.glob("*.heldout.npz"))
    assert held == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_sets_feed_the_model_and_share_no_sample(name: str) -> None:
    inputs = {i.name: len(i.type.tensor_type.shape.dim) for i in onnx.load(ZOO / f"{name}.onnx").graph.input}
    sets = []
    for split in ("calib", "heldout"):
        path = DATA / f"{name}.{split}.npz"
        assert path.stat().st_size <= LARGER.get(path.name, MAX_BYTES)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        assert set(inputs) <= set(arrays)
        assert all(arrays[k].ndim in (rank, rank + 1) for k, rank in inputs.items())  # batch or one extra axis
        sets.append(arrays)
    main = max(inputs, key=lambda k: sets[0][k][0].size)  # the largest input: image, audio or tokens
    calib = {a.tobytes() for a in sets[0][main]}
    assert not calib & {a.tobytes() for a in sets[1][main]}


def test_detector_finds_text_in_its_scenes() -> None:
    """DBNet's probability map on the held-out scenes: a sizeable share of text pixels (p > 0.5) and
    a background near 0, as on the real images it was trained for (without the boxes, which the
    builder prints, this checks the map's shape of a working detector)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(ZOO / "ppocrv4_det_dbnet.onnx"), options, providers=["CPUExecutionProvider"])
    with np.load(DATA / "ppocrv4_det_dbnet.heldout.npz") as f:
        x = f["x"]
    p = session.run(None, {"x": x})[0][:, 0]
    assert p.shape == x.shape[:1] + x.shape[2:]
    text = (p > 0.5).mean(axis=(1, 2))
    assert np.all(text > 0.03) and 0.08 < text.mean() < 0.35
    assert np.median(p) < 0.01
