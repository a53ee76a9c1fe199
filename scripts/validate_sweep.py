"""Sweep ``fitonnx validate`` over seeds, bit sets and Fisher modes and print the spread of ρ.

The figures of the validate issue's closing note and of README's validate section come from this
script: for each model, candidate bit set and Fisher mode, the Spearman ρ of every predictor with
every measure over configuration seeds, as min–max and median, next to the measurement's own
split-half reliability ceiling.

    python scripts/validate_sweep.py                     # bundled models, seeds 0-4, 3-8 and 2-8 bits
    python scripts/validate_sweep.py --fisher empirical --fisher exact --json sweep.json
    python scripts/validate_sweep.py --oracle            # plus what no expectation-based metric can beat

``--oracle`` measures every tensor quantized alone at every width (its single-tensor KL) and ranks
the same configurations by two predictors that know the held-out answer: the sum of single-tensor
KLs (perfect per-tensor knowledge; only interactions between tensors are missing) and FIT rescaled
per tensor by the median of KL/FIT over widths (a per-tensor-calibrated FIT: what remains is the
departure of one particular rounding from the expected damage FIT models). It also draws FIT's
own noise model (independent uniform noise of one step on each weight, 100 draws) to show how far
one draw's damage strays from the median: the scatter no predictor of expected damage can remove.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

from fitonnx.analysis.damage import damage
from fitonnx.analysis.harness import SimulationOptions, harness
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.simulate import Config
from fitonnx.analysis.validate import SamplingOptions, sample_configs, validate
from fitonnx.fisher.options import FisherOptions
from fitonnx.score.ranks import spearman

MODELS = Path(__file__).resolve().parent.parent / "models"


def _bits(text: str) -> tuple[int, ...]:
    lo, hi = (int(v) for v in text.split("-"))
    return tuple(range(lo, hi + 1))


@click.command()
@click.argument("models", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--seeds", default=5, show_default=True, help="Configuration seeds 0..N-1.")
@click.option("--bits", "bit_sets", multiple=True, default=("3-8", "2-8"), show_default=True, help="Ranges lo-hi.")
@click.option("--fisher", "fishers", multiple=True, default=("empirical",), show_default=True)
@click.option("--configs", default=100, show_default=True)
@click.option("--oracle", is_flag=True, help="Also rank by single-tensor KLs measured on the held-out data.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every ρ here.")
def main(
    models: tuple[str, ...],
    seeds: int,
    bit_sets: tuple[str, ...],
    fishers: tuple[str, ...],
    configs: int,
    oracle: bool,
    json_path: str | None,
) -> None:
    paths = [Path(m) for m in models] or [MODELS / "mnist_cnn.onnx", MODELS / "digits_mlp.onnx"]
    rows = []
    for path in paths:
        for bit_text in bit_sets:
            bits = _bits(bit_text)
            for fisher in fishers:
                per_seed = []
                started = time.perf_counter()
                for seed in range(seeds):
                    r = validate(
                        path,
                        simulation=SimulationOptions(weight_bits=bits, activation_bits=bits),
                        sampling=SamplingOptions(configs=configs, resamples=0),
                        options=FisherOptions(fisher=fisher, seed=seed),
                    )
                    per_seed.append(r)
                elapsed = time.perf_counter() - started
                measures = per_seed[0].measures
                print(
                    f"\n{path.name}, bits {bit_text}, {fisher} Fisher, {configs} configs + uniform, seeds 0-{seeds - 1} ({elapsed:.0f} s)"
                )
                print(f"  {'predictor':<14}" + "".join(f"{m:>28}" for m in measures))
                for p in Predictor:
                    cells = []
                    for m in measures:
                        v = np.array([r.correlation(p, m).spearman for r in per_seed])
                        cells.append(f"{v.min():+.3f}..{v.max():+.3f} (med {np.median(v):+.3f})")
                        rows.append(
                            {
                                "model": path.name,
                                "bits": bit_text,
                                "fisher": fisher,
                                "predictor": p,
                                "measure": m,
                                "rho": v.tolist(),
                            }
                        )
                    print(f"  {p:<14}" + "".join(f"{c:>28}" for c in cells))
                for m in measures:
                    rel = [next((x for x in r.reliability if x.measure == m), None) for r in per_seed]
                    if all(x is not None for x in rel):
                        ceil = np.array([x.ceiling for x in rel])  # type: ignore[union-attr]
                        half = np.array([x.split_half for x in rel])  # type: ignore[union-attr]
                        print(
                            f"  measurement {m}: halves {half.min():+.3f}..{half.max():+.3f}, ceiling {ceil.min():.3f}..{ceil.max():.3f}"
                        )
                if oracle:
                    _oracle(path, bits, fisher, configs, seeds)
                sys.stdout.flush()
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")


def _oracle(path: Path, bits: tuple[int, ...], fisher: str, configs: int, seeds: int) -> None:
    h = harness(
        path, simulation=SimulationOptions(weight_bits=bits, activation_bits=bits), options=FisherOptions(fisher=fisher)
    )
    names, fit = h.tables.names, h.tables.values[Predictor.FIT]
    single = np.full_like(fit, np.nan)
    for row, name in enumerate(names):
        for col, b in enumerate(h.tables.bits):
            alone = Config({name: b}, {}) if name in h.weights else Config({}, {name: b})
            single[row, col] = h.measure(alone).kl
    calibrated = fit * np.nanmedian(single / fit, axis=1, keepdims=True)
    col = {b: k for k, b in enumerate(h.tables.bits)}

    def total(table: np.ndarray, c: Config) -> float:
        chosen = {**c.weight_bits, **c.activation_bits}
        return float(sum(table[r, col[chosen[n]]] for r, n in enumerate(names)))

    additive, scaled = [], []
    for seed in range(seeds):
        sampled = [c for c, _ in sample_configs(h.weights, h.activations, bits, bits, configs, seed)]
        kl = [damage(h.reference, h.simulator.run(c)).kl for c in sampled]
        additive.append(spearman([total(single, c) for c in sampled], kl))
        scaled.append(spearman([total(calibrated, c) for c in sampled], kl))
    print(
        f"  oracle (kl): sum of single-tensor KLs {min(additive):+.3f}..{max(additive):+.3f}; "
        f"per-tensor-calibrated FIT {min(scaled):+.3f}..{max(scaled):+.3f}"
    )
    # FIT's own noise model, drawn: each weight plus independent U(−Δ/2, Δ/2) noise, 100 draws.
    rng = np.random.default_rng(0)
    for name in h.weights:
        w = h.simulator.sim.weights[name]
        for b in (min(bits), 5):
            step = float(h.simulator.weight_grid(name, b).step)
            kl = np.array(
                [
                    damage(
                        h.reference,
                        h.simulator.run(Config.floating(), {name: w + rng.uniform(-step / 2, step / 2, w.shape)}),
                    ).kl
                    for _ in range(100)
                ]
            )
            p10, p50, p90 = np.percentile(kl, [10, 50, 90])
            rounding = h.measure(Config({name: b}, {})).kl
            print(
                f"  {name} ({w.size} values) at {b} bits: KL of 100 uniform-noise draws p10 {p10:.2e}, median {p50:.2e}, "
                f"p90 {p90:.2e} (p90/p10 {p90 / p10:.1f}); rounding {rounding:.2e} = {rounding / p50:.2f}x the median"
            )


if __name__ == "__main__":
    main()
