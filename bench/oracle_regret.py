"""Recommendation regret against an exhaustive oracle on the bundled CNN (issue 17).

Every per-tensor assignment of 2-8 bits to mnist_cnn's weights (activations float) within 3, 3.5, 4
and 4.5 average bits per weight is simulated on models/mnist_cnn.heldout.npz
(``fitonnx.analysis.oracle``); each predictor's recommendation is the assignment it scores lowest
within the budget (an exact knapsack's answer) and its regret is KL(recommended) / KL(best). The
one-tensor-at-a-time baseline (each tensor's own measured KL summed, the AIMET/Quark approach) is
set beside it, with the cost of each.

The refined recommendations (``fitonnx.analysis.refine``): a predictor's knapsack answer and its
K − 1 best-predicted neighbours (at most two tensors changed, within the budget), each simulated
on the 256 CALIBRATION samples, the least measured KL kept; cost K calibration simulations. Their
regret is judged on the held-out samples, which the refinement never reads.

``--cache DIR`` stores every assignment's held-out and calibration KL in DIR (JSON) on the first run
and reads them on the next (the oracle is ~2400 simulations; a refinement's choices are then read
from the stored calibration KL, which is what simulating them gives: the simulation is deterministic).

    python bench/oracle_regret.py [--fisher empirical|mc|exact] [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fitonnx.allocate.knapsack import Budget, BudgetKind, Item, pareto_front
from fitonnx.analysis.harness import Harness, SimulationOptions, harness
from fitonnx.analysis.oracle import average_bits, measure_assignments, one_at_a_time, oracle, predictor_scorers
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.refine import measurer, neighbours, refine
from fitonnx.analysis.simulate import Config
from fitonnx.fisher.options import FisherOptions

MODELS = Path(__file__).resolve().parent.parent / "models"
BUDGETS = (3.0, 3.5, 4.0, 4.5)
WIDTHS = (2, 3, 4, 5, 6, 7, 8)
SHOWN = (Predictor.FIT, Predictor.FIT_MEASURED, Predictor.QUADRATIC, Predictor.OUTPUT_SPACE, Predictor.NOISE_ONLY)
# The interaction-aware predictors of branch `joint` (fitonnx.analysis.joint), where it is merged:
# not additive, so searched over every assignment and used to re-rank the refinement's candidates.
RERANK = tuple(Predictor(n) for n in ("joint", "joint_kl", "superposed") if n in {p.value for p in Predictor})
REFINED = (Predictor.FIT, Predictor.QUADRATIC, Predictor.OUTPUT_SPACE)
KS = (2, 4, 8, 16, 32)
ZS = (0.0, 2.0)
Cache = dict[tuple[int, ...], float]


def cached(path: Path | None, measure: Callable[[], Cache]) -> tuple[Cache, float]:
    """Every assignment's KL, read from ``path`` when stored there, else measured (and stored)."""
    if path is not None and path.is_file():
        doc = json.loads(path.read_text())
        return {tuple(int(b) for b in k.split(",")): v for k, v in doc["kl"].items()}, float(doc["seconds"])
    t0 = time.perf_counter()
    kl = measure()
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seconds": seconds, "kl": {",".join(map(str, k)): v for k, v in kl.items()}}))
    return kl, seconds


def items_of(h: Harness, predictor: Predictor) -> list[Item]:
    """The knapsack's menu from a predictor's table: every weight at every integer width."""
    table = h.tables.values[predictor]
    col = {b: j for j, b in enumerate(h.tables.bits)}
    rows = {name: r for r, name in enumerate(h.tables.names)}
    return [
        Item(w, int(h.simulator.sim.weights[w].size), WIDTHS, tuple(float(table[rows[w], col[b]]) for b in WIDTHS))
        for w in h.weights
    ]


def refined(h: Harness, calib: Callable[[dict[str, int]], np.ndarray], held: Cache) -> list[dict]:
    """Per budget, predictor, K and z: the refined choice's held-out KL (and the knapsack answer's)."""
    rows = []
    total = sum(int(h.simulator.sim.weights[w].size) for w in h.weights)
    for p in REFINED:
        items = items_of(h, p)
        front = pareto_front(items)
        for budget in BUDGETS:
            max_size = Budget(BudgetKind.AVG_BITS, budget).max_bits(total)
            start = front.config(front.best_within(max_size))
            for k in KS:
                cands = neighbours(items, start, max_size, k)
                for z in ZS:
                    r = refine(cands, calib, z)
                    key = tuple(r.best[w] for w in h.weights)
                    rows.append(
                        {"predictor": p.value, "budget": budget, "k": k, "z": z, "kl": held[key], "bits": list(key)}
                    )
                for q in RERANK:  # no simulation: the candidate a non-additive predictor scores lowest
                    r = refine(cands, lambda a, q=q: np.array([h.tables.total(q, Config(a, {}))]), 0.0)
                    key = tuple(r.best[w] for w in h.weights)
                    rows.append(
                        {
                            "predictor": p.value,
                            "budget": budget,
                            "k": k,
                            "z": q.value,
                            "kl": held[key],
                            "bits": list(key),
                        }
                    )
    return rows


