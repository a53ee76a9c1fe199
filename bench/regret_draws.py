"""How stable each recommendation variant's regret is across calibration draws (bundled CNN, issue 17).

``bench/oracle_regret.py`` judges every variant on one split: the 256 shipped calibration samples
and the 1000 held-out ones. Here the two are pooled (1256 samples) and redrawn: draw 0 is the
shipped split, draw d > 0 takes 256 calibration samples at random (seed d) and judges on the other
1000 (``--n-calib``: another count). Every per-tensor assignment of 2–8 bits within 4.5 average bits (1029 of them) is simulated
once on the whole pool (per-sample KL, ``--cache``), so a draw costs only its calibration passes
(FIT, measured error, output space), the one-at-a-time table on its calibration samples (28
simulations) and nothing more: a refinement's candidates are read from the pool's per-sample KL
(the simulation is deterministic, so that is what simulating them on the calibration samples gives).

Variants, each a knapsack answer (``fit``, ``output_space``, ``one_at_a_time`` on calibration
data) alone or refined (``+ refine K z``: the answer and its K − 1 best-predicted neighbours,
``fitonnx.analysis.refine``), and the calibration oracle (every assignment's calibration KL, least
kept). Regret = the judge samples' mean KL over the least in the budget.

    python bench/regret_draws.py --cache DIR [--draws 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fitonnx.analysis.damage import damage
from fitonnx.analysis.harness import SimulationOptions, harness
from fitonnx.analysis.oracle import assignments, average_bits, knapsack_answer, one_at_a_time, scorer_items
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.refine import measurer, neighbours, refine
from fitonnx.analysis.simulate import Config
from fitonnx.fisher.options import FisherOptions

MODELS = Path(__file__).resolve().parent.parent / "models"
BUDGETS = (3.0, 3.5, 4.0, 4.5)
WIDTHS = (2, 3, 4, 5, 6, 7, 8)
N_CALIB = 256
KS = (8, 16, 32)
ZS = (0.0, 2.0)
SIMULATION = SimulationOptions(weight_bits=WIDTHS, weights_only=True)


def pool() -> dict[str, np.ndarray]:
    """The shipped calibration samples, then the held-out ones."""
    with np.load(MODELS / "mnist_cnn.calib.npz") as c, np.load(MODELS / "mnist_cnn.heldout.npz") as h:
        return {k: np.concatenate([c[k], h[k]]) for k in ("input", "labels")}


def pool_kl(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every assignment within the largest budget (rows, widths in the harness's weight order) and
    its per-sample KL on the pool (calibration columns first); stored in ``cache``."""
    path = cache / "persample.npz"
    if not path.is_file():
        h = harness(MODELS / "mnist_cnn.onnx", MODELS / "mnist_cnn.calib.npz", simulation=SIMULATION)
        names = list(h.weights)
        numels = [int(h.simulator.sim.weights[w].size) for w in names]
        every = assignments(names, numels, WIDTHS, max(BUDGETS))
        cal = measurer(h.simulator, h.session.data, h.target)
        held = [damage(h.reference, h.simulator.run(Config(a, {}))).sample_kl for a in every]
        calib = [cal.samples(a) for a in every]
        bits = np.array([list(a.values()) for a in every])
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, bits=bits, held=np.array(held), calib=np.array(calib))
    with np.load(path) as z:
        return z["bits"], np.concatenate([z["calib"], z["held"]], axis=1)


