"""Recommendation regret against an exhaustive oracle on the bundled CNN (issue 17).

Every per-tensor assignment of 2-8 bits to mnist_cnn's weights (activations float) within 3, 3.5, 4
and 4.5 average bits per weight is simulated on models/mnist_cnn.heldout.npz
(``fitonnx.analysis.oracle``); each predictor's recommendation is the assignment it scores lowest
within the budget (an exact knapsack's answer) and its regret is KL(recommended) / KL(best). The
one-tensor-at-a-time baseline (each tensor's own measured KL summed, the AIMET/Quark approach) is
set beside it, with the cost of each.

    python bench/oracle_regret.py [--fisher empirical|mc|exact] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from fitonnx.analysis.harness import SimulationOptions, harness
from fitonnx.analysis.oracle import one_at_a_time, oracle, predictor_scorers
from fitonnx.analysis.predictors import Predictor
from fitonnx.fisher.options import FisherOptions

MODELS = Path(__file__).resolve().parent.parent / "models"
BUDGETS = (3.0, 3.5, 4.0, 4.5)
WIDTHS = (2, 3, 4, 5, 6, 7, 8)
SHOWN = (Predictor.FIT, Predictor.FIT_MEASURED, Predictor.QUADRATIC, Predictor.OUTPUT_SPACE, Predictor.NOISE_ONLY)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fisher", default="empirical")
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
    t0 = time.perf_counter()
    results = oracle(h, BUDGETS, {**predictor_scorers(h, SHOWN), "one_at_a_time": single})
    t_oracle = time.perf_counter() - t0
    sizes = [int(h.simulator.sim.weights[w].size) for w in h.weights]
    print(
        f"mnist_cnn: weights {sizes}, {args.fisher} Fisher from {h.samples} samples, damage on {h.held_out.num_samples}"
    )
    print(
        f"cost: predictors {t_cal:.1f} s (3 calibration passes); one-at-a-time {runs} simulations {t_single:.1f} s; "
        f"oracle {t_oracle:.1f} s"
    )
    for r in results:
        cells = "  ".join(f"{k} {r.regret[k]:.3f} (#{r.rank[k]})" for k in r.regret)
        print(
            f"{r.budget} bits: {r.assignments} assignments, best KL {r.best_kl:.4g} {list(r.best.values())}; regret {cells}"
        )
    if args.json:
        doc = {"results": [dataclasses.asdict(r) for r in results], "time_predictors_s": t_cal}
        doc |= {"time_one_at_a_time_s": t_single, "one_at_a_time_runs": runs, "time_oracle_s": t_oracle}
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
