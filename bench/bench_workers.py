"""Speed-up of ``--workers 2`` against one process, set-up included, on ResNet-18 and the bundled CNN.

Both models in one run, interleaved over rounds (the machine is shared: ratios are taken within a
round, and the load average is printed with every timing):

- ``1 process``: ``fitonnx.score(model, data)`` end to end (load, prepare, gradient build, the
  per-sample loop with onnxruntime's default threads, the report);
- ``2 workers``: the same call with ``FisherOptions(workers=Workers(processes=2))``: the driver
  prepares and builds as before, two spawned processes each receive the serialized gradient model,
  open one session (one thread each: the cores shared out) and score their shards.

The per-sample matrices of the two are checked equal (rtol 1e-6). For the estimate of N machines
(BENCHMARKS.md), the parts are also measured on their own: the driver's set-up (open_model +
gradient_model), the per-sample cost of the loop at 1 thread and at the default threads, and a
worker's set-up (spawn, import, session: a 2-worker run over 2 samples, less one sample's cost).

    python bench/bench_workers.py [--resnet-samples 24] [--cnn-samples 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_score import machine, make_dataset  # beside this script, which Python puts on sys.path
from resnet18 import write_resnet18

import fitonnx
from fitonnx import api
from fitonnx.fisher import engine, parallel
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import load_npz
from fitonnx.scale import Workers

CNN = Path(__file__).resolve().parent.parent / "models" / "mnist_cnn.onnx"
TWO = Workers(processes=2)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def end_to_end(model: Path, data: fitonnx.Dataset, workers: Workers) -> tuple[float, np.ndarray]:
    """Wall time of score (set-up included) and its per-sample matrix."""
    seconds, (traces, _, _) = timed(lambda: api.fisher_traces(api.open_model(model, data), _options(workers)))
    return seconds, traces.per_sample


def _options(workers: Workers) -> FisherOptions:
    return FisherOptions(fisher="empirical", workers=workers)


def parts(model: Path, data: fitonnx.Dataset) -> dict[str, float]:
    """Driver set-up, per-sample cost (1 thread, default threads), a worker's set-up."""
    setup_s, (s, gm) = timed(lambda: _session_and_model(model, data))
    n = data.num_samples
    out = {"driver_setup_s": setup_s}
    for threads in (1, 0):
        loop_s, _ = timed(lambda t=threads: engine.run(gm, s.data, s.specs, engine.RunOptions(threads=t)))
        out[f"per_sample_s_threads{threads}"] = loop_s / n
    two = engine.RunOptions(max_samples=2)
    pool_s, _ = timed(lambda: parallel.run(gm, s.data, s.specs, two, TWO))
    out["worker_setup_s"] = max(pool_s - out["per_sample_s_threads1"], 0.0)
    out["gradient_model_mb"] = len(gm.model_bytes) / 1e6
    return out


def _session_and_model(model: Path, data: fitonnx.Dataset):
    s = api.open_model(model, data)
    return s, api.gradient_model(s, _options(Workers()))[0]


def bench(name: str, model: Path, data: fitonnx.Dataset, rounds: int) -> None:
    print(f"\n## {name}: {data.num_samples} samples, empirical Fisher")
    ratios, ones, twos = [], [], []
    for r in range(rounds):
        order = [Workers(), TWO] if r % 2 == 0 else [TWO, Workers()]
        got = {}
        for workers in order:
            before = load()
            got[workers.processes] = end_to_end(model, data, workers)
            print(
                f"  round {r + 1} {workers.describe():20s}: {got[workers.processes][0]:7.2f} s (load {before} -> {load()})"
            )
        np.testing.assert_allclose(got[2][1], got[1][1], rtol=1e-6, atol=0)
        ones.append(got[1][0])
        twos.append(got[2][0])
        ratios.append(got[1][0] / got[2][0])
    print(
        f"  median: 1 process {statistics.median(ones):.2f} s, 2 workers {statistics.median(twos):.2f} s; "
        f"speed-up per round {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}); "
        "per-sample matrices equal"
    )
    p = parts(model, data)
    print(
        f"  parts (load {load()}): driver set-up {p['driver_setup_s']:.2f} s; per sample "
        f"{p['per_sample_s_threads1'] * 1e3:.1f} ms at 1 thread, {p['per_sample_s_threads0'] * 1e3:.1f} ms at the "
        f"default threads; a worker's set-up {p['worker_setup_s']:.2f} s; gradient model {p['gradient_model_mb']:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet-samples", type=int, default=24)
    parser.add_argument("--cnn-samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"# --workers 2 against 1 process, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}; load average (1, 5, 15 min) at start {os.getloadavg()}")
    cnn_data = load_npz(CNN.with_name("mnist_cnn.calib.npz")).head(args.cnn_samples)
    bench("bundled CNN (mnist_cnn.onnx)", CNN, cnn_data, args.rounds)
    with tempfile.TemporaryDirectory(prefix="fitonnx-bench-") as tmp:
        resnet = write_resnet18(Path(tmp) / "resnet18.onnx")
        bench("ResNet-18 (224x224, random weights)", resnet, make_dataset(args.resnet_samples, 0), args.rounds)
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
