"""HAWQ's weight sensitivity: each weight tensor's Hessian trace by Hutchinson's estimator.

HAWQ-v2 (Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks",
NeurIPS 2020, §3) ranks a weight tensor t by Ω_t = (Tr(H_t)/n_t)·‖Q(w_t) − w_t‖², its average
Hessian trace times the squared quantization perturbation (HAWQ-v3 keeps the form); here with the
measured ‖Q(w_t) − w_t‖² of every candidate. HAWQ is weight-only: activations contribute nothing.

H is the Hessian of the mean calibration loss L(w) = (1/N)·Σ_i ℓ_i(w): cross-entropy against the
data's labels (HAWQ's training loss) or, without labels, against the float model's own decisions
(argmax; p > ½; a real-valued output is its own target). Hutchinson: Tr(H_tt) = E[v_tᵀH_tt v_t] for
Rademacher v_t. One probe v spans all weights at once (independent blocks v_t) and each tensor reads
its block of one product: E[v_tᵀ(Hδ)_t]/ε_t = Tr(H_tt) + Σ_{s≠t} (ε_s/ε_t)·E[v_tᵀH_ts v_s] = Tr(H_tt),
since the blocks are independent and zero-mean. So 2m gradients give every tensor's trace (probes
restricted to one tensor would take 2mT), at the price of the variance the off-diagonal blocks add,
Σ_{s≠t} (ε_s/ε_t)²‖H_ts‖_F² per probe; the standard error over probes shows it (``per_tensor``
probes one tensor at a time instead: no cross terms, T times the passes).

Products come by central differences through the gradient graph fitonnx builds (``fisher``), its
weights fed as overridable initializers: Hδ ≈ (g(w + δ) − g(w − δ))/2 with δ_t = ε_t·v_t and
ε_t = ``eps_scale``·‖w_t‖/√n_t, a share of the tensor's RMS value. The default share, 1e-2, is about
the rounding noise of 6-bit weights: the step measures the curvature at the scale quantization moves
the weights. It cannot be taken to 0 on real networks: their gradient jumps where a ReLU or a max
changes side, so the difference quotient has no limit (on the PaddleOCR classifier, one probe of
its first convolution gives −90, 116, −205, 406 and 2661 at 3e-2, 1e-2, 3e-3, 1e-3 and 1e-4 × RMS),
while HAWQ's double backpropagation takes the Hessian inside the current linear region; on a smooth
model (tests/test_hessian.py) 1e-2 agrees with the exact Hessian to 1.5e-4.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fitonnx.errors import FitonnxError, InternalError, ModelError
from fitonnx.fisher import instrument, losses
from fitonnx.fisher import session as api
from fitonnx.fisher.losses import LABELS, Likelihood, OutputTarget
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind
from fitonnx.model.runtime import make_session

DEFAULT_PROBES = 32
EPS_SCALE = 1e-2  # ε_t as a share of the weight's RMS value (module docstring; bench/validate_study.py checks it)


@dataclass(frozen=True)
class HessianOptions:
    """Hutchinson probes, the finite-difference step and the calibration samples of the loss."""

    probes: int = DEFAULT_PROBES
    eps_scale: float = EPS_SCALE
    max_samples: int | None = None  # None: every calibration sample
    per_tensor: bool = False  # probes restricted to one tensor at a time (T times the passes)

    def __post_init__(self) -> None:
        if self.probes < 1:
            raise FitonnxError(f"expected at least 1 Hutchinson probe; found {self.probes}")
        if not self.eps_scale > 0:
            raise FitonnxError(f"expected a positive finite-difference step; found {self.eps_scale}")


@dataclass(frozen=True)
class HessianTraces:
    """Per weight tensor (``names`` order) Hutchinson's estimates of Tr(H_t), one row per probe."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    estimates: np.ndarray  # [probes, tensors] float64
    eps: tuple[float, ...]  # the finite-difference step of each tensor
    samples: int
    passes: int  # forward+backward passes of the gradient graph (2·probes·samples, ×T per tensor)
    seconds: float
    labels: str  # what the loss was taken against
    eps_scale: float = EPS_SCALE

    def trace(self) -> np.ndarray:
        return self.estimates.mean(axis=0)

    def trace_se(self) -> np.ndarray:
        m = self.estimates.shape[0]
        return self.estimates.std(axis=0, ddof=1) / np.sqrt(m) if m > 1 else np.full(len(self.names), np.nan)

    def average(self) -> dict[str, float]:
        """Tr(H_t)/n_t per tensor: HAWQ-v2's average Hessian trace."""
        return {n: float(t) / k for n, t, k in zip(self.names, self.trace(), self.numels, strict=True)}


