"""The FIT-against-size front on disk: pareto.json, pareto.csv and (with matplotlib) pareto.png.

Every point of the front is written, each with its full configuration. The JSON stores the bit
widths as one list per point aligned with ``tensors`` (a dict per point would repeat every name).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import numpy as np

from fitonnx.allocate.knapsack import Allocation, BudgetKind, weight_bytes
from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text
from fitonnx.render.plot import label_fit_against_size, pyplot_or_none, save_png


def _columns(alloc: Allocation) -> tuple[list[str], np.ndarray, list[int], np.ndarray, np.ndarray]:
    """Tensor names (most sensitive first), bits per point in that order, bytes, avg bits, total FIT."""
    front = alloc.front
    merge_order = [item.name for item in front.items]
    names = [n for n in alloc.recommendation.weight_bits if n in merge_order]
    bits = front.configs(np.arange(len(front)))[:, [merge_order.index(n) for n in names]]
    sizes = [weight_bytes(int(s)) for s in front.sizes]
    avg = front.sizes / alloc.total_numel if alloc.total_numel else np.zeros(len(front))
    return names, bits, sizes, avg, front.fits + alloc.activation_fit


def to_dict(alloc: Allocation) -> dict[str, Any]:
    names, bits, sizes, avg, fits = _columns(alloc)
    return {
        "model": alloc.recommendation.model,
        "target": alloc.target.name,
        "tolerance": alloc.front.tolerance,
        "activation_bits": dict(alloc.recommendation.activation_bits),
        "activation_fit": alloc.activation_fit,
        "chosen": alloc.chosen.index,
        "tensors": names,
        "points": [
            {"weight_bytes": s, "avg_weight_bits": float(a), "fit": float(f), "bits": row}
            for s, a, f, row in zip(sizes, avg, fits, bits.tolist(), strict=True)
        ],
        "uniform": [{"bits": u.bits, "weight_bytes": u.weight_bytes, "fit": u.fit} for u in alloc.uniform],
    }


def write_json(alloc: Allocation, path: str | os.PathLike[str]) -> None:
    text = json_text(to_dict(alloc), indent=None)
    write_atomic(path, lambda f: f.write(text))


def write_csv(alloc: Allocation, path: str | os.PathLike[str]) -> None:
    names, bits, sizes, avg, fits = _columns(alloc)

    def write(f: io.TextIOBase) -> None:
        w = csv.writer(f)
        w.writerow(["weight_bytes", "avg_weight_bits", "fit", "chosen", *names])
        for i, (s, a, fit, row) in enumerate(zip(sizes, avg, fits, bits.tolist(), strict=True)):
            w.writerow([s, repr(float(a)), repr(float(fit)), int(i == alloc.chosen.index), *row])

    write_atomic(path, write)


def write_png(alloc: Allocation, path: str | os.PathLike[str]) -> bool:
    """Plot the front (log FIT against KB) with the uniform configurations and the chosen point.

    Returns False, writing nothing, when matplotlib (the optional ``plot`` extra) is not installed.
    """

    plt = pyplot_or_none()
    if plt is None:
        return False
    _, _, sizes, _, fits = _columns(alloc)
    kb = np.array(sizes, np.float64) / 1024
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        ax.step(kb, fits, where="post", color="tab:blue", lw=1.2, label=f"Pareto front ({len(kb)} points)")
        ax.scatter(
            [u.weight_bytes / 1024 for u in alloc.uniform],
            [u.fit for u in alloc.uniform],
            color="tab:gray",
            marker="s",
            zorder=3,
            label="uniform bits",
        )
        for u in alloc.uniform:
            ax.annotate(f"{u.bits}b", (u.weight_bytes / 1024, u.fit), textcoords="offset points", xytext=(4, 4))
        if alloc.budget.kind is BudgetKind.MAX_FIT:
            ax.axhline(alloc.budget.value, color="tab:red", ls=":", lw=1, label="FIT budget")
        else:
            limit_kb = weight_bytes(alloc.budget.max_bits(alloc.total_numel)) / 1024
            ax.axvline(limit_kb, color="tab:red", ls=":", lw=1, label="size budget")
        i = alloc.chosen.index
        ax.scatter([kb[i]], [fits[i]], color="tab:red", marker="*", s=160, zorder=4, label="recommended")
        if (fits > 0).all():
            ax.set_yscale("log")
        label_fit_against_size(
            ax, f"{alloc.recommendation.model}, target {alloc.target.name}: {alloc.budget.describe()}"
        )
        save_png(fig, path)
    finally:
        plt.close(fig)
    return True
