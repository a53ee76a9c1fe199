"""One small encoder exported by both PyTorch exporters, as users export them (issue 14).

``encoder_shared_ln_ts.onnx`` (TorchScript exporter, opset 17) and ``encoder_shared_ln_dynamo.onnx``
(dynamo exporter): embedding → two blocks (LayerNorm, FFN, residual) → final LayerNorm, with two
outputs, ``last_hidden_state`` [N, 8, 16] and ``pooler_output`` [N, 16] (Tanh of a Linear of the
first position). The LayerNorms keep PyTorch's untouched initialisation (scale 1, bias 0), so the
exporters merge the equal tensors: the dynamo exporter into one initializer read by every
LayerNormalization, the TorchScript exporter through Identity nodes. The Linear weights are random.
Calibration data ``<name>.calib.npz``: 16 random token sequences (the same for both files).

Needs a separate venv with torch (the project stays torch-free)::

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.13.0 onnx onnxscript numpy

Run: ``/tmp/tvenv/bin/python scripts/zoo/export_torch_kinds.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
VOCAB, DIM, SEQ = 40, 16, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 32)
        self.down = nn.Linear(32, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.final_norm = nn.LayerNorm(DIM)
        self.pool = nn.Linear(DIM, DIM)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(h)
        return h, torch.tanh(self.pool(h[:, 0]))


def main() -> None:
    torch.manual_seed(14)
    torch.set_num_threads(2)
    model = Encoder().eval()
    ids = torch.randint(0, VOCAB, (1, SEQ))
    names = {"input_names": ["input_ids"], "output_names": ["last_hidden_state", "pooler_output"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids,), ZOO / "encoder_shared_ln_ts.onnx", dynamo=False, opset_version=17, **names)
        program = torch.onnx.export(model, (ids,), dynamo=True, **names)
        program.save(str(ZOO / "encoder_shared_ln_dynamo.onnx"))
    calib = np.random.default_rng(14).integers(0, VOCAB, size=(16, 1, SEQ)).astype(np.int64)
    for name in ("encoder_shared_ln_ts", "encoder_shared_ln_dynamo"):
        onnx.checker.check_model(onnx.load(ZOO / f"{name}.onnx"))
        np.savez(ZOO / f"{name}.calib.npz", input_ids=calib)
        print(f"wrote models/zoo/{name}.onnx ({(ZOO / f'{name}.onnx').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
