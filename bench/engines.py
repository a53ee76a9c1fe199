"""Samples/s of fitonnx's two gradient engines against each other and against PyTorch, one run.

Three networks, the same weights in PyTorch and in ONNX (checked: max |logit difference|):

- ``resnet18``: ResNet-18 at 224x224 (BatchNorm folded), the ONNX graph of ``resnet18.py`` with its
  initializers loaded into a torch twin;
- ``bert``: a BERT-sized encoder: BERT-base's layer (hidden 768, 12 heads, FFN 3072) and
  vocabulary (30522), 4 layers instead of 12 to keep the run short (``--bert-layers``), learned
  positions, sequence 128, CLS pooler, 2 classes; built in torch with random weights and exported
  with ``torch.onnx.export(..., dynamo=False)`` (opset 17);
- ``cnn``: the bundled ``models/mnist_cnn.onnx`` with its initializers loaded into a torch twin.

Random inputs (the CNN: its calibration images, cycled) and random labels, so the empirical Fisher.
Every variant runs with 2 threads (onnxruntime ``intra_op_num_threads=2``, ``torch.set_num_threads(2)``):

- ``onnx`` / ``ort-training``: the fitonnx per-sample scoring loop (batch 1) with that engine. The
  gradient model is built once per engine with ``api.gradient_model`` (``fisher_traces`` is exactly
  ``gradient_model`` then ``engine.run``); each round times ``engine.run`` (it creates its session)
  and counts samples 2..N as in ``bench_score.py``. Per sample this is the gradient of every
  quantizable weight *and* of every tapped activation, reduced to squared norms in the graph.
- ``onnx batched B``: ``fisher.autodiff.per_sample_sqnorms`` on the network plus a summed
  SoftmaxCrossEntropyLoss, batch B: per-sample squared norms of the quantizable *weights* only (no
  activation gradients) from one batched pass. The scoring loop does not use it yet. Session made
  once and warmed up with one batch; each round times ceil(N / B) batches.
- ``torch b1``: PyTorch per sample, batch 1: forward, summed cross-entropy, ``autograd.grad`` of
  every parameter, squared norms; samples 2..min(N, 64) timed after one warm-up sample.
- ``torch batched 32``: PyTorch forward+backward of batch 32 (one gradient of the summed loss, NOT
  per-sample): a speed reference only. ceil(N / 32) batches after one warm-up batch.

Variants are interleaved in rounds (order reversed every other round); the table gives medians and
each median's ratio to ``ort-training``. Once per network the script checks the two engines' per-sample
traces against each other, and the batched norms against the loop's weight traces.

    python bench/engines.py [--rounds 3] [--nets resnet18,bert,cnn] [--samples resnet18=12,bert=8,cnn=512] [--bert-layers 4]

Needs torch (a bench-only dependency, not one of fitonnx's) and onnxruntime-training for ``ort-training``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from resnet18 import build_resnet18  # beside this script, which Python puts on sys.path

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "bench/engines.py needs PyTorch (a benchmark-only dependency, not one of fitonnx's): "
        "pip install torch==2.13.0 in the benchmark venv"
    )

import fitonnx
from fitonnx import api
from fitonnx.fisher import engine
from fitonnx.fisher.autodiff import per_sample_sqnorms
from fitonnx.fisher.options import FisherOptions
from fitonnx.model import graph
from fitonnx.model.runtime import make_session
from fitonnx.progress import Ticks

THREADS = 2
ROOT = Path(__file__).resolve().parent.parent
TORCH_BATCH = 32
ONNX_BATCHES = (8, 32)
DEFAULT_SAMPLES = {"resnet18": 12, "bert": 8, "cnn": 512}
TORCH_B1_MAX = 64  # torch per-sample samples per round (at 2 threads on a busy machine it is slow on small nets)
BERT_LAYERS = 4


# --------------------------------------------------------------------------- networks in torch


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


@dataclass
class Net:
    name: str
    label: str
    module: nn.Module
    onnx_model: onnx.ModelProto  # batch axis symbolic, output ``logits``
    input_name: str
    data: fitonnx.Dataset
    logit_diff: float = math.nan


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


def build_net(name: str, n: int, seed: int, bert_layers: int = BERT_LAYERS) -> Net:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if name == "resnet18":
        model = build_resnet18(seed)
        module = ResNet18()
        _load_initializers(module, model)
        x = rng.standard_normal((n, 3, 224, 224)).astype(np.float32)
        labels = rng.integers(0, 1000, n)
        net = Net(name, "ResNet-18 224x224", module, model, "input", fitonnx.Dataset({"input": x}, labels, "random"))
    elif name == "cnn":
        model = onnx.load(str(ROOT / "models" / "mnist_cnn.onnx"))
        module = MnistCnn()
        _load_initializers(module, model)
        calib = np.load(ROOT / "models" / "mnist_cnn.calib.npz", allow_pickle=False)
        x = np.resize(calib["input"], (n, *calib["input"].shape[1:])).astype(np.float32)
        labels = rng.integers(0, 10, n)
        net = Net(name, "bundled CNN (mnist_cnn.onnx)", module, model, "input", fitonnx.Dataset({"input": x}, labels))
    elif name == "bert":
        module = Bert(layers=bert_layers).eval()
        ids = rng.integers(0, 30522, (n, 128))
        model = _export(module, torch.from_numpy(ids[:2]), "input_ids")
        labels = rng.integers(0, 2, n)
        data = fitonnx.Dataset({"input_ids": ids}, labels, "random")
        net = Net(name, f"BERT-sized encoder ({bert_layers} x 768), seq 128", module, model, "input_ids", data)
    else:
        raise SystemExit(f"unknown network {name!r}; expected resnet18, bert or cnn")
    x = net.data.arrays[net.input_name][:2]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = make_session(net.onnx_model.SerializeToString(), THREADS).run(["logits"], {net.input_name: x})[0]
    net.logit_diff = float(np.max(np.abs(got - want)))
    return net


# --------------------------------------------------------------------------- variants


@dataclass
class Timed:
    rate: float  # samples/s
    extra: object = None


class _Clock:
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def tick(self, _n: int = 1) -> None:
        self.stamps.append(time.perf_counter())

    def rate(self) -> float:  # samples 2..N, as bench_score.py
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def loss_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a summed SoftmaxCrossEntropyLoss on ``logits`` against an input ``labels``."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    g = work.graph
    g.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"]))
    g.node.append(helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"], reduction="sum"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    return work


def _log(text: str) -> None:
    print(f"  [{text}]", flush=True)


class Bench:
    """One network's prepared variants: each ``run_*`` is one timed measurement."""

    def __init__(self, net: Net, n: int) -> None:
        self.net, self.n = net, n
        t0 = time.perf_counter()
        self.session = api.open_model(net.onnx_model, net.data, max_samples=n)
        self.open_s = time.perf_counter() - t0
        _log(f"open_model {self.open_s:.1f} s")
        self.weights = [t.name for t in self.session.tensors if t.kind is graph.Kind.WEIGHT]
        self.gms: dict[str, object] = {}
        self.build_s: dict[str, float] = {}
        for name in ("onnx", "ort-training"):
            t0 = time.perf_counter()
            self.gms[name] = api.gradient_model(self.session, FisherOptions(engine=name), threads=THREADS)[0]
            self.build_s[name] = time.perf_counter() - t0
            _log(f"gradient model, {name}: {self.build_s[name]:.1f} s")
        t0 = time.perf_counter()
        norms = per_sample_sqnorms(loss_model(net.onnx_model), "loss", self.weights)
        self.batched = make_session(norms.SerializeToString(), THREADS)
        self.batched_build_s = time.perf_counter() - t0
        _log(f"batched norms model and session {self.batched_build_s:.1f} s")
        self.fetch = [f"{w}_sqnorm" for w in self.weights]
        self.module = net.module
        self.params = [p for p in self.module.parameters()]
        for b in ONNX_BATCHES:
            self.batched.run(self.fetch, self._feed(0, b))  # warm-up, one per batch size
        self.run_torch_b1(warm=True)
        self.run_torch_batched(warm=True)

    def _feed(self, start: int, b: int) -> dict[str, np.ndarray]:
        idx = np.arange(start, start + b) % self.n
        return {
            self.net.input_name: self.net.data.arrays[self.net.input_name][idx],
            "labels": self.net.data.labels[idx],
        }

    def run_engine(self, name: str) -> Timed:
        clock = _Clock()
        options = FisherOptions(max_samples=self.n, engine=name).run_options(THREADS)
        s = self.session
        traces = engine.run(self.gms[name], s.data, s.specs, options, progress=Ticks(clock.tick))
        return Timed(clock.rate(), traces)

    def run_batched(self, b: int) -> Timed:
        batches = max(1, math.ceil(self.n / b))
        feeds = [self._feed(i * b, b) for i in range(batches)]
        t0 = time.perf_counter()
        out = [self.batched.run(self.fetch, f) for f in feeds]
        return Timed(batches * b / (time.perf_counter() - t0), out[0])

    def _torch_step(self, x: np.ndarray, y: np.ndarray) -> list[torch.Tensor]:
        loss = nn.functional.cross_entropy(self.module(torch.from_numpy(x)), torch.from_numpy(y), reduction="sum")
        return torch.autograd.grad(loss, self.params)

    def run_torch_b1(self, warm: bool = False) -> Timed:
        x, y = self.net.data.arrays[self.net.input_name], self.net.data.labels
        clock = _Clock()
        for i in range(2 if warm else min(self.n, TORCH_B1_MAX)):
            grads = self._torch_step(x[i : i + 1], y[i : i + 1])
            _ = [float(torch.sum(g * g)) for g in grads]  # per-sample squared norms, as the engines give
            clock.tick()
        return Timed(clock.rate())

    def run_torch_batched(self, warm: bool = False) -> Timed:
        batches = 1 if warm else max(1, math.ceil(self.n / TORCH_BATCH))
        feeds = [self._feed(i * TORCH_BATCH, TORCH_BATCH) for i in range(batches)]
        t0 = time.perf_counter()
        for f in feeds:
            self._torch_step(f[self.net.input_name], f["labels"])
        return Timed(batches * TORCH_BATCH / (time.perf_counter() - t0))

    def variants(self) -> dict[str, Callable[[], Timed]]:
        v: dict[str, Callable[[], Timed]] = {
            "onnx": lambda: self.run_engine("onnx"),
            "ort-training": lambda: self.run_engine("ort-training"),
        }
        for b in ONNX_BATCHES:
            v[f"onnx batched {b}"] = lambda b=b: self.run_batched(b)
        v["torch b1"] = self.run_torch_b1
        v[f"torch batched {TORCH_BATCH}"] = self.run_torch_batched
        return v


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def checks(bench: Bench, results: dict[str, list[Timed]]) -> list[str]:
    """The engines' per-sample traces against each other; batched norms against the loop's weight traces."""
    onnx_t, ort_t = results["onnx"][0].extra, results["ort-training"][0].extra
    assert isinstance(onnx_t, engine.FisherTraces) and isinstance(ort_t, engine.FisherTraces)
    lines = [
        f"onnx vs ort-training per-sample traces ({ort_t.samples} samples x {len(ort_t.tensors)} tensors): "
        f"max rel. diff {_max_rel(onnx_t.per_sample, ort_t.per_sample):.1e}"
    ]
    col = {t.name: j for j, t in enumerate(ort_t.tensors)}
    for b in ONNX_BATCHES:
        out = results[f"onnx batched {b}"][0].extra
        k = min(b, ort_t.samples)
        batched = np.stack([np.asarray(o, np.float64)[:k] for o in out], axis=1)  # type: ignore[union-attr]
        loop = ort_t.per_sample[:k, [col[w] for w in bench.weights]]
        lines.append(
            f"onnx batched {b} vs ort-training loop, {len(bench.weights)} weights x {k} samples: "
            f"max rel. diff {_max_rel(batched, loop):.1e}"
        )
    return lines


