"""Weights kept as external data end to end (the path of models over 2 GiB), on small models.

``external.KEEP_EXTERNAL_BYTES`` is lowered to 0 so that a few-kilobyte model takes the same path
as a 2.25 GiB one (scripts/big_mlp.py; its peak memory is in BENCHMARKS.md): its initializers stay
references to the data file through prepare, the gradient model and every session, and its
per-sample values must equal those of the same model read into memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli
from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import fisher_traces, gradient_model, open_model
from fitonnx.model import external
from tests.conftest import tiny_classifier

MODELS = Path(__file__).resolve().parent.parent / "models"
pytestmark = pytest.mark.skipif(
    not external.supported(), reason="weights stay external with onnxruntime >= 1.20 (1.19 reads them in)"
)


def _external_copy(model: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("batch", [1, 4])
def test_kept_external_equals_read_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The bundled CNN with its weights in a data file: same per-sample values as read into memory,
    a gradient model that holds no weight, and the model's folder left as it was."""
    cnn = MODELS / "mnist_cnn.onnx"
    data = MODELS / "mnist_cnn.calib.npz"
    path = _external_copy(onnx.load(cnn), tmp_path / "ext")
    before = _digest(path.parent)
    options = FisherOptions(engine="onnx", max_samples=6, batch_size=batch)
    inline, _, _ = fisher_traces(open_model(cnn, data, max_samples=6), options)
    monkeypatch.setattr(external, "KEEP_EXTERNAL_BYTES", 0)
    s = open_model(path, data, max_samples=6)
    assert external.external_tensors(s.prepared.model)  # still references, not values
    gm, _, _ = gradient_model(s, options)
    weights = sum(int(np.prod(t.dims)) * 4 for t in onnx.load(cnn).graph.initializer)
    assert len(gm.model_bytes) < weights / 10
    kept, _, _ = fisher_traces(s, options)
    assert kept.batch_size == batch
    rel = np.abs(kept.per_sample - inline.per_sample) / inline.per_sample
    assert rel.max() <= 1e-5
    assert kept.act_max == pytest.approx(inline.act_max, rel=1e-6)
    assert _digest(path.parent) == before


def test_cli_scores_a_model_kept_external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _external_copy(tiny_classifier(), tmp_path / "tiny")
    monkeypatch.setattr(external, "KEEP_EXTERNAL_BYTES", 0)
    result = CliRunner().invoke(cli, ["score", str(path), "--random-data", "4", "--engine", "onnx"])
    assert result.exit_code == 0, result.output
    assert "w1" in result.output and "w2" in result.output


def test_tensor_array_reads_one_external_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _external_copy(tiny_classifier(), tmp_path / "one")  # onnx.save_model moves its data out
    model = tiny_classifier()
    monkeypatch.setattr(external, "KEEP_EXTERNAL_BYTES", 0)
    s = open_model(path, None, random_samples=2)
    kept = {t.name: t for t in s.loaded.proto.graph.initializer}
    for t in model.graph.initializer:
        np.testing.assert_array_equal(external.tensor_array(kept[t.name]), onnx.numpy_helper.to_array(t))
