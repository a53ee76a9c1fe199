"""Samples/s of ``fitonnx score`` against a bare forward+backward loop through the same gradient graph.

On a ResNet-18 (224x224, random weights, from ``resnet18.py``) with N random calibration samples and
random labels (so the empirical Fisher is used), in one run and interleaved over several rounds:

- ``score``: ``fitonnx.score(model_path, Dataset(...))`` end to end (load, prepare, probe, gradient
  build, sessions, the per-sample loop, the report);
- ``engine``: ``fitonnx.engine.run`` alone over the GradientModel ``fitonnx.instrument`` built (the
  session is built inside ``run``; the model is checked to be byte-identical to the one
  ``api.gradient_model`` gives ``score``); ``exact``: the same with ``exact_norms=True`` (every gradient
  cast to float64 before squaring, as fitonnx did before the blocked float32 sums);
- ``bare``: onnxruntime-training's raw gradient graph of the same augmented model (same loss, same
  weights, same activation taps, before fitonnx adds its in-graph reductions), run per sample at
  batch 1 in a session from ``fitonnx.runtime.make_session`` (the engine's), fetching every
  gradient as a numpy array and doing nothing with it.

Loop rates count samples 2..N (the first run of a session allocates its buffers); "first" is the
time from the start until the first sample is done (sessions, probe, first sample; for ``score``
also loading, preparing and building). End-to-end rates are N over the whole wall time, build
included, so set-up is amortized over N. The check at the end compares fitonnx's per-sample squared
norms with numpy float64 sums over the bare graph's gradients.

    python bench/bench_score.py [--samples 32] [--rounds 3] [--model resnet18.onnx]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from resnet18 import write_resnet18  # beside this script, which Python puts on sys.path

import fitonnx
from fitonnx import api
from fitonnx.fisher import engine, instrument, losses
from fitonnx.model import graph
from fitonnx.model.runtime import make_session

NUM_CLASSES = 1000


@dataclass(frozen=True)
class Run:
    """One timed run: build time, time to the first finished sample, loop and total wall time."""

    build_s: float  # graph building before any gradient session exists
    first_s: float  # from the start of the loop call until sample 1 is done (sessions + warm-up)
    loop_s: float  # samples 2..N
    total_s: float  # everything, build included
    samples: int

    @property
    def loop_rate(self) -> float:
        return (self.samples - 1) / self.loop_s

    @property
    def e2e_rate(self) -> float:
        return self.samples / self.total_s


@dataclass(frozen=True)
class Setup:
    """What the engine and bare runs share: the fitonnx session, the head, the shapes, the data."""

    session: api.Session
    head: losses.LossHead
    ranks: dict[str, int]
    shapes: dict[str, tuple[int, ...]]  # concrete per-sample shapes of inputs and activations
    aug: instrument.AugmentedModel  # what both gradient graphs are built from
    zeros: dict[str, np.ndarray]  # zero input per tapped activation, batch 1
    threads: int  # onnxruntime intra-op threads; 0: its default, as fitonnx uses


class _Clock:
    """Timestamps taken after each sample (the engine's progress callback, or the bare loop)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def tick(self, _n: int = 1) -> None:
        self.stamps.append(time.perf_counter())

    def run(self, build_s: float) -> Run:
        end = time.perf_counter()
        if len(self.stamps) < 2:
            raise SystemExit("expected at least 2 samples to time the loop; use --samples 2 or more")
        return Run(
            build_s=build_s,
            first_s=self.stamps[0] - self.start,
            loop_s=self.stamps[-1] - self.stamps[0],
            total_s=build_s + end - self.start,
            samples=len(self.stamps),
        )


def make_dataset(n: int, seed: int) -> fitonnx.Dataset:
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((n, 3, 224, 224)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    return fitonnx.Dataset(arrays={"input": inputs}, labels=labels, source=f"random({n}, seed={seed})")


def prepare_setup(model_path: Path, data: fitonnx.Dataset, threads: int = 0) -> Setup:
    """The steps of ``api.gradient_model`` up to the gradient build (empirical Fisher, default output)."""
    s = api.open_model(model_path, data)
    model = s.prepared.model
    target = losses.resolve_output(model, graph.output_ranks(model), None, None, data.labels, None)
    head = losses.build_head(target, losses.FisherMode.EMPIRICAL, data.labels.dtype)
    activations = [t for t in s.tensors if t.kind is graph.Kind.ACTIVATION]
    probe, names = instrument.build_probe(model, activations, None)
    feed = data.sample(0, s.specs)
    probed = engine.probe_shapes(probe, names, feed)
    ranks = {name: len(shape) for name, shape in probed.items()}
    shapes = {**probed, **{name: value.shape for name, value in feed.items() if name in s.specs}}
    aug = instrument.augment(model, s.tensors, head, data.labels.dtype, ranks, shapes)
    zeros = {zero: np.zeros(probed[act], np.float32) for act, zero in aug.perturbations}
    return Setup(session=s, head=head, ranks=ranks, shapes=shapes, aug=aug, zeros=zeros, threads=threads)


def time_score(model_path: Path, data: fitonnx.Dataset) -> Run:
    clock = _Clock()
    fitonnx.score(model_path, data, progress=clock.tick)
    # score builds inside the call: its "first" includes load, prepare, probe and gradient build.
    return clock.run(0.0)


def build_engine_model(setup: Setup, exact_norms: bool = False) -> instrument.GradientModel:
    s = setup.session
    return instrument.build_gradient_model(
        instrument.GradientRequest(
            s.prepared.model,
            s.tensors,
            setup.head,
            s.data.labels.dtype,
            setup.ranks,
            shapes=setup.shapes,
            exact_norms=exact_norms,
        )
    )


def time_engine(setup: Setup, exact_norms: bool = False) -> tuple[Run, engine.FisherTraces]:
    t0 = time.perf_counter()
    gm = build_engine_model(setup, exact_norms)
    build_s = time.perf_counter() - t0
    clock = _Clock()
    options = engine.RunOptions(threads=setup.threads)
    traces = engine.run(gm, setup.session.data, setup.session.specs, options, progress=clock.tick)
    return clock.run(build_s), traces


def bare_graph(setup: Setup) -> tuple[bytes, list[str]]:
    """The builder's gradient graph of the augmented model, and the names of all its gradients."""
    grad = instrument.gradient_graph(setup.aug, setup.session.prepared.model)
    return grad.SerializeToString(), [name + "_grad" for name in setup.aug.differentiate]


def bare_feeds(setup: Setup) -> Callable[[int], dict[str, np.ndarray]]:
    data = setup.session.data

    def feed(i: int) -> dict[str, np.ndarray]:
        return {"input": data.arrays["input"][i : i + 1], losses.LABELS: data.labels[i : i + 1], **setup.zeros}

    return feed


def time_bare(setup: Setup) -> Run:
    t0 = time.perf_counter()
    model_bytes, fetch = bare_graph(setup)
    build_s = time.perf_counter() - t0
    feed = bare_feeds(setup)
    clock = _Clock()
    session = make_session(model_bytes, setup.threads)
    for i in range(setup.session.data.num_samples):
        session.run(fetch, feed(i))
        clock.tick()
    return clock.run(build_s)


def check_same_graph(setup: Setup, traces: engine.FisherTraces, samples: int = 2) -> float:
    """Max relative difference between fitonnx's squared norms and numpy float64 ones from bare gradients."""
    model_bytes, fetch = bare_graph(setup)
    session = make_session(model_bytes, setup.threads)
    feed = bare_feeds(setup)
    by_name = dict(zip(fetch, range(len(fetch)), strict=True))
    aug_names = {t.name: t.name for t in setup.session.tensors if t.kind is graph.Kind.WEIGHT}
    aug_names |= dict(setup.aug.perturbations)
    worst = 0.0
    for i in range(min(samples, traces.samples)):
        grads = session.run(fetch, feed(i))
        for j, t in enumerate(traces.tensors):
            g = np.asarray(grads[by_name[aug_names[t.name] + "_grad"]], np.float64)
            ref = float(np.dot(g.ravel(), g.ravel()))
            worst = max(worst, abs(traces.per_sample[i, j] - ref) / max(ref, 1e-300))
    return worst


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {usable} usable cores (os.cpu_count() = {os.cpu_count()})"


def versions() -> str:
    return (
        f"Python {platform.python_version()}, fitonnx {fitonnx.__version__}, onnxruntime {onnxruntime.__version__} "
        f"(training build), onnx {onnx.__version__}, numpy {np.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="calibration samples per run (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--model", type=Path, help="an existing ResNet-18 .onnx (default: build one in a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads for engine and bare (default: its own choice, as fitonnx); "
        "fitonnx.score has no such option, so a nonzero value leaves the score row out",
    )
    args = parser.parse_args()
    if args.samples < 2 or args.rounds < 1:
        parser.error("expected --samples >= 2 and --rounds >= 1")

    print(f"# fitonnx score vs bare gradient loop, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    print(versions())
    with tempfile.TemporaryDirectory(prefix="fitonnx-bench-") as tmp:
        model_path = args.model if args.model is not None else write_resnet18(Path(tmp) / "resnet18.onnx", args.seed)
        data = make_dataset(args.samples, args.seed)
        setup = prepare_setup(model_path, data, args.threads)
        if build_engine_model(setup).model_bytes != api.gradient_model(setup.session)[0].model_bytes:
            raise SystemExit("the benchmark's gradient model differs from api.gradient_model's; update prepare_setup")
        n_w = sum(t.kind is graph.Kind.WEIGHT for t in setup.session.tensors)
        print(
            f"model: ResNet-18, 224x224, {model_path.stat().st_size / 1e6:.1f} MB; {args.samples} samples, "
            f"empirical Fisher; {n_w} weights + {len(setup.session.tensors) - n_w} activation taps differentiated; "
            f"onnxruntime intra-op threads: {args.threads or 'default'}"
        )
        order = [name for name in LABELS if name != "score" or not args.threads]
        runs: dict[str, list[Run]] = {name: [] for name in order}
        traces: dict[str, engine.FisherTraces] = {}
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                if name == "score":
                    run = time_score(model_path, data)
                elif name == "bare":
                    run = time_bare(setup)
                else:
                    run, traces[name] = time_engine(setup, exact_norms=name == "exact")
                runs[name].append(run)
                print(
                    f"  round {r + 1} {name:6s}: loop {run.loop_rate:6.2f} samples/s, total {run.total_s:6.2f} s "
                    f"(load average {os.getloadavg()[0]:.2f})"
                )
        print(f"load average at end {os.getloadavg()[0]:.2f}")
        for name in ("engine", "exact"):
            worst = check_same_graph(setup, traces[name])
            print(f"check: {name} squared norms vs numpy float64 of the bare gradients, max rel. diff {worst:.1e}")
        print_table(runs, args.samples, args.rounds)


LABELS = {
    "score": "fitonnx.score, end to end",
    "engine": "fitonnx engine.run",
    "exact": "engine.run, exact_norms=True",
    "bare": "bare gradient graph",
}


def print_table(runs: dict[str, list[Run]], n: int, rounds: int) -> None:
    """The median of each figure, then each ratio to bare: of the medians, and per round (paired runs)."""
    med = {k: {f: statistics.median(getattr(r, f) for r in v) for f in _FIELDS} for k, v in runs.items()}
    print(f"\nmedian of {rounds} interleaved rounds, N = {n}:\n")
    print("| run | build (s) | start to sample 1 (s) | loop samples/s | end-to-end samples/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in runs:
        m = med[k]
        build = "(in next)" if k == "score" else f"{m['build_s']:.2f}"
        print(f"| {LABELS[k]} | {build} | {m['first_s']:.2f} | {m['loop_rate']:.2f} | {m['e2e_rate']:.2f} |")
    print("\nratio to bare: of the medians; median of the per-round ratios [per round]")
    for k, field, what in (
        ("engine", "loop_rate", "engine loop / bare loop"),
        ("exact", "loop_rate", "exact-norms engine loop / bare loop"),
        ("score", "loop_rate", "score loop / bare loop"),
        ("score", "e2e_rate", "score end-to-end / bare end-to-end"),
    ):
        if k not in runs:
            continue
        paired = [getattr(a, field) / getattr(b, field) for a, b in zip(runs[k], runs["bare"], strict=True)]
        print(
            f"  {what + ':':38s} {med[k][field] / med['bare'][field]:.3f}; {statistics.median(paired):.3f} "
            f"[{', '.join(f'{x:.3f}' for x in paired)}]"
        )


_FIELDS = ("build_s", "first_s", "loop_rate", "e2e_rate")


if __name__ == "__main__":
    main()