def draw(
    d: int, data: dict[str, np.ndarray], bits: np.ndarray, kl: np.ndarray, tmp: Path, n_calib: int = N_CALIB
) -> dict:
    """One calibration draw: every variant's choice and regret at every budget."""
    n = data["labels"].shape[0]
    order = np.arange(n) if d == 0 else np.random.default_rng(d).permutation(n)
    cal_idx, judge_idx = order[:n_calib], order[n_calib:]
    tmp.mkdir(parents=True, exist_ok=True)
    np.savez(tmp / f"calib{d}.npz", **{k: v[cal_idx] for k, v in data.items()})
    np.savez(tmp / f"judge{d}.npz", **{k: v[judge_idx] for k, v in data.items()})
    t0 = time.perf_counter()
    h = harness(
        MODELS / "mnist_cnn.onnx",
        tmp / f"calib{d}.npz",
        tmp / f"judge{d}.npz",
        simulation=SIMULATION,
        options=FisherOptions(fisher="empirical"),
    )
    t_passes = time.perf_counter() - t0
    cal = measurer(h.simulator, h.session.data, h.target)
    t0 = time.perf_counter()
    single, runs = one_at_a_time(h, WIDTHS, lambda c: cal.kl(c.weight_bits))
    t_single = time.perf_counter() - t0
    row = {tuple(int(b) for b in r): i for i, r in enumerate(bits)}
    judge = kl[:, judge_idx].mean(axis=1)
    calib = kl[:, cal_idx]
    numels = [int(h.simulator.sim.weights[w].size) for w in h.weights]
    scorers = {
        p.value: (lambda a, p=p: h.tables.total(p, Config(dict(a), {})))
        for p in (Predictor.FIT, Predictor.OUTPUT_SPACE)
    }
    scorers["one_at_a_time"] = single
    tables = {label: scorer_items(h, WIDTHS, s) for label, s in scorers.items()}
    out = {"draw": d, "passes_s": t_passes, "one_at_a_time_s": t_single, "one_at_a_time_runs": runs, "budgets": {}}
    out["tables"] = {label: {it.name: list(it.fit) for it in items} for label, items in tables.items()}
    for budget in BUDGETS:
        inside = np.array([average_bits(r, numels) <= budget + 1e-9 for r in bits])
        best = float(judge[inside].min())
        key = lambda a: row[tuple(a[w] for w in h.weights)]  # noqa: E731
        picks = {}
        for label, items in tables.items():
            start, max_size = knapsack_answer(items, budget)
            picks[label] = key(start)
            cands = neighbours(items, start, max_size, max(KS))
            for k in KS:
                for z in ZS:
                    r = refine(cands[:k], lambda a, key=key: calib[key(a)], z)
                    picks[f"{label}+refine {k} z={z:g}"] = key(r.best)
        cal_mean = np.where(inside, calib.mean(axis=1), np.inf)
        picks["calibration oracle"] = int(np.argmin(cal_mean))
        floor = split_floor(kl[:, judge_idx], inside, np.random.default_rng(1000 + d))
        out["budgets"][budget] = {
            "best_kl": best,
            "split_floor": floor,
            "best": bits[int(np.argmin(np.where(inside, judge, np.inf)))].tolist(),
            "picks": {
                m: {"bits": bits[i].tolist(), "kl": float(judge[i]), "regret": float(judge[i] / best)}
                for m, i in picks.items()
            },
        }
    return out


def split_floor(judge: np.ndarray, inside: np.ndarray, rng: np.random.Generator, splits: int = 50) -> float:
    """The regret's own noise: the best assignment on half the judge samples, judged on the other
    half (median over ``splits`` random halves)."""
    n = judge.shape[1]
    out = []
    for _ in range(splits):
        perm = rng.permutation(n)
        a, b = judge[:, perm[: n // 2]].mean(axis=1), judge[:, perm[n // 2 :]].mean(axis=1)
        pick = int(np.argmin(np.where(inside, a, np.inf)))
        out.append(b[pick] / b[inside].min())
    return float(np.median(out))


def summary(docs: list[dict]) -> None:
    """Per variant and budget: median and worst regret over the draws, and in how many draws the
    variant is within 1.1 at every budget."""
    print(f"over {len(docs)} draws: median / max regret per budget {BUDGETS}; draws within 1.1 at all budgets")
    rows = [("held-out split floor (median)", [[d["budgets"][b]["split_floor"] for d in docs] for b in BUDGETS])]
    rows += [
        (m, [[d["budgets"][b]["picks"][m]["regret"] for d in docs] for b in BUDGETS])
        for m in docs[0]["budgets"][BUDGETS[0]]["picks"]
    ]
    for m, per in rows:
        r = np.array(per)
        cells = "  ".join(f"{np.median(x):.3f}/{x.max():.3f}" for x in r)
        print(f"  {m:<34} {cells}  mean {r.mean():.3f}  all<=1.1 in {int(np.sum((r <= 1.1).all(axis=0)))}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--n-calib", type=int, default=N_CALIB, help="calibration samples per draw (the rest judge)")
    args = parser.parse_args()
    bits, kl = pool_kl(args.cache)
    data = pool()
    assert kl.shape == (bits.shape[0], data["labels"].shape[0])
    docs = []
    for d in range(args.draws):
        docs.append(draw(d, data, bits, kl, args.cache / f"draws{args.n_calib}", args.n_calib))
        doc = docs[-1]
        print(
            f"draw {d}: passes {doc['passes_s']:.1f} s, one-at-a-time {doc['one_at_a_time_runs']} simulations {doc['one_at_a_time_s']:.1f} s",
            flush=True,
        )
        for m in doc["budgets"][BUDGETS[0]]["picks"]:
            cells = "  ".join(f"{doc['budgets'][b]['picks'][m]['regret']:.3f}" for b in BUDGETS)
            print(f"  {m:<34} {cells}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(docs, indent=1))
    summary(docs)


if __name__ == "__main__":
    main()