def calibration_samples(path: Path | None, h: Harness, keys: list[tuple[int, ...]]) -> tuple[dict, float]:
    """Every assignment's per-sample KL on the calibration data: read from ``path`` (.npz) when
    stored there, else simulated (and stored)."""
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {tuple(int(b) for b in row): kl for row, kl in zip(z["bits"], z["kl"], strict=True)}, float(
                z["seconds"]
            )
    cal = measurer(h.simulator, h.session.data, h.target)
    t0 = time.perf_counter()
    out = {k: cal.samples(dict(zip(h.weights, k, strict=True))) for k in keys}
    seconds = time.perf_counter() - t0
    if path is not None:
        np.savez(path, bits=np.array(keys), kl=np.stack([out[k] for k in keys]), seconds=seconds)
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fisher", default="empirical")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    t0 = time.perf_counter()
    h = harness(
        MODELS / "mnist_cnn.onnx",
        MODELS / "mnist_cnn.calib.npz",
        simulation=SimulationOptions(weight_bits=WIDTHS, weights_only=True),
        options=FisherOptions(fisher=args.fisher),
    )
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    single, runs = one_at_a_time(h, WIDTHS)
    t_single = time.perf_counter() - t0
    held, t_oracle = cached(args.cache and args.cache / "heldout.json", lambda: measure_assignments(h, BUDGETS))
    calib, t_calib = calibration_samples(args.cache and args.cache / f"calib_{args.fisher}.npz", h, list(held))
    results = oracle(h, BUDGETS, {**predictor_scorers(h, (*SHOWN, *RERANK)), "one_at_a_time": single}, measured=held)
    sizes = [int(h.simulator.sim.weights[w].size) for w in h.weights]
    print(
        f"mnist_cnn: weights {sizes}, {args.fisher} Fisher from {h.samples} samples, damage on {h.held_out.num_samples}"
    )
    print(
        f"cost: predictors {t_cal:.1f} s (3 calibration passes); one-at-a-time {runs} simulations {t_single:.1f} s; "
        f"oracle {len(held)} simulations {t_oracle:.1f} s; calibration KL of all {t_calib:.1f} s"
    )
    best = {r.budget: r.best_kl for r in results}
    cal_oracle = {}
    for budget in BUDGETS:
        inside = [k for k in held if average_bits(k, sizes) <= budget + 1e-9]
        k = min(inside, key=lambda k: float(calib[k].mean()))
        cal_oracle[budget] = f"{held[k] / best[budget]:.3f} {list(k)}"
    for r in results:
        cells = "  ".join(f"{k} {r.regret[k]:.3f} (#{r.rank[k]})" for k in r.regret)
        print(
            f"{r.budget} bits: {r.assignments} assignments, best KL {r.best_kl:.4g} {list(r.best.values())}; regret {cells}"
        )
    rows = refined(h, lambda a: calib[tuple(a[w] for w in h.weights)], held)
    print(f"calibration oracle (every assignment simulated on the calibration data, least mean KL kept): {cal_oracle}")
    for row in rows:
        row["regret"] = row["kl"] / best[row["budget"]]
    for p in REFINED:
        for k in KS:
            for z in (*ZS, *(q.value for q in RERANK)):
                cells = "  ".join(
                    f"{r['budget']}: {r['regret']:.3f} {r['bits']}"
                    for r in rows
                    if r["predictor"] == p.value and r["k"] == k and r["z"] == z
                )
                how = f"z={z:g} (K calibration simulations)" if isinstance(z, float) else f"re-ranked by {z}"
                print(f"refined {p.value} K={k} {how}: {cells}")
    if args.json:
        doc = {"results": [dataclasses.asdict(r) for r in results], "time_predictors_s": t_cal, "refined": rows}
        doc |= {"time_one_at_a_time_s": t_single, "one_at_a_time_runs": runs, "time_oracle_s": t_oracle}
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