def decisions(target: OutputTarget, z: np.ndarray) -> np.ndarray:
    """The float model's decisions on one sample's loss tap ``z``, as labels of the empirical head:
    class indices (categorical), 0/1 (Bernoulli), the values themselves (real-valued)."""
    if target.likelihood is Likelihood.CATEGORICAL:
        if target.class_axis is None:
            raise InternalError("categorical target without class axis")
        return np.moveaxis(z, target.class_axis, -1).argmax(axis=-1).astype(np.int64)
    if target.likelihood is Likelihood.BERNOULLI:
        return (z > (0.5 if target.probabilities else 0.0)).astype(np.float32)
    return np.asarray(z, np.float32)


def labelled(s: api.Session, target: OutputTarget, threads: int = 0) -> tuple[Dataset, str]:
    """The calibration data with labels: its own, or the float model's decisions (and which)."""
    if s.data.labels is not None:
        return s.data, "the data's labels"
    probe, _names = instrument.build_probe(s.prepared.model, [], [target.tap])
    session = make_session(probe, threads)
    rows = []
    for i in range(s.data.num_samples):
        feed = {k: v for k, v in s.data.sample(i, s.specs).items() if k in s.specs}
        rows.append(decisions(target, np.asarray(session.run([target.tap], feed)[0])))
    labels = np.stack(rows) if s.data.whole_samples(s.specs) else np.concatenate(rows, axis=0)
    return dataclasses.replace(s.data, labels=labels), "the float model's decisions"


def overridable(model_bytes: bytes, names: Sequence[str]) -> tuple[bytes, dict[str, np.ndarray]]:
    """The model with initializers ``names`` declared as graph inputs too (onnxruntime then lets a
    run feed other values for them), and their values."""
    model = onnx.load_from_string(model_bytes)
    inits = {t.name: t for t in model.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise InternalError(f"weights must be initializers of the gradient model; not found: {missing[:3]}")
    declared = {i.name for i in model.graph.input}
    for name in names:
        if name not in declared:
            model.graph.input.append(helper.make_tensor_value_info(name, inits[name].data_type, inits[name].dims))
    values = {n: numpy_helper.to_array(inits[n]) for n in names}
    return model.SerializeToString(), values


def gradient_session(
    s: api.Session, target: OutputTarget, opts: FisherOptions
) -> tuple[instrument.GradientModel, Any, dict[str, np.ndarray], Dataset, str]:
    """The weight-only gradient model of the labelled loss (``labelled``) on ``target``'s output,
    its session with weights overridable, the weights, the data and what the labels are."""
    data, labels = labelled(s, target)
    weights_only = dataclasses.replace(s, data=data, tensors=tuple(t for t in s.tensors if t.kind is Kind.WEIGHT))
    mode_opts = opts.replace(
        fisher=losses.FisherMode.EMPIRICAL,
        output=target.output,
        likelihood=target.likelihood,
        class_axis=target.class_axis,
    )
    gm, got, _ = api.gradient_model(weights_only, mode_opts, keep_gradients=True)
    if got.tap != target.tap:
        raise InternalError(f"the Hessian's loss reads {got.tap!r}, the Fisher's {target.tap!r}")
    names = [t.name for t in gm.tensors]
    model_bytes, weights = overridable(gm.model_bytes, names)
    return gm, make_session(model_bytes, opts.run_options().threads), weights, data, labels


def _mean_gradient(
    session: Any, grads: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]], point: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """(1/N)·Σ_i ∂ℓ_i/∂w at weights ``point``, float64, one array per weight."""
    total = [np.zeros(point[n].shape, np.float64) for n in point]
    for i, feed in enumerate(feeds):
        try:
            values = session.run(list(grads), {**feed, **point})
        except Exception as exc:
            raise ModelError(f"onnxruntime failed on sample {i}: {str(exc).splitlines()[0][:300]}") from None
        for acc, v in zip(total, values, strict=True):
            acc += np.asarray(v, np.float64).reshape(acc.shape)
    return [acc / len(feeds) for acc in total]


