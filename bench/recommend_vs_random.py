"""Does the recommended configuration beat the uniform one and random ones of the same size?

For each bundled model and weight budget (average bits): FIT from the calibration split, the
recommended configuration (target ``generic``, activations at 8 bits), the uniform configuration
of that size (between uniform sizes: the largest that fits), and configurations drawn at random among those whose weight size lies within
[1 − slack, 1] of the budget (every such configuration when there are few), all simulated in ONNX
Runtime (``fitonnx.simulate``, asymmetric min/max, per tensor, activations at 8 bits) on the
held-out split. Damage: mean KL(float ‖ quantized) of the output distributions, and accuracy.

    python bench/recommend_vs_random.py [--budgets 2.5,3,4] [--random 200] [--slack 0.1] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from fitonnx import api
from fitonnx.analysis import simulate
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import load_npz
from fitonnx.model.graph import Kind

MODELS = Path(__file__).resolve().parent.parent / "models"


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    top = z.max(axis=1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=1, keepdims=True))


def damage(ref: np.ndarray, z: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean KL(softmax(ref) ‖ softmax(z)) per sample, and accuracy against ``labels``."""
    lp, lq = log_softmax(ref), log_softmax(z)
    kl = float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())
    return kl, float((z.argmax(axis=1) == labels).mean())


def run(
    model: str, budgets: list[float], n_random: int, slack: float, seed: int, fisher: str | None, noise_model: str
) -> list[dict]:
    path = MODELS / f"{model}.onnx"
    session = api.open_model(path)
    held = load_npz(MODELS / f"{model}.heldout.npz")
    results = []
    first = api.recommend(
        path,
        session=session,
        avg_bits=budgets[0],
        target="generic",
        options=FisherOptions(fisher=fisher),
        noise_model=noise_model,
    )
    report = first.report
    weights = [t for t in report.tensors if t.kind is Kind.WEIGHT]
    acts = {t.name: (t.min, t.max) for t in report.tensors if t.kind is Kind.ACTIVATION}
    output = session.prepared.model.graph.output[0].name
    sim = simulate.build(session.prepared.model, session.tensors, output)
    simulator = simulate.Simulator(
        sim,
        session.prepared.model,
        session.tensors,
        acts,
        simulate.GridScheme(),
        held,
        session.specs,
        batch_size=250,
    )
    ref = simulator.run(simulate.Config.floating())
    float_acc = float((ref.argmax(axis=1) == held.labels).mean())
    act8 = dict.fromkeys(acts, 8)

    def measure(bits: dict[str, int]) -> tuple[float, float]:
        return damage(ref, simulator.run(simulate.Config(weight_bits=bits, activation_bits=act8)), held.labels)

    total = sum(t.numel for t in weights)
    menu = first.allocation.target.weight_bits
    everything = list(itertools.product(menu, repeat=len(weights)))
    rng = np.random.default_rng(seed)
    for avg in budgets:
        res = api.recommend(
            path,
            session=session,
            avg_bits=avg,
            target="generic",
            options=FisherOptions(fisher=fisher),
            noise_model=noise_model,
        )
        rec = res.allocation.recommendation
        limit = avg * total
        same_size = [
            c
            for c in everything
            if (1 - slack) * limit <= sum(t.numel * b for t, b in zip(weights, c, strict=True)) <= limit
            and c != tuple(rec.weight_bits[t.name] for t in weights)
        ]
        if len(same_size) > n_random:
            same_size = [same_size[i] for i in rng.choice(len(same_size), n_random, replace=False)]
        rec_kl, rec_acc = measure(dict(rec.weight_bits))
        # The uniform configuration of this size, or (between uniform sizes) the largest that fits.
        uniform_bits = max((b for b in menu if b <= avg), default=None)
        uni = measure({t.name: uniform_bits for t in weights}) if uniform_bits is not None else (None, None)
        rand = np.array([measure({t.name: b for t, b in zip(weights, c, strict=True)}) for c in same_size])
        row = {
            "model": model,
            "avg_bits": avg,
            "weight_bytes": rec.weight_bytes,
            "recommended_bits": dict(rec.weight_bits),
            "recommended_fit": rec.fit,
            "recommended_kl": rec_kl,
            "recommended_acc": rec_acc,
            "uniform_bits": uniform_bits,
            "uniform_kl": uni[0],
            "uniform_acc": uni[1],
            "float_acc": float_acc,
            "random_configs": len(same_size),
            "random_kl_median": float(np.median(rand[:, 0])) if len(rand) else None,
            "random_acc_median": float(np.median(rand[:, 1])) if len(rand) else None,
            "random_beaten": float(np.mean(rand[:, 0] > rec_kl)) if len(rand) else None,
            "random_better": [
                {"bits": dict(zip([t.name for t in weights], c, strict=True)), "kl": float(kl), "acc": float(acc)}
                for c, (kl, acc) in zip(same_size, rand.tolist(), strict=True)
                if kl < rec_kl
            ],
        }
        results.append(row)
        print(
            f"{model} avg≤{avg:g} bits ({rec.weight_bytes} B): recommended KL {rec_kl:.4g} acc {100 * rec_acc:.1f}%"
            + ("" if uni[0] is None else f" | uniform {uniform_bits}b KL {uni[0]:.4g} acc {100 * uni[1]:.1f}%")
            + f" | {len(same_size)} random of the same size: median KL {row['random_kl_median']:.4g}, "
            f"median acc {100 * row['random_acc_median']:.1f}%, recommended better than {100 * row['random_beaten']:.1f}% "
            f"({len(row['random_better'])} better) "
            f"| float acc {100 * float_acc:.1f}%",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist_cnn,digits_mlp")
    parser.add_argument("--budgets", default="2.5,3,4")
    parser.add_argument("--random", type=int, default=200)
    parser.add_argument("--slack", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fisher", choices=["empirical", "mc", "exact"], help="Fisher mode (default: empirical)")
    parser.add_argument("--noise-model", choices=["uniform", "grid"], default="uniform", help="FIT's noise model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = [
        r
        for m in args.models.split(",")
        for r in run(m, budgets, args.random, args.slack, args.seed, args.fisher, args.noise_model)
    ]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
