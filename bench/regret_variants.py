"""More refinement variants on ``bench/regret_draws.py``'s draws, without re-running them: K, z, one
weight changed, and the union of FIT's and the output-space answer's neighbours, scored from the
draws' stored predictor tables (its --json) and the pool's stored per-sample KL (its --cache).

    python bench/regret_variants.py DRAWS.json CACHE_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np

from fitonnx.allocate.knapsack import Item
from fitonnx.analysis.oracle import average_bits, knapsack_answer
from fitonnx.analysis.refine import neighbours, refine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import regret_draws as rd

docs = json.loads(Path(sys.argv[1]).read_text())
bits, kl = rd.pool_kl(Path(sys.argv[2]))
data = rd.pool()
n = data["labels"].shape[0]
names = list(docs[0]["tables"]["fit"].keys())
numels = [72, 1152, 50176, 640]
row = {tuple(int(b) for b in r): i for i, r in enumerate(bits)}
variants = {}


def variant(name):
    def deco(f):
        variants[name] = f
        return f

    return deco


def run(label, K, z, moves=2):
    def f(tables, budget, calib, key):
        items = tables[label]
        start, ms = knapsack_answer(items, budget)
        c = neighbours(items, start, ms, K, moves)
        return key(refine(c, lambda a: calib[key(a)], z).best)

    return f


for label in ("fit", "output_space"):
    for K in (16, 32, 64, 128):
        for z in (1.0, 1.5, 2.0, 3.0):
            variants[f"{label} K={K} z={z}"] = run(label, K, z)
    variants[f"{label} K=32 z=2 moves=1"] = run(label, 32, 2.0, 1)


def union(K, z, first="fit"):
    other = "output_space" if first == "fit" else "fit"

    def f(tables, budget, calib, key):
        a, ms = knapsack_answer(tables[first], budget)
        b, _ = knapsack_answer(tables[other], budget)
        ca = neighbours(tables[first], a, ms, K // 2)
        cb = neighbours(tables[other], b, ms, K // 2)
        seen, c = set(), []
        for x in ca[:1] + cb[:1] + ca[1:] + cb[1:]:
            k = key(x[0])
            if k not in seen:
                seen.add(k)
                c.append(x)
        return key(refine(c, lambda a: calib[key(a)], z).best)

    return f


for K in (16, 32, 64):
    variants[f"union fit|os K={K} z=2"] = union(K, 2.0)
    variants[f"union os|fit K={K} z=2"] = union(K, 2.0, "output_space")

res = {v: np.zeros((len(docs), 4)) for v in variants}
for di, doc in enumerate(docs):
    d = doc["draw"]
    order = np.arange(n) if d == 0 else np.random.default_rng(d).permutation(n)
    cal_idx, judge_idx = order[:256], order[256:]
    judge = kl[:, judge_idx].mean(axis=1)
    calib = kl[:, cal_idx]
    tables = {
        lab: [Item(w, numels[j], rd.WIDTHS, tuple(t[w])) for j, w in enumerate(names)]
        for lab, t in doc["tables"].items()
    }
    key = lambda a: row[tuple(a[w] for w in names)]  # noqa: E731
    for bi, budget in enumerate(rd.BUDGETS):
        inside = np.array([average_bits(r, numels) <= budget + 1e-9 for r in bits])
        best = judge[inside].min()
        for v, f in variants.items():
            res[v][di, bi] = judge[f(tables, budget, calib, key)] / best
for v, r in res.items():
    print(
        f"{v:<32} "
        + "  ".join(f"{np.median(r[:, b]):.3f}/{r[:, b].max():.3f}" for b in range(4))
        + f"  mean {r.mean():.3f} all<=1.1 {int((r <= 1.1).all(axis=1).sum())}  draw0 "
        + " ".join(f"{x:.3f}" for x in r[0])
    )
