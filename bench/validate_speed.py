"""validate's simulation speed against plain inference of the same work (issue 17).

For each model, N configurations drawn as validate's random sampler draws them are measured the way
validate measures them (``harness.measure_all``: the simulator's run over every held-out sample, then
the damage against the float reference), and, interleaved in the same process, the float model is run
over the same held-out samples in the same batches once per configuration: a plain onnxruntime session
of the model file at onnxruntime's default settings, as a user would run it. The ratio of the two sums
is validate's cost in plain inference runs; wall and CPU (process) time are both reported, with the
load average, since the machine is shared. ``--plain-every K`` runs the plain pass after every K-th
configuration only and scales its sum to N (for long runs on a loaded machine).

Families: ``weights`` (weights only, 3-8 bits per tensor: no activation quantizer), ``acts`` (weights
and activations 3-8 bits: validate's default), ``fp8`` (fp8e4m3 weights and activations: the floating
quantizer on every activation).

    python bench/validate_speed.py [--data DIR] [--models mnist_cnn ppocr_cls_mbv3] [--configs 20 100]
        [--families weights acts] [--plain-every K] [--json out.json]

``--data DIR``: ``scripts/data/build_data.py --scale 25 --out DIR ppocr_cls_mbv3`` (1000 held-out text
lines, 400 calibration lines); without it the zoo's 40 shipped held-out lines are tiled to 1000 samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fitonnx.analysis.harness import Harness, SimulationOptions, harness, measure_all
from fitonnx.analysis.validate import sample_configs
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset, load_npz
from fitonnx.model.runtime import make_session

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "mnist_cnn": (ROOT / "models" / "mnist_cnn.onnx", ROOT / "models" / "mnist_cnn"),
    "ppocr_cls_mbv3": (
        ROOT / "models" / "zoo" / "ppocr_cls_mbv3.onnx",
        ROOT / "models" / "zoo" / "data" / "ppocr_cls_mbv3",
    ),
}
SAMPLES = 1000
FAMILIES = {
    "weights": SimulationOptions(weights_only=True),
    "acts": SimulationOptions(),
    "fp8": SimulationOptions(formats=("fp8e4m3",)),
}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def data_paths(name: str, data: Path | None) -> tuple[Path, Path, str]:
    """Calibration and held-out files of ``name`` and how the held-out set was made."""
    stem = MODELS[name][1]
    if data is not None and (data / f"{name}.heldout.npz").is_file():
        return data / f"{name}.calib.npz", data / f"{name}.heldout.npz", f"{data}/{name}.heldout.npz"
    return Path(f"{stem}.calib.npz"), Path(f"{stem}.heldout.npz"), f"{stem.name}.heldout.npz"


def held_out(path: Path) -> tuple[Dataset, str]:
    """``SAMPLES`` held-out samples: the file's first ones, or the file tiled when it holds fewer."""
    d = load_npz(path)
    n = d.num_samples
    reps = -(-SAMPLES // n)
    arrays = {k: np.concatenate([v] * reps)[:SAMPLES] for k, v in d.arrays.items()}
    labels = None if d.labels is None else np.concatenate([d.labels] * reps)[:SAMPLES]
    how = f"{n} samples" + ("" if reps == 1 else f" tiled {reps}x")
    return Dataset(arrays, labels, source=str(path)), how


def plain_runner(model: Path, h: Harness, batch: int) -> tuple[ort.InferenceSession, list[dict[str, np.ndarray]]]:
    """The float model's own session and the held-out samples in validate's batches."""
    names = list(h.session.specs)
    arrays = h.held_out.arrays
    n = h.held_out.num_samples
    feeds = [{k: arrays[k][i : i + batch] for k in names} for i in range(0, n, batch)]
    return make_session(model.read_bytes()), feeds


def time_family(
    name: str, fam: str, configs: Sequence[int], data: Path | None, seed: int, every: int = 1
) -> list[dict]:
    model, _ = MODELS[name]
    calib, held_path, label = data_paths(name, data)
    held, how = held_out(held_path)
    t0 = time.perf_counter()
    sim_opts = FAMILIES[fam]
    h = harness(model, calib, held, simulation=sim_opts, options=FisherOptions(max_samples=8))
    t_harness = time.perf_counter() - t0
    family = h.families[0]
    session, feeds = plain_runner(model, h, sim_opts.batch_size)
    rows = []
    for n in configs:
        drawn = [
            c for c, _ in sample_configs(h.weights, h.activations, family.weights, family.activations, n, seed, False)
        ]
        start_load = load()
        sim_wall = sim_cpu = plain_wall = plain_cpu = 0.0
        for k, config in enumerate(drawn):  # interleaved: a configuration, then a plain pass over the same samples
            w, c = time.perf_counter(), time.process_time()
            measure_all(h, [config])
            sim_wall, sim_cpu = sim_wall + time.perf_counter() - w, sim_cpu + time.process_time() - c
            if k % every:
                continue
            w, c = time.perf_counter(), time.process_time()
            for feed in feeds:
                session.run(None, feed)
            plain_wall, plain_cpu = plain_wall + time.perf_counter() - w, plain_cpu + time.process_time() - c
        plain_runs = len(range(0, n, every))
        plain_wall, plain_cpu = plain_wall * n / plain_runs, plain_cpu * n / plain_runs
        row = {
            "model": name, "family": fam, "configs": n, "samples": h.held_out.num_samples, "held_out": f"{label} ({how})",
            "batches": len(h.simulator.data.feeds), "tensors": f"{len(h.weights)} weights, {len(h.activations)} activations",
            "sim_wall": sim_wall, "plain_wall": plain_wall, "sim_cpu": sim_cpu, "plain_cpu": plain_cpu,
            "ratio_wall": sim_wall / plain_wall, "ratio_cpu": sim_cpu / plain_cpu,
            "plain_runs": plain_runs, "load_start": start_load, "load_end": load(), "harness_s": t_harness,
        }  # fmt: skip
        rows.append(row)
        print(
            f"{name:15s} {fam:8s} N={n:4d} x {row['samples']} samples ({row['batches']} batches): "
            f"validate {sim_wall:7.1f} s wall / {sim_cpu:7.1f} s CPU, plain {plain_wall:7.1f} / {plain_cpu:7.1f}, "
            f"ratio {row['ratio_wall']:.2f} wall / {row['ratio_cpu']:.2f} CPU; load {start_load} -> {row['load_end']}"
            + ("" if every == 1 else f" (plain: {plain_runs} passes, scaled to {n})"),
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--families", nargs="+", default=["weights", "acts"], choices=list(FAMILIES))
    parser.add_argument("--configs", nargs="+", type=int, default=[20, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-every", type=int, default=1, help="a plain pass after every k-th configuration only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}")
    print(f"load average (1/5/15 min) at start {load()}")
    rows = [
        row
        for name in args.models
        for fam in args.families
        for row in time_family(name, fam, args.configs, args.data, args.seed, args.plain_every)
    ]
    print(f"load average at end {load()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
