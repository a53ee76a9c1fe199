"""Which predictor ranks real quantization damage where models still work (issue 17's study).

For each real trained model (authors' weights) and its realistic data (``scripts/data/build_data.py
--scale 4 --out DIR``): one measurement (``validate`` with the budget sampler, weights only, three
format families: per-tensor min/max INT, per-channel symmetric INT, FP8 with FP16) and several Fisher
estimates beside it (empirical / mc / exact, and fewer calibration samples), each re-predicting the
same configurations. Prints ρ(predictor, KL) per family over the working configurations, the
measurement's split-half ceiling, and the time of each stage; ``--json`` writes everything.
``--hessian`` adds HAWQ's Hutchinson baseline (``Baseline.HESSIAN``) with its cost, and
``--hessian-eps`` the same probes at other finite-difference steps (how much the step matters).

    python bench/validate_study.py --data /tmp/fitdata [--models ppocr_cls_mbv3 ...] [--configs 30] [--json out.json]
        [--hessian --hessian-probes 128 --hessian-samples 16 --hessian-eps 3e-3 3e-2]
    python bench/validate_study.py --data /tmp/fitdata --models M --reuse out.json [--transfer]

``--reuse`` re-predicts the configurations an earlier ``--json`` measured (this checkout's
predictors, calibration passes only); ``--transfer`` adds ρ(KL measured on the calibration data,
held-out KL): what a predictor that reads only the calibration data can at best reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from fitonnx.analysis import hessian
from fitonnx.analysis.damage import Measure, damage, reference
from fitonnx.analysis.harness import Baseline, BaselineOptions, Extras, SimulationOptions, harness
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.simulate import Config, Simulator
from fitonnx.analysis.validate import SamplingOptions, validate_harness
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset, load_npz
from fitonnx.score.ranks import spearman

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
FORMATS = ("uint4", "uint5", "uint6", "uint8", "int4/ch", "int5/ch", "int6/ch", "int8/ch", "fp8e4m3")
# model: (default Fisher, the other estimates to set beside it: (label, fisher, max samples[, repeats]));
# repeats > 1 feeds every calibration sample that many times (an MC Fisher then draws that many labels).
MODELS = {
    "ppocr_cls_mbv3": (
        "empirical",
        [
            ("mc", "mc", None),
            ("exact", "exact", None),
            ("empirical N=8", "empirical", 8),
            ("empirical N=16", "empirical", 16),
        ],
    ),
    "ppocrv4_rec_svtr": ("mc", [("mc N=8", "mc", 8), ("mc x4", "mc", None, 4)]),
    "silero_vad_16k_op15": ("mc", [("mc N=16", "mc", 16), ("mc N=48", "mc", 48), ("mc x4", "mc", None, 4)]),
    # a Bernoulli per pixel (128 x 128): no labels for an empirical Fisher, too many outcomes for an exact one
    "ppocrv4_det_dbnet": ("mc", [("mc N=8", "mc", 8), ("mc x4", "mc", None, 4)]),
}
SHOWN = (
    Predictor.FIT,
    Predictor.FIT_MEASURED,
    Predictor.QUADRATIC,
    Predictor.OUTPUT_SPACE,
    Predictor.JOINT,
    Predictor.JOINT_KL,
    Predictor.JOINT_UNIFORM,
    Predictor.SUPERPOSED,
    Predictor.WEIGHT_ERROR,
    Predictor.NOISE_ONLY,
    Predictor.HESSIAN,  # with --hessian
)
LABELS = "joint_labels"  # ``joint`` from the Fisher's own labels (the error pass), beside the enumerated one


def one_at_a_time(h, report) -> tuple[dict[str, dict[str, float]], int, float]:
    """The AIMET/Quark/ModelOpt-KL baseline: each weight alone at each of its family's choices
    (the rest float), measured; a configuration's score is the sum. ρ per family (working), the
    number of simulations and their time."""
    t0 = time.perf_counter()
    single: dict[tuple[str, object], float] = {}
    out: dict[str, dict[str, float]] = {}
    for fam in h.families:
        for w in h.weights:
            for c in fam.weights:
                if (w, c) not in single:
                    single[(w, c)] = h.measure(Config({w: c}, {})).kl
        rows = [r for r in report.configs if r.family == fam.name and r.working]
        if len(rows) >= 5:
            score = [sum(single[(w, c)] for w, c in r.weight_bits.items()) for r in rows]
            out[fam.name] = {"one_at_a_time": spearman(np.array(score), np.array([r.kl for r in rows]))}
    return out, len(single), time.perf_counter() - t0


def rho_table(h, report, working: bool) -> dict[str, dict[str, float]]:
    """ρ(predictor of ``h``, KL) per family over the report's (working) configurations."""
    out: dict[str, dict[str, float]] = {}
    for fam in report.families:
        rows = [r for r in report.configs if r.family == fam.name and (r.working or not working)]
        if len(rows) < 5:
            continue
        kl = np.array([r.kl for r in rows])
        configs = [Config(r.weight_bits, r.activation_bits) for r in rows]
        preds = [h.predict(c) for c in configs]
        out[fam.name] = {p.value: spearman(np.array([q[p] for q in preds]), kl) for p in SHOWN if p in preds[0]}
        if h.label_projections is not None:
            own = [h.label_projections.quadratic(*h.tables.cells(c)) for c in configs]
            out[fam.name][LABELS] = spearman(np.array(own), kl)
        out[fam.name]["n"] = len(rows)
    return out


