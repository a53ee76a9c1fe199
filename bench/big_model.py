"""Peak memory of scoring a large model whose weights are external data, stage by stage.

    python bench/big_model.py MODEL.onnx [--data CALIB.npz | --random N] [--engine onnx] [--samples N]

Runs ``fitonnx.score`` in its stages (``open_model``, the gradient model and the per-sample loop,
the report) and samples this process's resident set (``/proc/self/status`` VmRSS, every 20 ms)
in a thread, printing the peak of each stage and of the whole run against the model's size (its
protobuf plus its external data). Linux only; no psutil needed.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from fitonnx.fisher.options import FisherOptions
from fitonnx.fisher.session import open_model
from fitonnx.model.source import RandomData
from fitonnx.score.run import score_model


def rss() -> int:
    """This process's resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Peak:
    """The largest RSS seen since the last ``mark``, sampled by a daemon thread."""

    def __init__(self, every: float = 0.02) -> None:
        self.peak = rss()
        self.every = every
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def mark(self) -> int:
        """The peak since the previous mark (then start over from the current RSS)."""
        seen, self.peak = max(self.peak, rss()), rss()
        return seen


def model_bytes(path: Path) -> int:
    """The model file plus every other file in its folder that its name starts (its external data)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.stem) and p.suffix != ".npz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--random", type=int, default=4, help="random samples when --data is not given")
    parser.add_argument("--engine", default="onnx")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    size = model_bytes(args.model)
    peak = Peak()
    start = rss()
    t0 = time.perf_counter()
    data = args.data if args.data is not None else RandomData(args.random)
    s = open_model(args.model, data, max_samples=args.samples)
    stages = [("open_model (load, prepare, verify)", peak.mark(), time.perf_counter() - t0)]
    options = FisherOptions(engine=args.engine, max_samples=args.samples, batch_size=args.batch_size)
    t1 = time.perf_counter()
    report = score_model(args.model, options=options, session=s)
    stages.append(("gradient model, per-sample loop, report", peak.mark(), time.perf_counter() - t1))
    print(
        f"model {args.model.name}: {size / 2**30:.2f} GiB with its external data; RSS at start {start / 2**30:.2f} GiB"
    )
    for name, value, seconds in stages:
        print(f"  {name:42s} peak RSS {value / 2**30:6.2f} GiB = {value / size:4.2f}x the model  ({seconds:.0f} s)")
    overall = max(v for _, v, _ in stages)
    print(f"overall peak RSS {overall / 2**30:.2f} GiB = {overall / size:.2f}x the model; {report.samples} samples")


if __name__ == "__main__":
    main()
