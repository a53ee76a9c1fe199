"""Time of ``score`` with per-format statistics against today's per-tensor score, one interleaved run.

Two networks with random weights, random inputs and random labels (so the empirical Fisher):

- ``resnet18``: ResNet-18 at 224x224 (``resnet18.py``, BatchNorm folded);
- ``bert``: a BERT-sized encoder at sequence 128 (``bert_encoder.py``: BERT-base's layer and
  vocabulary, ``--bert-layers`` layers).

Variants, each ``api.score`` on one already open session (loading and preparing are the same for
all and left out): ``per-tensor`` (no formats: today's score), ``int/ch`` (per-channel int4/int8
weights: one per-channel Fisher statistic per weight), ``int/block`` (per-block weights along the
reduction axis: int4/b32 on ResNet-18, where it applies to every Conv but the first, uint4/b32 and
uint4/b128 on the encoder), ``fp8`` (fp8e4m3 weights and activations: the weights' expected and
measured noise from their summed g², each activation's binade noise per sample after a max|a|
calibration pass), and ``all`` (every one of them). ``per-tensor b1`` is today's score at
``--batch-size 1``: format statistics need each sample's own gradient, so they run one sample per
run, while today's score batches the samples where the model allows it (ResNet-18's batch axis is
symbolic; the encoder's is fixed at 1, so both run one sample per run there). Each time includes what score does for formats: planning the statistics (the
weights' noise and errors in numpy), the larger gradient graph and its session, the calibration
pass and the report. Rounds are interleaved (order reversed every other round); the table gives
medians and each median's ratio to ``per-tensor``. The per-tensor traces of every variant are
checked equal (the extra statistics must not change them). Besides wall time the table gives the
process's CPU time (every onnxruntime thread included): on a machine shared with other jobs it is
the steadier measure of the work added.

    python bench/bench_formats.py [--nets resnet18,bert] [--samples resnet18=16,bert=16] [--rounds 3]
        [--variants fp8]  # a subset of the variants (per-tensor is always timed)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
from bert_encoder import SEQ, VOCAB, write_bert  # beside this script, which Python puts on sys.path
from resnet18 import write_resnet18

import fitonnx
from fitonnx import api
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset

OUT = Path(__file__).resolve().parent / "out"
BATCH_1 = {"per-tensor b1"}  # today's score with --batch-size 1, as format statistics run (one sample per run)
VARIANTS: dict[str, dict[str, tuple[str, ...]]] = {
    "resnet18": {
        "per-tensor": (),
        "per-tensor b1": (),
        "int/ch": ("int4/ch", "int8/ch"),
        "int/block": ("int4/b32",),
        "fp8": ("fp8e4m3",),
        "all": ("int4/ch", "int8/ch", "int4/b32", "fp8e4m3"),
    },
    "bert": {
        "per-tensor": (),
        "per-tensor b1": (),
        "int/ch": ("int4/ch", "int8/ch"),
        "int/block": ("uint4/b32", "uint4/b128"),
        "fp8": ("fp8e4m3",),
        "all": ("int4/ch", "int8/ch", "uint4/b32", "uint4/b128", "fp8e4m3"),
    },
}


def _data(net: str, n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    if net == "resnet18":
        return Dataset(
            {"input": rng.standard_normal((n, 1, 3, 224, 224)).astype(np.float32)}, rng.integers(0, 1000, (n, 1))
        )
    return Dataset({"input_ids": rng.integers(0, VOCAB, (n, 1, SEQ))}, rng.integers(0, 2, (n, 1)))


def _path(net: str, layers: int) -> Path:
    if net == "resnet18":
        path = OUT / "resnet18.onnx"
        return path if path.exists() else write_resnet18(path)
    path = OUT / f"bert_L{layers}.onnx"
    return path if path.exists() else write_bert(path, layers)


Times = dict[str, list[tuple[float, float]]]  # per variant: (wall s, CPU s) per round


def run_net(net: str, n: int, rounds: int, layers: int, only: set[str] | None = None) -> tuple[Times, list[str]]:
    """(wall, CPU) seconds per variant (``only`` those, per-tensor always) and round, and the checks' lines."""
    print(f"[{net}] opening the model", flush=True)
    s = api.open_model(_path(net, layers), _data(net, n, 0))
    opts = {b: FisherOptions(max_samples=n, batch_size=b) for b in (None, 1)}
    variants = {k: v for k, v in VARIANTS[net].items() if only is None or k in only or k == "per-tensor"}
    times: Times = {v: [] for v in variants}
    traces: dict[str, np.ndarray] = {}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            report = api.score(s, options=opts[1 if name in BATCH_1 else None], formats=variants[name])
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
            traces[name] = np.array([t.ef_trace for t in sorted(report.tensors, key=lambda t: t.name)])
            wall, cpu = times[name][-1]
            print(f"[{net}] round {r + 1} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    base = traces["per-tensor"]
    checks = [
        f"{net}: per-tensor traces of '{v}' vs 'per-tensor': max rel diff {np.max(np.abs(t - base) / np.abs(base)):.1e}"
        for v, t in traces.items()
        if v != "per-tensor"
    ]
    return times, checks


def table(net: str, n: int, times: Times) -> str:
    base = [statistics.median(t[k] for t in times["per-tensor"]) for k in (0, 1)]
    lines = [
        f"{net}, {n} samples: medians over {len(times['per-tensor'])} rounds (ratio to per-tensor)",
        f"  {'variant':<14} {'wall s':>7} {'ratio':>6} {'CPU s':>7} {'ratio':>6}   formats",
    ]
    for name, ts in times.items():
        wall, cpu = (statistics.median(t[k] for t in ts) for k in (0, 1))
        formats = ", ".join(VARIANTS[net][name]) or "-"
        lines.append(f"  {name:<14} {wall:7.2f} {wall / base[0]:5.2f}x {cpu:7.2f} {cpu / base[1]:5.2f}x   {formats}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="resnet18,bert")
    parser.add_argument("--samples", default="resnet18=16,bert=16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bert-layers", type=int, default=4)
    parser.add_argument("--variants", default="", help="comma-separated variants to time (default: all)")
    args = parser.parse_args()
    samples = dict(item.split("=") for item in args.samples.split(","))
    warnings.simplefilter("ignore")
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, fitonnx {fitonnx.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, Python {platform.python_version()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}"
    )
    out, checks = [], []
    for net in args.nets.split(","):
        times, lines = run_net(
            net,
            int(samples[net]),
            args.rounds,
            args.bert_layers,
            set(args.variants.split(",")) if args.variants else None,
        )
        out.append(table(net, int(samples[net]), times))
        checks += lines
    print("\n".join(out + checks))


if __name__ == "__main__":
    main()
