"""The benchmark's networks in PyTorch (ResNet-18, the bundled CNN, a BERT-sized encoder), with the
weights of their ONNX twins; imported by ``engines.py`` only when torch is installed."""

from __future__ import annotations

import io
import math
import warnings

import onnx
import torch
from onnx import numpy_helper
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0)) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """The torch twin of ``resnet18.py`` (same parameter names as its initializers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for s, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            self.add_module(f"layer{s}", nn.Sequential(_Block(cin, cout, stride), _Block(cout, cout, 1)))
            cin = cout
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))


class MnistCnn(nn.Module):
    """The torch twin of ``models/mnist_cnn.onnx`` (models/README.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1, 1)
        self.fc1 = nn.Linear(784, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, seq: int) -> None:
        super().__init__()
        self.heads, self.seq, self.dim = heads, seq, hidden // heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, heads, T, dim]; constant shape ops
            return t.reshape(-1, self.seq, self.heads, self.dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(self.dim), dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(-1, self.seq, self.heads * self.dim)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))


class Bert(nn.Module):
    """A BERT-base-sized encoder classifier (no attention mask: every sequence is full length)."""

    def __init__(self, vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12, seq: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.randn(seq, hidden) * 0.02)
        self.ln = nn.LayerNorm(hidden)
        self.layers = nn.Sequential(*(_Layer(hidden, heads, 4 * hidden, seq) for _ in range(layers)))
        self.pool = nn.Linear(hidden, hidden)
        self.cls = nn.Linear(hidden, 2)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.LayerNorm):  # distinct values, as trained; see the note in BENCHMARKS.md
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.normal_(m.bias, 0.0, 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.ln(self.embed(ids) + self.pos))
        return self.cls(torch.tanh(self.pool(x[:, 0])))


# --------------------------------------------------------------------------- the same weights in both


def _load_initializers(module: nn.Module, model: onnx.ModelProto) -> None:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = {k: torch.from_numpy(inits[k].copy()) for k in module.state_dict()}
    module.load_state_dict(state, strict=True)


def _export(module: nn.Module, example: torch.Tensor, input_name: str) -> onnx.ModelProto:
    buf = io.BytesIO()
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
    torch.onnx.export(
        module,
        (example,),
        buf,
        input_names=[input_name],
        output_names=["logits"],
        dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return onnx.load_from_string(buf.getvalue())
