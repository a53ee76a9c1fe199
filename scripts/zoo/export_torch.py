"""Export three small PyTorch architectures (random weights) into models/zoo/, one per exporter path.

* ``mbv3_small_ts.onnx``: a MobileNetV3-Small (width 0.5, 96x96 input, 10 classes) through the
  TorchScript exporter (``dynamo=False``, opset 17) with ``do_constant_folding=False``, so every
  BatchNormalization stays unfolded in inference form after its Conv; Hardswish/Hardsigmoid ops,
  squeeze-and-excitation blocks. Random weights (torchvision-style init, biases and BN scale/shift
  perturbed so that no two tensors are equal, as in a trained model); the BN running statistics
  are estimated on crops of scikit-learn's sample photos, so activations have realistic scales.
* ``tiny_bert_dynamo.onnx``: a 2-layer BERT-style encoder (hidden 64, 4 heads, word-level vocabulary
  of the zoo's English text) with a masked-LM head tied to the word embeddings, through the dynamo
  exporter (``dynamo=True``, its default opset 20): Gather embeddings, attention MatMuls, Softmax,
  LayerNormalization, Gelu. Inputs ``input_ids``/``attention_mask`` [batch, seq] int64, output
  ``logits`` [batch, seq, vocab]. Random BERT init (normal, std 0.02), biases and LayerNorm
  scale/shift perturbed as for the MobileNet.
* ``gru_charlm_dynamo.onnx``: a character-level language model, Embedding -> GRU (hidden 64) ->
  Linear, through the dynamo exporter, with the GRU state as input ``h0`` [1, batch, 64] and
  output ``hn``: tokens ``tokens`` [batch, seq] int64, output ``logits`` [batch, seq, vocab].
  Random weights (PyTorch's default init).

Needs (a separate venv; the project's own venv stays torch-free)::

    python3 -m venv /work/zoovenv
    /work/zoovenv/bin/pip install torch==2.13.0 onnxscript onnx onnxruntime scikit-learn pillow

Run from anywhere: ``/work/zoovenv/bin/python scripts/zoo/export_torch.py``. Seeds are fixed and
torch uses 2 threads. Each export is checked with onnx.checker and against torch's output in
onnxruntime (max abs diff printed, failure above 1e-4). The vocabularies are written beside the
models (``*.vocab.txt``, one token a line) for make_calib.py.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_common

SEED = 0
MAX_ABS_DIFF = 1e-4
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BERT_MAX_LEN = 32
CHAR_VOCAB = ["<unk>", *[chr(c) for c in range(32, 127)]]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def perturb_norm(module: nn.BatchNorm2d | nn.LayerNorm) -> None:
    """Scale ~ 1 + N(0, 0.1), shift ~ N(0, 0.05), as after training.

    With the default init (ones and zeros) every norm layer of a width holds EQUAL tensors, which the
    exporters merge (one shared initializer, or Identity nodes); no trained model looks like that.
    """
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
        module.bias.copy_(0.05 * torch.randn_like(module.bias))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 Conv-ReLU, 1x1 Conv-Hardsigmoid, channel scaling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _make_divisible(channels // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int, act: type[nn.Module] | None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class BneckConfig:
    """One inverted-residual block of MobileNetV3 (Howard et al. 2019, table 2)."""

    kernel: int
    expanded: int
    out: int
    se: bool
    hardswish: bool
    stride: int


# MobileNetV3-Small, table 2 of the paper (channels before the width multiplier).
MBV3_SMALL = (
    BneckConfig(3, 16, 16, True, False, 2),
    BneckConfig(3, 72, 24, False, False, 2),
    BneckConfig(3, 88, 24, False, False, 1),
    BneckConfig(5, 96, 40, True, True, 2),
    BneckConfig(5, 240, 40, True, True, 1),
    BneckConfig(5, 240, 40, True, True, 1),
    BneckConfig(5, 120, 48, True, True, 1),
    BneckConfig(5, 144, 48, True, True, 1),
    BneckConfig(5, 288, 96, True, True, 2),
    BneckConfig(5, 576, 96, True, True, 1),
    BneckConfig(5, 576, 96, True, True, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise kxk, optional SE, project 1x1; residual when shapes allow."""

    def __init__(self, cin: int, cfg: BneckConfig, width: float) -> None:
        super().__init__()
        expanded, out = _make_divisible(cfg.expanded * width), _make_divisible(cfg.out * width)
        act = nn.Hardswish if cfg.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv_bn(cin, expanded, 1, 1, 1, act))
        layers.append(_conv_bn(expanded, expanded, cfg.kernel, cfg.stride, expanded, act))
        if cfg.se:
            layers.append(SqueezeExcite(expanded))
        layers.append(_conv_bn(expanded, out, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.residual = cfg.stride == 1 and cin == out
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small with a width multiplier; classifier Linear-Hardswish-Dropout-Linear, logits out."""

    def __init__(self, width: float = 0.5, classes: int = 10, hidden: int = 256) -> None:
        super().__init__()
        stem = _make_divisible(16 * width)
        blocks: list[nn.Module] = [_conv_bn(3, stem, 3, 2, 1, nn.Hardswish)]
        channels = stem
        for cfg in MBV3_SMALL:
            block = InvertedResidual(channels, cfg, width)
            blocks.append(block)
            channels = block.out_channels
        last = 6 * channels
        blocks.append(_conv_bn(channels, last, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.normal_(module.bias, 0, 0.02)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.normal_(module.bias, 0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                perturb_norm(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def imagenet_normalize(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW with ImageNet mean/std (torchvision's convention)."""
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    return ((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy()


def photo_batch(count: int, size: int, seed: int) -> np.ndarray:
    """``count`` random crops (zoom 1-4x) of the sample photos, resized to size x size, ImageNet-normalised."""
    rng = np.random.default_rng(seed)
    crops = [zoo_common.photo_crop((size, size), rng, scale=rng.uniform(1.0, 4.0)) for _ in range(count)]
    return imagenet_normalize(np.stack(crops))


def calibrate_batchnorm(model: nn.Module, images: np.ndarray) -> None:
    """Replace the BN running statistics by their cumulative average over ``images`` (batches of 32)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 32):
            model(torch.from_numpy(images[start : start + 32]))
    model.eval()


def word_tokens(text: str) -> list[str]:
    """Lower-case words and single punctuation marks (a word-level stand-in for WordPiece)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def bert_vocab() -> list[str]:
    """Specials, then every token of the zoo's English sentences by decreasing frequency (ties by name)."""
    counts: dict[str, int] = {}
    for sentence in zoo_common.english_sentences():
        for token in word_tokens(sentence):
            counts[token] = counts.get(token, 0) + 1
    return [*BERT_SPECIALS, *sorted(counts, key=lambda t: (-counts[t], t))]


class EncoderLayer(nn.Module):
    """Post-LN BERT layer with explicit attention MatMuls (so the export shows them as MatMul nodes)."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
        )
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in, self.ffn_out = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.gelu = nn.GELU()
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.head_dim**0.5 + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(x.shape)
        x = self.attn_norm(x + self.attn_out(context))
        return self.ffn_norm(x + self.ffn_out(self.gelu(self.ffn_in(x))))


class TinyBert(nn.Module):
    """Word + position embeddings, LayerNorm, encoder layers, masked-LM head tied to the word embeddings."""

    def __init__(self, vocab: int, hidden: int = 64, heads: int = 4, ffn: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(BERT_MAX_LEN, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.head_dense = nn.Linear(hidden, hidden)
        self.head_gelu = nn.GELU()
        self.head_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.head_bias = nn.Parameter(torch.zeros(vocab))
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, 0, 0.02)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.bias, 0, 0.02)
            elif isinstance(module, nn.LayerNorm):
                perturb_norm(module)
        nn.init.normal_(self.head_bias, 0, 0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.emb_norm(self.word(input_ids) + self.position(positions))
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        x = self.head_norm(self.head_gelu(self.head_dense(x)))
        return torch.matmul(x, self.word.weight.t()) + self.head_bias


class CharGru(nn.Module):
    """Embedding -> single-layer GRU with explicit initial state -> Linear over the character vocabulary."""

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, hn = self.gru(self.embed(tokens), h0)
        return self.out(y), hn


def check_export(path: Path, model: nn.Module, feeds: dict[str, np.ndarray]) -> None:
    """onnx.checker, then onnxruntime's outputs against torch's on ``feeds``; fails above MAX_ABS_DIFF."""
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    with torch.no_grad():
        want = model(*(torch.from_numpy(v) for v in feeds.values()))
    want = want if isinstance(want, tuple) else (want,)
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))
    if diff > MAX_ABS_DIFF:
        raise RuntimeError(
            f"expected onnxruntime to match torch within {MAX_ABS_DIFF} on {path.name}; found {diff:.2e}"
        )
    size = path.stat().st_size / 1e3
    print(
        f"  wrote {path.relative_to(zoo_common.REPO)} ({size:.0f} kB), opset {onnx.load(path).opset_import[0].version}, max |ort - torch| = {diff:.1e}"
    )


def export_mbv3(out: Path) -> None:
    """MobileNetV3-Small, BN calibrated on photo crops, TorchScript exporter with BN left unfolded."""
    torch.manual_seed(SEED)
    model = MobileNetV3Small()
    calibrate_batchnorm(model, photo_batch(256, 96, seed=SEED + 1))
    example = torch.from_numpy(photo_batch(2, 96, seed=SEED + 2))
    torch.onnx.export(
        model,
        (example,),
        str(out),
        dynamo=False,
        opset_version=17,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    check_export(out, model, {"input": example.numpy()})


def export_tiny_bert(out: Path) -> None:
    """Tiny BERT with a tied MLM head, dynamo exporter, dynamic batch and sequence axes."""
    vocab = bert_vocab()
    (out.parent / "tiny_bert_dynamo.vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(SEED)
    model = TinyBert(len(vocab)).eval()
    ids = torch.randint(5, len(vocab), (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=BERT_MAX_LEN)
    program = torch.onnx.export(
        model,
        (ids, mask),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    program.save(str(out))
    check_export(out, model, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})


def export_char_gru(out: Path) -> None:
    """Character GRU LM with state input/output, dynamo exporter, dynamic batch and sequence axes."""
    torch.manual_seed(SEED)
    model = CharGru(len(CHAR_VOCAB)).eval()
    tokens = torch.randint(1, len(CHAR_VOCAB), (2, 24))
    h0 = torch.randn(1, 2, 64) * 0.1
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        model,
        (tokens, h0),
        dynamo=True,
        input_names=["tokens", "h0"],
        output_names=["logits", "hn"],
        dynamic_shapes={"tokens": {0: batch, 1: seq}, "h0": {1: batch}},
    )
    program.save(str(out))
    check_export(out, model, {"tokens": tokens.numpy(), "h0": h0.numpy()})


EXPORTS: dict[str, Callable[[Path], None]] = {
    "mbv3_small_ts": export_mbv3,
    "tiny_bert_dynamo": export_tiny_bert,
    "gru_charlm_dynamo": export_char_gru,
}


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    zoo_common.ZOO.mkdir(parents=True, exist_ok=True)
    for name in names or list(EXPORTS):
        if name not in EXPORTS:
            raise SystemExit(f"expected one of {sorted(EXPORTS)}; found {name!r}")
        print(f"{name}:")
        EXPORTS[name](zoo_common.ZOO / f"{name}.onnx")


if __name__ == "__main__":
    main(sys.argv[1:])
