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

- ``onnx b1`` / ``ort-training``: the fitonnx per-sample scoring loop at batch 1 with that engine.
  The gradient model is built once per engine with ``api.gradient_model`` (``fisher_traces`` is
  ``gradient_model`` then the loop); each round times ``engine.run`` (it creates its session) and
  counts samples 2..N as in ``bench_score.py``. Per sample: the gradient of every quantizable
  weight *and* of every tapped activation, reduced to squared norms in the graph.
- ``onnx batched B``: the same loop in batches (``fisher.batched``, what ``fitonnx score`` runs with
  ``--batch-size B``; B = 8 is the default): per-sample activation-gradient norms from one batched
  backward pass and per-sample weight-gradient norms from each layer's input and output gradient.
  The batched model is built once; each round times ``batched.run`` (its session included) over the
  N samples, counting samples after the first batch.
- ``torch b1`` (only when torch is installed): PyTorch per sample, batch 1: forward, summed
  cross-entropy, ``autograd.grad`` of every parameter, squared norms; samples 2..min(N, 64).
- ``torch batched 32`` (only with torch): PyTorch forward+backward of batch 32 (one gradient of the
  summed loss, NOT per-sample): a speed reference only.

Without torch the BERT-sized encoder is ``bench/encoder.py``'s (onnx.helper, the same shapes) and
the torch rows are left out; with torch it is exported from torch as before.

Variants are interleaved in rounds (order reversed every other round); the table gives medians and
each median's ratio to ``ort-training``. Once per network the script checks the per-sample traces of
every variant against ``ort-training``'s (every sample, every tensor).

    python bench/engines.py [--rounds 3] [--nets resnet18,bert,cnn] [--samples resnet18=12,bert=8,cnn=512] [--bert-layers 4]

Needs onnxruntime-training for ``ort-training`` (run it in the reference venv); torch is optional.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper
from resnet18 import build_resnet18  # beside this script, which Python puts on sys.path

try:
    import torch
    import torch_nets  # beside this script
except ImportError:  # torch is optional: the torch rows are then left out
    torch = None
    torch_nets = None

from encoder import build_encoder  # beside this script

import fitonnx
from fitonnx import api
from fitonnx.fisher import batched, engine
from fitonnx.fisher.options import FisherOptions
from fitonnx.model import graph
from fitonnx.model.runtime import make_session
from fitonnx.progress import Ticks

THREADS = 2
ROOT = Path(__file__).resolve().parent.parent
TORCH_BATCH = 32
ONNX_BATCHES = (batched.DEFAULT_BATCH_SIZE,)  # --batches to add others
DEFAULT_SAMPLES = {"resnet18": 12, "bert": 8, "cnn": 512}
TORCH_B1_MAX = 64  # torch per-sample samples per round (at 2 threads on a busy machine it is slow on small nets)
BERT_LAYERS = 4


@dataclass
class Net:
    name: str
    label: str
    module: object  # the torch twin (torch.nn.Module), None without torch
    onnx_model: onnx.ModelProto  # batch axis symbolic, output ``logits``
    input_name: str
    data: fitonnx.Dataset
    logit_diff: float = math.nan