def repeated(d: Dataset, k: int) -> Dataset:
    """Every sample ``k`` times (MC labels are drawn per fed sample)."""
    arrays = {name: np.concatenate([a] * k) for name, a in d.arrays.items()}
    labels = None if d.labels is None else np.concatenate([d.labels] * k)
    return Dataset(arrays, labels, f"{d.source} x{k}")


def hessian_steps(h, report, hopts: hessian.HessianOptions, scales: list[float], seed: int) -> dict:
    """The Hessian baseline again at other steps ``scales`` × RMS (same probes and samples): each
    tensor's trace against the default step's (in its standard errors) and ρ per family (working)."""
    base = h.hessian
    out = {}
    for scale in scales:
        opts = FisherOptions(fisher=h.fisher.value, output=h.target.output, seed=seed)
        hs = hessian.hessian_traces(h.session, h.target, opts, dataclasses.replace(hopts, eps_scale=scale))
        table = hessian.table(hs, h.tables.names, h.tables.values[Predictor.WEIGHT_ERROR])
        alt = dataclasses.replace(h.tables, values={**h.tables.values, Predictor.HESSIAN: table})
        se = np.hypot(base.trace_se(), hs.trace_se())
        rho = {}
        for fam in report.families:
            rows = [r for r in report.configs if r.family == fam.name and r.working]
            if len(rows) >= 5:
                pred = [alt.total(Predictor.HESSIAN, Config(r.weight_bits, r.activation_bits)) for r in rows]
                rho[fam.name] = spearman(np.array(pred), np.array([r.kl for r in rows]))
        out[str(scale)] = {
            "working_rho": rho,
            "median_abs_diff_in_se": float(np.median(np.abs(hs.trace() - base.trace()) / se)),
            "rank_agreement_of_traces": spearman(hs.trace(), base.trace()),
            "seconds": hs.seconds,
            "passes": hs.passes,
        }
        print(f"{h.session.loaded.name:<20} hessian step {scale:g}: {out[str(scale)]}", flush=True)
    return out


