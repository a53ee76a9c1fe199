"""Speed-up of ``--workers 2`` against one process, set-up included, on ResNet-18 and the bundled CNN.

Both models in one run, interleaved over rounds (the machine is shared: ratios are taken within a
round, and the load average is printed with every timing). Each timing is a fresh
``python -m fitonnx -q score MODEL --data calib.npz --json r.json`` process, so everything a user
waits for is in it (interpreter start, imports, load, prepare, gradient build, the loop, the report):

- ``1 process``: as above (onnxruntime's default threads: every core);
- ``2 workers``: with ``--workers 2``: the driver prepares and builds as before, two workers forked
  from the fork server (started at the beginning, its imports overlapping the driver's set-up) each
  receive the serialized gradient model, open one session (one thread each) and score their shards.

The two reports' traces and standard errors are checked equal (rtol 1e-6). For the estimate of N machines
(BENCHMARKS.md), the parts are also measured on their own: the driver's set-up (open_model +
gradient_model), the per-sample cost of the loop at 1 thread and at the default threads, and a
worker's set-up (spawn, import, session: a 2-worker run over 2 samples, less one sample's cost).

    python bench/bench_workers.py [--resnet-samples 24] [--cnn-samples 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "mnist_cnn.onnx"
TWO = Workers(processes=2)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def end_to_end(model: Path, npz: Path, workers: Workers, samples: int | None = None) -> tuple[float, np.ndarray]:
    """Wall time of a fresh ``fitonnx score`` process (set-up included); its traces and their SEs."""
    out = npz.with_name(f"report{workers.processes}.json")
    argv = [sys.executable, "-m", "fitonnx", "-q", "score", str(model), "--data", str(npz), "--json", str(out)]
    argv += [] if samples is None else ["--max-samples", str(samples)]
    argv += ["--fisher", "empirical", "--workers", str(workers.processes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seconds, _ = timed(lambda: subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL))
    tensors = json.loads(out.read_text())["tensors"]
    return seconds, np.array([[t["ef_trace"], t["ef_trace_se"]] for t in sorted(tensors, key=lambda t: t["name"])])


def _options(workers: Workers) -> FisherOptions:
    return FisherOptions(fisher="empirical", workers=workers)


def parts(model: Path, data: fitonnx.Dataset, npz: Path) -> dict[str, float]:
    """Driver set-up, per-sample cost (1 thread, default threads), a worker's set-up: cold (a fresh
    ``score --workers 2`` on 2 samples less a fresh single-process one) and warm (a second pool in a
    driver whose fork server runs: what validate's later stages and a standing Ray cluster see)."""
    setup_s, (s, gm) = timed(lambda: _session_and_model(model, data))
    n = data.num_samples
    out = {"driver_setup_s": setup_s}
    for threads in (1, 0):
        loop_s, _ = timed(lambda t=threads: engine.run(gm, s.data, s.specs, engine.RunOptions(threads=t)))
        out[f"per_sample_s_threads{threads}"] = loop_s / n
    two = engine.RunOptions(max_samples=2)
    for kind in ("first", "warm"):  # the first pool of this process starts the fork server
        pool_s, _ = timed(lambda: parallel.run(gm, s.data, s.specs, two, TWO))
        out[f"worker_setup_{kind}_s"] = max(pool_s - out["per_sample_s_threads1"], 0.0)
    cold_two, _ = end_to_end(model, npz, TWO, samples=2)
    cold_one, _ = end_to_end(model, npz, Workers(), samples=2)
    out["worker_setup_cold_s"] = cold_two - cold_one + out["per_sample_s_threads0"] - out["per_sample_s_threads1"]
    out["gradient_model_mb"] = len(gm.model_bytes) / 1e6
    return out


def _session_and_model(model: Path, data: fitonnx.Dataset):
    s = api.open_model(model, data)
    return s, api.gradient_model(s, _options(Workers()))[0]


def bench(name: str, model: Path, data: fitonnx.Dataset, rounds: int, tmp: Path) -> None:
    print(f"\n## {name}: {data.num_samples} samples, empirical Fisher")
    npz = tmp / f"{model.stem}.calib.npz"
    np.savez(npz, **data.arrays, labels=data.labels)
    ratios, ones, twos = [], [], []
    for r in range(rounds):
        order = [Workers(), TWO] if r % 2 == 0 else [TWO, Workers()]
        got = {}
        for workers in order:
            before = load()
            got[workers.processes] = end_to_end(model, npz, workers)
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
        "traces and SEs equal"
    )
    p = parts(model, data, npz)
    print(
        f"  parts (load {load()}): driver set-up {p['driver_setup_s']:.2f} s; per sample "
        f"{p['per_sample_s_threads1'] * 1e3:.1f} ms at 1 thread, {p['per_sample_s_threads0'] * 1e3:.1f} ms at the "
        f"default threads; workers' set-up {p['worker_setup_cold_s']:.2f} s cold (fresh CLI), "
        f"{p['worker_setup_first_s']:.2f} s for a driver's first pool, {p['worker_setup_warm_s']:.2f} s warm; "
        f"gradient model {p['gradient_model_mb']:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet-samples", type=int, default=64)
    parser.add_argument("--cnn-samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"# --workers 2 against 1 process, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}; load average (1, 5, 15 min) at start {os.getloadavg()}")
    cnn_data = load_npz(CNN.with_name("mnist_cnn.calib.npz")).head(args.cnn_samples)
    with tempfile.TemporaryDirectory(prefix="fitonnx-bench-") as folder:
        tmp = Path(folder)
        bench("bundled CNN (mnist_cnn.onnx)", CNN, cnn_data, args.rounds, tmp)
        resnet = write_resnet18(tmp / "resnet18.onnx")
        bench("ResNet-18 (224x224, random weights)", resnet, make_dataset(args.resnet_samples, 0), args.rounds, tmp)
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
