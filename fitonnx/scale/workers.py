"""``Workers``: where the per-sample work of a run goes (this process, local processes, or Ray).

It changes how fast a run is, never what it finds: every parallel run merges its workers' rows in
sample order, so reports, standard errors and bootstraps equal the single-process ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fitonnx.errors import FitonnxError

LOCAL_RAY = "local"  # --ray without an address: a Ray started on this machine for the run


@dataclass(frozen=True)
class Workers:
    """``processes``: local worker processes (``--workers N``; 1: this process). ``ray``: run the
    work as Ray tasks (``--ray [ADDRESS]``), on the cluster at ``address`` or, without one, on a
    Ray started here; there ``processes`` > 1 caps the tasks in flight (default: the cluster's CPUs)."""

    processes: int = 1
    ray: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise FitonnxError(f"expected --workers of at least 1; found {self.processes}")
        if self.address is not None and not self.ray:
            raise FitonnxError(f"expected a Ray address only with --ray; found {self.address!r} without it")
        if self.address is not None and not self.address.strip():
            raise FitonnxError("expected a Ray address like HOST:PORT or ray://HOST:PORT after --ray; found ''")

    @property
    def parallel(self) -> bool:
        """Whether work leaves this process."""
        return self.ray or self.processes > 1

    def describe(self) -> str:
        """How the work is spread, for progress labels."""
        if self.ray:
            return f"Ray at {self.address}" if self.address else "a local Ray"
        return f"{self.processes} worker processes" if self.processes > 1 else "this process"


def threads_per_process(processes: int, threads: int = 0) -> int:
    """onnxruntime threads each of ``processes`` local workers uses: ``threads`` if given, else the
    machine's cores shared out (one worker per core never fights another for it)."""
    if threads > 0:
        return threads
    return max(1, (os.cpu_count() or 1) // max(processes, 1))