def study(
    name: str,
    data: Path,
    configs: int,
    seed: int,
    only: set[str] | None = None,
    peers: bool = False,
    hopts: hessian.HessianOptions | None = None,
    steps: list[float] | None = None,
) -> dict:
    default, others = MODELS[name]
    calib, held = data / f"{name}.calib.npz", data / f"{name}.heldout.npz"
    sim = SimulationOptions(formats=FORMATS, weights_only=True)
    t0 = time.perf_counter()
    h0 = study_harness(
        name,
        data,
        seed,
        BaselineOptions(
            (Baseline.HESSIAN,) if hopts else (),
            hessian=hopts or hessian.HessianOptions(),
            extras=Extras(enumerate_outcomes=True, superpose=True),
        ),
    )
    t_harness = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = validate_harness(h0, SamplingOptions(configs=configs, resamples=0), seed)
    t_sim = time.perf_counter() - t0
    result = {
        "model": name,
        "calibration_samples": h0.samples,
        "held_out": h0.held_out.num_samples,
        "float_accuracy": report.float_accuracy,
        "time_calibration_s": t_harness,
        "time_simulation_s": t_sim,
        "configs": len(report.configs),
        "families": {
            f.name: {
                "band": [str(c) for c in f.band] if f.band else None,
                "configs": f.configs,
                "rejected": f.rejected,
                "ceiling": next((r.ceiling for r in f.working_reliability if r.measure == Measure.KL), None),
            }
            for f in report.families
        },
        "kl_range": [min(r.kl for r in report.configs), max(r.kl for r in report.configs)],
        "rows": [  # every configuration, to re-predict without simulating again
            {
                "family": r.family,
                "working": r.working,
                "kl": r.kl,
                "weights": {k: str(v) for k, v in r.weight_bits.items()},
                "predicted": {p.value: v for p, v in r.predicted.items()},
            }
            for r in report.configs
        ],
        "estimates": {
            default: {"working": rho_table(h0, report, True), "all": rho_table(h0, report, False), "time_s": t_harness}
        },
    }
    result["costs"] = {p.value: dataclasses.asdict(h0.cost(p)) for p in h0.tables.values}
    print_estimate(name, default, result["estimates"][default], result)
    print(
        f"{name:<20} costs (passes, s): "
        + ", ".join(f"{p} {c['passes']} {c['seconds']:.0f}" for p, c in result["costs"].items())
    )
    if h0.hessian is not None:
        hs = h0.hessian
        rel = hs.trace_se() / np.maximum(np.abs(hs.trace()), 1e-300)
        result["hessian"] = {
            "labels": hs.labels, "samples": hs.samples, "probes": int(hs.estimates.shape[0]), "eps_scale": hs.eps_scale,
            "median_relative_se": float(np.median(rel)), "negative_traces": int(np.sum(hs.trace() < 0)),
            "tensors": len(hs.names), "rank_vs_fisher_trace": _rank_vs_fisher(h0), "per_tensor": hopts.per_tensor,
        }  # fmt: skip
        print(f"{name:<20} hessian: {result['hessian']}", flush=True)
        if steps:
            result["hessian"]["steps"] = hessian_steps(h0, report, hopts, steps, seed)
    if peers:
        rho, runs, seconds = one_at_a_time(h0, report)
        result["one_at_a_time"] = {"working": rho, "simulations": runs, "time_s": seconds}
        print(f"{name:<20} one-at-a-time KL: {rho} from {runs} simulations, {seconds:.0f} s", flush=True)
    for label, fisher, n, *rest in others:
        if only and label not in only:
            continue
        t0 = time.perf_counter()
        repeats = rest[0] if rest else 1
        data = calib if repeats == 1 else repeated(load_npz(calib), repeats)
        h = harness(
            ZOO / f"{name}.onnx", data, held, simulation=sim,
            options=FisherOptions(fisher=fisher, max_samples=n, seed=seed), session=h0.session if repeats == 1 else None,
        )  # fmt: skip
        est = {
            "working": rho_table(h, report, True),
            "all": rho_table(h, report, False),
            "time_s": time.perf_counter() - t0,
        }
        result["estimates"][label] = est
        print_estimate(name, label, est, result)
    return result


def _rank_vs_fisher(h) -> float:
    """Spearman of the Hessian traces against the Fisher traces of the same weights."""
    fisher = dict(zip((t.name for t in h.traces.tensors), h.traces.trace(), strict=True))
    hs = h.hessian
    return spearman(hs.trace(), np.array([fisher[n] for n in hs.names]))


def print_estimate(name: str, label: str, est: dict, result: dict) -> None:
    for fam, row in est["working"].items():
        f = result["families"][fam]
        cells = "  ".join(f"{p.value} {row[p.value]:+.3f}" for p in SHOWN if p.value in row)
        cells += f"  {LABELS} {row[LABELS]:+.3f}" if LABELS in row else ""
        cells += f"  transfer {row['transfer']:+.3f}" if "transfer" in row else ""
        ceiling = f["ceiling"]
        print(
            f"{name:<20} {label:<16} {fam:<7} working {row['n']:>3}/{f['configs']:<3} {cells}  "
            f"ceiling {ceiling if ceiling is None else round(ceiling, 3)}  ({est['time_s']:.0f} s)",
            flush=True,
        )


def study_harness(name: str, data: Path, seed: int, baselines: BaselineOptions):
    """The study's harness of model ``name``: its data in ``data``, the study's formats, weights
    only, the model's default Fisher."""
    return harness(
        ZOO / f"{name}.onnx",
        data / f"{name}.calib.npz",
        data / f"{name}.heldout.npz",
        simulation=SimulationOptions(formats=FORMATS, weights_only=True),
        options=FisherOptions(fisher=MODELS[name][0], seed=seed),
        baselines=baselines,
    )