# --------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {len(os.sched_getaffinity(0))} usable cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nets", default="resnet18,bert,cnn")
    parser.add_argument("--samples", default="", help="per-network N, e.g. resnet18=24,bert=16,cnn=512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bert-layers", type=int, default=BERT_LAYERS, help="encoder layers (BERT-base: 12)")
    args = parser.parse_args()
    samples = dict(DEFAULT_SAMPLES)
    for item in filter(None, args.samples.split(",")):
        key, value = item.split("=")
        samples[key] = int(value)
    torch.set_num_threads(THREADS)
    print(f"# fitonnx engines vs PyTorch, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    print(
        f"Python {platform.python_version()}, fitonnx {fitonnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"onnx {onnx.__version__}, torch {torch.__version__}, numpy {np.__version__}; {THREADS} threads everywhere"
    )
    tables: list[str] = []
    for name in args.nets.split(","):
        n = samples[name]
        t0 = time.perf_counter()
        net = build_net(name, n, args.seed, args.bert_layers)
        print(f"[{name}: network built and exported in {time.perf_counter() - t0:.1f} s]", flush=True)
        bench = Bench(net, n)
        print(
            f"\n## {net.label}: N = {n}; torch vs onnxruntime logits max |diff| {net.logit_diff:.1e}; "
            f"{len(bench.weights)} weights, {len(bench.session.tensors) - len(bench.weights)} activation taps; "
            f"set-up {time.perf_counter() - t0:.1f} s (open_model {bench.open_s:.1f} s, gradient build "
            f"onnx {bench.build_s['onnx']:.1f} s, ort-training {bench.build_s['ort-training']:.1f} s, "
            f"batched norms {bench.batched_build_s:.1f} s)"
        )
        variants = bench.variants()
        order = list(variants)
        results: dict[str, list[Timed]] = {k: [] for k in order}
        for r in range(args.rounds):
            for k in order if r % 2 == 0 else order[::-1]:
                results[k].append(variants[k]())
            line = ", ".join(f"{k} {results[k][-1].rate:.1f}" for k in order)
            print(f"  round {r + 1}: {line} (load average {os.getloadavg()[0]:.2f})", flush=True)
        for line in checks(bench, results):
            print("  check: " + line)
        tables.append(table(net, n, results))
        del bench, net
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; median of {args.rounds} interleaved rounds\n")
    print("\n".join(tables))


def table(net: Net, n: int, results: dict[str, list[Timed]]) -> str:
    med = {k: statistics.median(t.rate for t in v) for k, v in results.items()}
    ref = med["ort-training"]
    rows = [f"**{net.label}** (N = {n})\n", "| variant | samples/s (median) | per round | vs ort-training |"]
    rows.append("| --- | ---: | --- | ---: |")
    for k, v in results.items():
        rounds = ", ".join(f"{t.rate:.1f}" for t in v)
        rows.append(f"| {k} | {med[k]:.1f} | {rounds} | {med[k] / ref:.2f}x |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