def build_net(name: str, n: int, seed: int, bert_layers: int = BERT_LAYERS) -> Net:
    rng = np.random.default_rng(seed)
    tn = torch_nets
    if torch is not None:
        torch.manual_seed(seed)
    if name == "resnet18":
        model = build_resnet18(seed)
        module = tn.ResNet18() if tn else None
        x = rng.standard_normal((n, 3, 224, 224)).astype(np.float32)
        labels = rng.integers(0, 1000, n)
        net = Net(name, "ResNet-18 224x224", module, model, "input", fitonnx.Dataset({"input": x}, labels, "random"))
    elif name == "cnn":
        model = onnx.load(str(ROOT / "models" / "mnist_cnn.onnx"))
        module = tn.MnistCnn() if tn else None
        calib = np.load(ROOT / "models" / "mnist_cnn.calib.npz", allow_pickle=False)
        x = np.resize(calib["input"], (n, *calib["input"].shape[1:])).astype(np.float32)
        labels = rng.integers(0, 10, n)
        net = Net(name, "bundled CNN (mnist_cnn.onnx)", module, model, "input", fitonnx.Dataset({"input": x}, labels))
    elif name == "bert":
        ids = rng.integers(0, 30522, (n, 128))
        module = tn.Bert(layers=bert_layers).eval() if tn else None
        model = tn._export(module, torch.from_numpy(ids[:2]), "input_ids") if tn else build_encoder(bert_layers)
        labels = rng.integers(0, 2, n)
        data = fitonnx.Dataset({"input_ids": ids}, labels, "random")
        net = Net(name, f"BERT-sized encoder ({bert_layers} x 768), seq 128", module, model, "input_ids", data)
    else:
        raise SystemExit(f"unknown network {name!r}; expected resnet18, bert or cnn")
    if module is None:
        return net
    if name != "bert":
        tn._load_initializers(module, model)
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

    def __init__(self, net: Net, n: int, batches: tuple[int, ...]) -> None:
        self.net, self.n, self.batches = net, n, batches
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
        self.batched: dict[int, batched.BatchedModel] = {}
        s = self.session
        for b in batches:
            t0 = time.perf_counter()
            request = batched.BatchRequest(
                s.loaded.proto, s.prepared.model, self.gms["onnx"], s.data, s.specs, b, s.data.labels.dtype, THREADS
            )
            built = batched.build(request)
            if isinstance(built, str):
                raise SystemExit(f"{net.name}: {built}")
            self.batched[b] = built
            self.build_s[f"batched {b}"] = time.perf_counter() - t0
            _log(f"batched model, batch {b}: {self.build_s[f'batched {b}']:.1f} s")
        self.module = net.module
        if self.module is not None:
            self.params = list(self.module.parameters())
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
        """The batched loop; samples after the first batch counted (its session's first run is slow)."""
        stamps: list[float] = []

        def tick(_n: int = 1) -> None:
            stamps.append(time.perf_counter())

        options = FisherOptions(max_samples=self.n, engine="onnx").run_options(THREADS)
        s = self.session
        traces = batched.run(self.batched[b], self.gms["onnx"], s.data, s.specs, options, progress=Ticks(tick))
        first = min(b, len(stamps)) - 1
        return Timed((len(stamps) - 1 - first) / (stamps[-1] - stamps[first]), traces)

    def _torch_step(self, x: np.ndarray, y: np.ndarray) -> list:
        loss = torch.nn.functional.cross_entropy(self.module(torch.from_numpy(x)), torch.from_numpy(y), reduction="sum")
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
        count = 1 if warm else max(1, math.ceil(self.n / TORCH_BATCH))
        feeds = [self._feed(i * TORCH_BATCH, TORCH_BATCH) for i in range(count)]
        t0 = time.perf_counter()
        for f in feeds:
            self._torch_step(f[self.net.input_name], f["labels"])
        return Timed(count * TORCH_BATCH / (time.perf_counter() - t0))

    def variants(self) -> dict[str, Callable[[], Timed]]:
        v: dict[str, Callable[[], Timed]] = {
            "onnx b1": lambda: self.run_engine("onnx"),
            "ort-training": lambda: self.run_engine("ort-training"),
        }
        for b in self.batches:
            v[f"onnx batched {b}"] = lambda b=b: self.run_batched(b)
        if self.module is not None:
            v["torch b1"] = self.run_torch_b1
            v[f"torch batched {TORCH_BATCH}"] = self.run_torch_batched
        return v


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def checks(bench: Bench, results: dict[str, list[Timed]]) -> list[str]:
    """Every onnx variant's per-sample traces (every sample x every tensor) against ort-training's."""
    ref = results["ort-training"][0].extra
    assert isinstance(ref, engine.FisherTraces)
    lines = []
    for k, timed in results.items():
        other = timed[0].extra
        if k == "ort-training" or not isinstance(other, engine.FisherTraces):
            continue
        lines.append(
            f"{k} vs ort-training per-sample traces ({ref.samples} samples x {len(ref.tensors)} tensors): "
            f"max rel. diff {_max_rel(other.per_sample, ref.per_sample):.1e}"
        )
    b1 = results["onnx b1"][0].extra
    for b in bench.batches:
        other = results[f"onnx batched {b}"][0].extra
        lines.append(f"onnx batched {b} vs onnx b1: max rel. diff {_max_rel(other.per_sample, b1.per_sample):.1e}")
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
    parser.add_argument("--batches", default=",".join(map(str, ONNX_BATCHES)), help="batch sizes of the onnx loop")
    args = parser.parse_args()
    samples = dict(DEFAULT_SAMPLES)
    for item in filter(None, args.samples.split(",")):
        key, value = item.split("=")
        samples[key] = int(value)
    batches = tuple(int(b) for b in args.batches.split(","))
    if torch is not None:
        torch.set_num_threads(THREADS)
    print(f"# fitonnx engines vs PyTorch, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    print(
        f"Python {platform.python_version()}, fitonnx {fitonnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"onnx {onnx.__version__}, torch {torch.__version__ if torch else 'not installed'}, numpy {np.__version__}; "
        f"{THREADS} threads everywhere"
    )
    tables: list[str] = []
    for name in args.nets.split(","):
        n = samples[name]
        t0 = time.perf_counter()
        net = build_net(name, n, args.seed, args.bert_layers)
        print(f"[{name}: network built and exported in {time.perf_counter() - t0:.1f} s]", flush=True)
        bench = Bench(net, n, batches)
        print(
            f"\n## {net.label}: N = {n}; torch vs onnxruntime logits max |diff| {net.logit_diff:.1e}; "
            f"{len(bench.weights)} weights, {len(bench.session.tensors) - len(bench.weights)} activation taps; "
            f"set-up {time.perf_counter() - t0:.1f} s (open_model {bench.open_s:.1f} s, builds: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in bench.build_s.items())
            + ")"
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
