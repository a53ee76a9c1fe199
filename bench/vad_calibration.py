"""Silero VAD: how FIT's ranking depends on the calibration and held-out data (issue 17).

``measure``: the configurations of an earlier ``bench/validate_study.py --json`` (or any rows file,
``VAD_CONFIGS``) measured again on a bigger held-out set, per sample (``.npz``: kl, agree, p).
``predict``: every predictor of those configurations from one calibration set (Fisher, repeats,
``--joint``, ``--superpose``), ρ against the rows' own KL and each ``--truth``, and with
``--transfer`` the configurations' KL measured on the calibration data itself.

    python bench/vad_calibration.py measure --held DIR/silero_vad_16k_op15.heldout.npz --out truth.npz
    python bench/vad_calibration.py predict --calib calib.npz --truth truth.npz --transfer --joint --out p.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate_study import FORMATS, calibration_simulator, repeated

from fitonnx.analysis.damage import damage
from fitonnx.analysis.harness import BaselineOptions, Extras, SimulationOptions, harness
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.simulate import Config
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import load_npz
from fitonnx.score.ranks import spearman

MODEL = Path(__file__).resolve().parent.parent / "models" / "zoo" / "silero_vad_16k_op15.onnx"
CONFIGS = Path(os.environ.get("VAD_CONFIGS", "/tmp/joint/silero_vad_16k_op15.json"))
FAMS = ("uint", "int/ch")
SHOW = (
    "fit",
    "fit_measured",
    "quadratic",
    "output_space",
    "joint",
    "joint_kl",
    "joint_uniform",
    "superposed",
    "weight_error",
    "noise_only",
)


def rows() -> list[dict]:
    old = json.loads(CONFIGS.read_text())[0]
    return [r for r in old["rows"] if r["family"] in FAMS]


def configs(rs) -> list[Config]:
    return [Config(r["weights"], {}) for r in rs]


def per_sample(h, cs, on_calib: bool) -> tuple[np.ndarray, np.ndarray]:
    """[config, sample] KL and agreement on the held-out (or calibration) data."""
    if on_calib:
        sim, ref = calibration_simulator(h)
    else:
        sim, ref = h.simulator, h.reference
    ds = [damage(ref, sim.run(c)) for c in cs]
    return np.stack([d.sample_kl for d in ds]), np.stack(
        [d.sample_agree.reshape(len(d.sample_kl), -1).mean(1) for d in ds]
    )


def measure(args) -> None:
    sim = SimulationOptions(formats=FORMATS, weights_only=True)
    t0 = time.perf_counter()
    h = harness(MODEL, args.calib, args.held, simulation=sim, options=FisherOptions(fisher="mc", max_samples=8))
    rs = rows()
    kl, agree = per_sample(h, configs(rs), False)
    p = np.exp(h.reference.logp).reshape(kl.shape[1], -1)[:, 0]
    np.savez(args.out, kl=kl, agree=agree, p=p)
    print(f"measured {kl.shape} in {time.perf_counter() - t0:.0f} s", flush=True)


def rho_block(pred: dict[str, np.ndarray], truths: dict[str, tuple[np.ndarray, np.ndarray]], fam: np.ndarray) -> dict:
    out = {}
    for tname, (kl, working) in truths.items():
        for f in FAMS:
            m = (fam == f) & working
            if m.sum() < 5:
                continue
            out[f"{tname}/{f}"] = {k: spearman(v[m], kl[m]) for k, v in pred.items()} | {"n": int(m.sum())}
    return out


def predict(args) -> None:
    rs = rows()
    fam = np.array([r["family"] for r in rs])
    truths = {"old512": (np.array([r["kl"] for r in rs]), np.array([r["working"] for r in rs]))}
    if not truths["old512"][0].any():
        truths = {}
    for t in args.truth:
        z = np.load(t)
        truths[Path(t).stem] = (z["kl"].mean(1), z["agree"].mean(1) >= 0.95)
    sim = SimulationOptions(formats=FORMATS, weights_only=True)
    data = args.calib if args.repeats == 1 else repeated(load_npz(args.calib), args.repeats)
    t0 = time.perf_counter()
    h = harness(
        MODEL, data, args.held, simulation=sim,
        options=FisherOptions(fisher=args.fisher, seed=args.seed),
        baselines=BaselineOptions(extras=Extras(enumerate_outcomes=args.joint, superpose=args.superpose)),
    )  # fmt: skip
    t_cal = time.perf_counter() - t0
    cs = configs(rs)
    preds = [h.predict(c) for c in cs]
    pred = {k: np.array([q[Predictor(k)] for q in preds]) for k in SHOW if Predictor(k) in preds[0]}
    t0 = time.perf_counter()
    if args.transfer:
        ckl, _ = per_sample(h, cs, True)
        pred["transfer"] = ckl.mean(1)
        np.save(args.out.with_suffix(".calkl.npy"), ckl)
    t_tr = time.perf_counter() - t0
    res = {"calib": str(args.calib), "samples": h.samples, "fisher": args.fisher, "repeats": args.repeats,
           "t_calibration": t_cal, "t_transfer": t_tr, "rho": rho_block(pred, truths, fam),
           "pred": {k: v.tolist() for k, v in pred.items()}}  # fmt: skip
    args.out.write_text(json.dumps(res, indent=1, default=float))
    print(f"{args.out.stem}: {h.samples} samples, {args.fisher} x{args.repeats}, {t_cal:.0f}+{t_tr:.0f} s")
    for key, row in res["rho"].items():
        print(f"  {key:<14} n={row['n']:<3} " + "  ".join(f"{k} {v:+.3f}" for k, v in row.items() if k != "n"))
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--calib", type=Path, default=Path("/tmp/joint/data/silero_vad_16k_op15.calib.npz"))
    m.add_argument("--held", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("predict")
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--held", type=Path, default=Path("/tmp/joint/data/silero_vad_16k_op15.heldout.npz"))
    p.add_argument("--truth", nargs="*", default=[])
    p.add_argument("--fisher", default="mc")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--joint", action="store_true")
    p.add_argument("--superpose", action="store_true")
    p.add_argument("--transfer", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    measure(args) if args.cmd == "measure" else predict(args)


if __name__ == "__main__":
    main()