def calibration_simulator(h) -> tuple[Simulator, object]:
    """``h``'s simulator on its calibration samples instead of the held-out ones, and its float reference."""
    args = h.simulator._args  # (sim, model, tensors, act_ranges, scheme, data, specs, batch_size)
    sim = Simulator(*args[:5], h.session.data, *args[6:])
    return sim, reference(h.target, sim.run(Config.floating()), None, "calibration")


def on_calibration(h, configs: list[Config]) -> list[float]:
    """Each configuration's KL measured on the calibration samples instead of the held-out ones:
    what any predictor that reads only the calibration data can at best know (its ρ with the
    held-out KL is the calibration-to-held-out transfer, beside the held-out split-half ceiling)."""
    sim, ref = calibration_simulator(h)
    return [damage(ref, sim.run(c)).kl for c in configs]


def reuse(name: str, data: Path, previous: Path, seed: int, transfer: bool = False, superpose: bool = True) -> dict:
    """Re-predict the configurations measured by an earlier run (its ``--json``) with this
    checkout's predictors: the calibration passes only, no simulation."""
    default = MODELS[name][0]
    t0 = time.perf_counter()
    h = study_harness(name, data, seed, BaselineOptions(extras=Extras(enumerate_outcomes=True, superpose=superpose)))
    seconds = time.perf_counter() - t0
    while not previous.exists():  # the earlier run may still be simulating: its predictions can wait
        time.sleep(30)
    old = next(r for r in json.loads(previous.read_text()) if r["model"] == name)
    working: dict[str, dict[str, float]] = {}
    for fam in old["families"]:
        rows = [r for r in old["rows"] if r["family"] == fam and r["working"]]
        if len(rows) < 5:
            continue
        kl = np.array([r["kl"] for r in rows])
        configs = [Config(r["weights"], {}) for r in rows]
        preds = [h.predict(c) for c in configs]
        working[fam] = {p.value: spearman(np.array([q[p] for q in preds]), kl) for p in SHOWN if p in preds[0]} | {
            "n": len(rows)
        }
        if transfer:
            working[fam]["transfer"] = spearman(np.array(on_calibration(h, configs)), kl)
        if h.label_projections is not None:
            own = [h.label_projections.quadratic(*h.tables.cells(c)) for c in configs]
            working[fam][LABELS] = spearman(np.array(own), kl)
    est = {"working": working, "time_s": seconds}
    print_estimate(name, default + " (reused)", est, old)
    return old | {"estimates": {**old["estimates"], default + " (reused)": est}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--configs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", help="run only these estimates beside the default")
    parser.add_argument("--one-at-a-time", action="store_true", help="also the one-tensor-at-a-time KL baseline")
    parser.add_argument("--hessian", action="store_true", help="also HAWQ's Hutchinson Hessian-trace baseline")
    parser.add_argument("--hessian-probes", type=int, default=hessian.DEFAULT_PROBES)
    parser.add_argument("--hessian-samples", type=int, help="calibration samples of the Hessian's loss (default all)")
    parser.add_argument("--hessian-eps", type=float, nargs="*", default=[], help="other steps (× RMS) to check")
    parser.add_argument("--hessian-per-tensor", action="store_true", help="probes one tensor at a time")
    parser.add_argument("--reuse", type=Path, help="re-predict the configurations of an earlier --json (no simulation)")
    parser.add_argument(
        "--transfer", action="store_true", help="with --reuse: the configurations' KL on the calibration data"
    )
    parser.add_argument(
        "--no-superpose", action="store_true", help="with --reuse: skip the superposition's simulation runs"
    )
    args = parser.parse_args()
    hopts = (
        hessian.HessianOptions(
            args.hessian_probes, max_samples=args.hessian_samples, per_tensor=args.hessian_per_tensor
        )
        if args.hessian
        else None
    )
    results = []
    if args.reuse:
        results = [
            reuse(name, args.data, args.reuse, args.seed, args.transfer, not args.no_superpose) for name in args.models
        ]
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=float))
        return
    for name in args.models:
        results.append(
            study(
                name,
                args.data,
                args.configs,
                args.seed,
                set(args.only or ()),
                args.one_at_a_time,
                hopts,
                args.hessian_eps,
            )
        )
        print(
            f"{name}: {results[-1]['configs']} configurations, KL {results[-1]['kl_range'][0]:.3g}..{results[-1]['kl_range'][1]:.3g}; "
            f"calibration {results[-1]['time_calibration_s']:.0f} s, simulation {results[-1]['time_simulation_s']:.0f} s",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
