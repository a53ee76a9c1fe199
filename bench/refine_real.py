"""FIT's recommendation, refined or not, against the one-tensor-at-a-time allocation on real models (issue 17).

For each real trained model (authors' weights) and average-bits budget, weights only, activations
float, on one grid family: the exact knapsack's assignment for

- ``fit``: the paper's FIT table (three calibration passes; the harness's);
- ``output_space``: ModelOpt AutoQuantize's output-space score (the harness's third pass);
- ``one_at_a_time``: each weight alone at each width simulated on the CALIBRATION data, the KL
  summed (the AIMET / Quark / ModelOpt-KL allocation; n_weights × n_widths simulations);
- ``fit+refine K``: FIT's answer and its K − 1 best-predicted neighbours simulated on the
  calibration data, the least KL kept (``fitonnx.analysis.refine``, ``recommend --refine K``);
- ``one_at_a_time+refine K``: the same refinement of the baseline's answer;

each then measured on the HELD-OUT data (KL against the float model, and the share of decisions kept).
Data: ``scripts/data/build_data.py --scale 4 --out DIR`` (rendered text lines, espeak-ng speech).

    python bench/refine_real.py --data DIR [--models ppocr_cls_mbv3,silero_vad_16k_op15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fitonnx.analysis.harness import SimulationOptions, harness
from fitonnx.analysis.oracle import knapsack_answer, one_at_a_time, predictor_scorers, scorer_items
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.refine import measurer, neighbours, refine
from fitonnx.analysis.simulate import Config
from fitonnx.fisher.options import FisherOptions

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
FISHER = {"ppocr_cls_mbv3": "empirical", "silero_vad_16k_op15": "mc"}
FAMILIES = {  # name: (simulation options, widths, budgets in average bits)
    "int/ch": (dict(per_channel=True, symmetric=True), (4, 5, 6, 8), (5.0, 6.0)),
    "uint": (dict(), (4, 5, 6, 7, 8), (6.0, 7.0)),
}
KS = (8, 16, 32)
ZS = (0.0, 2.0)  # the refinement's paired test: 0 = least mean KL


def study(model: str, data: Path, family: str) -> list[dict]:
    grid, widths, budgets = FAMILIES[family]
    t0 = time.perf_counter()
    h = harness(
        ZOO / f"{model}.onnx",
        data / f"{model}.calib.npz",
        data / f"{model}.heldout.npz",
        simulation=SimulationOptions(weight_bits=widths, weights_only=True, **grid),
        options=FisherOptions(fisher=FISHER[model]),
    )
    t_fit = time.perf_counter() - t0
    cal = measurer(h.simulator, h.session.data, h.target)
    t0 = time.perf_counter()
    single, runs = one_at_a_time(h, widths, lambda c: cal.kl(c.weight_bits))
    t_single = time.perf_counter() - t0
    tables = {**predictor_scorers(h, (Predictor.FIT, Predictor.OUTPUT_SPACE)), "one_at_a_time": single}
    print(
        f"{model} {family}: {len(h.weights)} weights, calibration {h.session.data.num_samples}, "
        f"held-out {h.held_out.num_samples}; FIT passes {t_fit:.0f} s; one-at-a-time {runs} simulations {t_single:.0f} s",
        flush=True,
    )
    rows = []
    for budget in budgets:
        for label, score in tables.items():
            items = scorer_items(h, widths, score)
            start, max_size = knapsack_answer(items, budget)
            t0 = time.perf_counter()
            cands = neighbours(items, start, max_size, max(KS))
            measured = {tuple(sorted(a.items())): cal.samples(a) for a, _ in cands}  # each simulated once
            t_refine = time.perf_counter() - t0
            picks = {label: (start, 0, 0.0)}
            for k in KS:
                for z in ZS:
                    r = refine(cands[:k], lambda a, m=measured: m[tuple(sorted(a.items()))], z)
                    picks[f"{label}+refine {k} z={z:g}"] = (r.best, r.chosen, t_refine * k / len(cands))
            for name, (a, chosen, seconds) in picks.items():
                rows.append(_row(h, model, family, budget, name, a, chosen, seconds))
                rows[-1] |= {"cost_fit_s": t_fit, "cost_single_s": t_single, "single_runs": runs}
    return rows


def _row(h, model: str, family: str, budget: float, name: str, a: dict, chosen: int, seconds: float) -> dict:
    d = h.measure(Config(a, {}))
    numel = {w: int(h.simulator.sim.weights[w].size) for w in h.weights}
    avg = sum(numel[w] * b for w, b in a.items()) / sum(numel.values())
    print(
        f"  {budget} bits {name:<32} held-out KL {d.kl:.5g}  agreement {d.agreement:.4f}  avg {avg:.3f}  "
        f"kept #{chosen}  {seconds:.0f} s",
        flush=True,
    )
    return {
        "model": model, "family": family, "budget": budget, "method": name, "kl": d.kl, "agreement": d.agreement,
        "avg_bits": avg, "kept_candidate": chosen, "refine_s": seconds, "bits": a,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", default=",".join(FISHER))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for family in args.families.split(","):
            rows += study(model, args.data, family)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