def _difference(
    session: Any,
    grads: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    w: Mapping[str, np.ndarray],
    steps: Sequence[np.ndarray | None],
) -> list[np.ndarray]:
    """g(w + δ) − g(w − δ) per weight, δ = ``steps`` (None: that weight unperturbed)."""
    plus = {n: (a if d is None else a + d).astype(np.float32) for (n, a), d in zip(w.items(), steps, strict=True)}
    minus = {n: (a if d is None else a - d).astype(np.float32) for (n, a), d in zip(w.items(), steps, strict=True)}
    g_plus = _mean_gradient(session, grads, feeds, plus)
    return [gp - gm for gp, gm in zip(g_plus, _mean_gradient(session, grads, feeds, minus), strict=True)]  # fmt: skip


def hutchinson(
    session: Any,
    grads: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    weights: Mapping[str, np.ndarray],
    options: HessianOptions,
    seed: int,
) -> tuple[np.ndarray, tuple[float, ...]]:
    """[probes, tensors] estimates v_tᵀ(g(w + δ) − g(w − δ))_t/(2ε_t), δ_t = ε_t·v_t (module docstring),
    and each tensor's ε_t; ``grads`` are the gradient outputs of ``weights`` in their order. With
    ``options.per_tensor`` each probe perturbs one tensor at a time (T times the passes, no cross terms)."""
    rng = np.random.default_rng(seed)
    w = {n: np.asarray(v, np.float64) for n, v in weights.items()}
    eps = tuple(options.eps_scale * (float(np.sqrt(np.mean(v * v))) or 1.0) for v in w.values())
    out = np.zeros((options.probes, len(w)))
    for k in range(options.probes):
        v = [rng.integers(0, 2, size=a.shape).astype(np.float64) * 2 - 1 for a in w.values()]
        steps = [e * p for e, p in zip(eps, v, strict=True)]
        if options.per_tensor:
            for j in range(len(w)):
                diff = _difference(session, grads, feeds, w, [d if i == j else None for i, d in enumerate(steps)])
                out[k, j] = float(np.sum(v[j] * diff[j])) / (2.0 * eps[j])
            continue
        diff = _difference(session, grads, feeds, w, steps)
        out[k] = [float(np.sum(p * d)) / (2.0 * e) for p, d, e in zip(v, diff, eps, strict=True)]
    return out, eps


def hessian_traces(
    s: api.Session, target: OutputTarget, opts: FisherOptions, options: HessianOptions | None = None
) -> HessianTraces:
    """Every weight's Hessian trace of the mean calibration loss on ``target`` (module docstring)."""
    hopts = options or HessianOptions()
    started = time.perf_counter()
    gm, session, weights, data, labels = gradient_session(s, target, opts)
    n = data.num_samples if hopts.max_samples is None else min(hopts.max_samples, data.num_samples)
    feeds = []
    for i in range(n):
        feed = {k: v for k, v in data.sample(i, s.specs).items() if k in s.specs}
        feeds.append({**feed, LABELS: data.sample_labels(i, s.specs)})
    estimates, eps = hutchinson(session, gm.grad_outputs, feeds, weights, hopts, opts.seed)
    return HessianTraces(
        names=tuple(weights),
        numels=tuple(int(v.size) for v in weights.values()),
        estimates=estimates,
        eps=eps,
        samples=n,
        passes=2 * hopts.probes * n * (len(weights) if hopts.per_tensor else 1),
        seconds=time.perf_counter() - started,
        labels=labels,
        eps_scale=hopts.eps_scale,
    )


def table(traces: HessianTraces, names: Sequence[str], weight_error: np.ndarray) -> np.ndarray:
    """HAWQ-v2's Ω [tensor, choice]: Tr(H_t)/n_t·‖Q(w_t) − w_t‖² from the measured rounding error
    table ``weight_error`` (rows ``names``); 0 for tensors without a trace (activations: HAWQ is
    weight-only), NaN where the choice is not a candidate."""
    average = traces.average()
    scale = np.array([average.get(name, 0.0) for name in names])
    return np.where(np.isnan(weight_error), np.nan, scale[:, None] * np.nan_to_num(weight_error))
