"""Measured quantization damage: what a quantized model's outputs lose against the float model's.

Per held-out sample, so that a measure's own noise can be estimated: ``reliability`` splits the
held-out samples into two halves many times and asks how well the two halves rank the same
configurations. That split-half agreement is a ceiling on what any predictor can show against the
measurement; without it, a ρ of 0.93 cannot be told apart from a measurement that only
reproduces itself to 0.93.

Measures (``Measure``, described in ``MEASURES``): KL(float ‖ quantized) of the output distribution, what FIT models; the
change of loss when labels are present; the accuracy drop of classifiers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.errors import DataError, InternalError
from fitonnx.fisher.losses import BERNOULLI_EPS, CATEGORICAL_EPS, Likelihood, OutputTarget
from fitonnx.score.ranks import spearman
from fitonnx.values import TextEnum


class Measure(TextEnum):
    """A measured damage, by the name the reports use."""

    KL = "kl"
    DLOSS = "dloss"
    ACCURACY_DROP = "accuracy_drop"

    @property
    def description(self) -> str:
        return MEASURES[self]


MEASURES: dict[Measure, str] = {
    Measure.KL: "KL(float ‖ quantized) of the outputs, mean per held-out sample",
    Measure.DLOSS: "change of the mean held-out loss",
    Measure.ACCURACY_DROP: "float accuracy − quantized accuracy",
}
DEFAULT_SPLITS = 50
CONTINUOUS = (Measure.KL, Measure.DLOSS)
# KL ≈ ½δᵀFδ holds for KL well below 1 nat per sample: above it, outputs are beyond second order.
SECOND_ORDER_KL = 1.0
# A quantized model "still works" when it takes the float model's decision on this share of outputs.
DEFAULT_MIN_AGREEMENT = 0.95


@dataclass(frozen=True)
class Reference:
    """What the float model gives on the held-out data, in the form each measure needs."""

    target: OutputTarget
    out: np.ndarray  # float64, class axis last for categorical
    logp: np.ndarray | None  # categorical: log-softmax; bernoulli: log σ(z)
    log1mp: np.ndarray | None  # bernoulli: log(1 − σ(z))
    labels: np.ndarray | None
    sample_loss: np.ndarray | None  # per held-out sample
    sample_correct: np.ndarray | None  # per held-out sample: the fraction of its outputs right

    @property
    def loss(self) -> float | None:
        return None if self.sample_loss is None else float(self.sample_loss.mean())

    @property
    def accuracy(self) -> float | None:
        return None if self.sample_correct is None else float(self.sample_correct.mean())


@dataclass(frozen=True)
class Damage:
    """One quantized model's damage, per held-out sample; the measures are their means."""

    sample_kl: np.ndarray
    sample_dloss: np.ndarray | None
    sample_correct: np.ndarray | None
    sample_agree: np.ndarray | None = None  # share of the outputs whose decision is the float model's

    @property
    def agreement(self) -> float | None:
        return None if self.sample_agree is None else float(self.sample_agree.mean())

    @property
    def kl(self) -> float:
        return float(self.sample_kl.mean())

    @property
    def dloss(self) -> float | None:
        return None if self.sample_dloss is None else float(self.sample_dloss.mean())

    @property
    def accuracy(self) -> float | None:
        return None if self.sample_correct is None else float(self.sample_correct.mean())


def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))


def _as_float64(target: OutputTarget, z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    if target.likelihood is Likelihood.CATEGORICAL:
        if target.class_axis is None:
            raise InternalError("categorical target without class axis")
        return np.moveaxis(z, target.class_axis, -1)
    return z


def _per_sample(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).sum(axis=1)


def _per_sample_mean(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).mean(axis=1)


def _loss_and_correct(
    target: OutputTarget, z: np.ndarray, logp: np.ndarray | None, log1mp: np.ndarray | None, labels: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-sample loss and per-sample fraction of correct outputs (None where undefined)."""
    if labels is None:
        return None, None
    if target.likelihood is Likelihood.CATEGORICAL and logp is not None:
        picked = np.take_along_axis(logp, labels[..., None].astype(np.int64), axis=-1)[..., 0]
        return -_per_sample(picked), _per_sample_mean(z.argmax(axis=-1) == labels)
    if target.likelihood is Likelihood.BERNOULLI and logp is not None and log1mp is not None:
        y = labels.astype(np.float64)
        loss = -_per_sample(y * logp + (1 - y) * log1mp)
        binary = bool(np.all((y == 0) | (y == 1)))
        return loss, _per_sample_mean((logp > log1mp) == (y > 0.5)) if binary else None
    return _per_sample(0.5 * np.square(z - labels.astype(np.float64))), None


def _logs(target: OutputTarget, z: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Log-probabilities: log-softmax (categorical); log p and log(1 − p) (Bernoulli, from logits,
    or from probabilities when the output is one, ``target.probabilities``)."""
    if target.likelihood is Likelihood.CATEGORICAL:
        if target.probabilities:
            return _log_softmax(np.log(np.clip(z, CATEGORICAL_EPS, 1.0))), None  # as the loss head
        return _log_softmax(z), None
    if target.likelihood is Likelihood.BERNOULLI:
        if target.probabilities:
            p = np.clip(z, BERNOULLI_EPS, 1.0 - BERNOULLI_EPS)  # as the loss head
            return np.log(p), np.log1p(-p)
        return -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
    return None, None


def _check_eval_labels(target: OutputTarget, z: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Held-out labels must match the output the loss reads (``z``: class axis last if categorical)."""
    if target.likelihood is Likelihood.CATEGORICAL:
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"expected integer class labels in {source}; found {labels.dtype}")
        if labels.shape != z.shape[:-1]:
            raise DataError(f"expected labels of shape {list(z.shape[:-1])} in {source}; found {list(labels.shape)}")
        if labels.min() < 0 or labels.max() >= z.shape[-1]:
            raise DataError(
                f"expected class labels in [0, {z.shape[-1] - 1}] in {source}; "
                f"found values in [{labels.min()}, {labels.max()}]"
            )
    elif labels.shape != z.shape:
        raise DataError(
            f"expected labels shaped like the output, {list(z.shape)}, in {source}; found {list(labels.shape)}"
        )


def reference(target: OutputTarget, z_float: np.ndarray, labels: np.ndarray | None, source: str) -> Reference:
    """The float model's outputs on the held-out data (labels checked against them)."""
    z = _as_float64(target, z_float)
    if labels is not None:
        _check_eval_labels(target, z, labels, source)
    logp, log1mp = _logs(target, z)
    loss, correct = _loss_and_correct(target, z, logp, log1mp, labels)
    return Reference(target, z, logp, log1mp, labels, loss, correct)


def damage(ref: Reference, z_quant: np.ndarray) -> Damage:
    """KL, loss change and correctness of quantized outputs against the float reference, per sample."""
    z = _as_float64(ref.target, z_quant)
    logp, log1mp = _logs(ref.target, z)
    if ref.target.likelihood is Likelihood.CATEGORICAL and ref.logp is not None and logp is not None:
        kl = _per_sample(np.exp(ref.logp) * (ref.logp - logp))
    elif ref.target.likelihood is Likelihood.BERNOULLI and ref.logp is not None and ref.log1mp is not None:
        p = np.exp(ref.logp)
        kl = _per_sample(p * (ref.logp - logp) + (1 - p) * (ref.log1mp - log1mp))
    else:
        kl = _per_sample(0.5 * np.square(z - ref.out))
    loss, correct = _loss_and_correct(ref.target, z, logp, log1mp, ref.labels)
    dloss = None if loss is None or ref.sample_loss is None else loss - ref.sample_loss
    return Damage(kl, dloss, correct, _agreement(ref, z, logp, log1mp))


def _agreement(ref: Reference, z: np.ndarray, logp: np.ndarray | None, log1mp: np.ndarray | None) -> np.ndarray | None:
    """Per sample, the share of outputs deciding as the float model does (argmax; p > ½ for
    Bernoulli); None for real-valued outputs, which decide nothing."""
    if ref.target.likelihood is Likelihood.CATEGORICAL:
        return _per_sample_mean(z.argmax(axis=-1) == ref.out.argmax(axis=-1))
    if ref.target.likelihood is Likelihood.BERNOULLI and logp is not None and log1mp is not None:
        if ref.logp is None or ref.log1mp is None:
            return None
        return _per_sample_mean((logp > log1mp) == (ref.logp > ref.log1mp))
    return None


@dataclass(frozen=True)
class Threshold:
    """When a quantized model still works: it agrees with the float model's decisions on at least
    ``min_agreement`` of the outputs (outputs without decisions: KL ≤ ``SECOND_ORDER_KL``), and its
    KL is at most ``max_kl`` when one is given."""

    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_kl: float | None = None

    def works(self, d: Damage) -> bool:
        if self.max_kl is not None and not d.kl <= self.max_kl:
            return False
        if d.agreement is None:
            return self.max_kl is not None or d.kl <= SECOND_ORDER_KL
        return d.agreement >= self.min_agreement

    def describe(self) -> str:
        kl = "" if self.max_kl is None else f" and KL ≤ {self.max_kl:g}"
        return f"agrees with the float model's decisions on ≥ {100 * self.min_agreement:g}% of outputs{kl}"


def measure_table(
    kl: Sequence[float | np.ndarray],
    dloss: Sequence[float | np.ndarray | None],
    correct: Sequence[float | np.ndarray | None],
    float_correct: float | np.ndarray | None,
) -> dict[Measure, np.ndarray]:
    """Every measure defined for all configurations, rows in configuration order: KL always, Δloss
    where every configuration has one, the accuracy drop (float correct − quantized correct) where
    the float model and every configuration have an accuracy. Scalars per configuration give
    vectors; per-sample arrays give matrices [configuration, held-out sample]."""
    out = {Measure.KL: np.asarray(kl, np.float64)}
    if all(x is not None for x in dloss):
        out[Measure.DLOSS] = np.asarray(dloss, np.float64)
    if float_correct is not None and all(x is not None for x in correct):
        out[Measure.ACCURACY_DROP] = np.asarray(float_correct, np.float64) - np.asarray(correct, np.float64)
    return out


def per_sample_measures(ref: Reference, damages: Sequence[Damage]) -> dict[Measure, np.ndarray]:
    """Each measure defined for every configuration as a matrix [configuration, held-out sample]
    whose row means are the measure (accuracy drop: float correct − quantized correct)."""
    return measure_table(
        [d.sample_kl for d in damages],
        [d.sample_dloss for d in damages],
        [d.sample_correct for d in damages],
        ref.sample_correct,
    )


@dataclass(frozen=True)
class Reliability:
    """How well a measure reproduces itself: Spearman ρ between the configuration rankings of two
    random halves of the held-out samples (mean over ``splits`` splits), and that agreement
    carried to the whole set by the Spearman–Brown formula 2ρ/(1 + ρ)."""

    measure: Measure
    split_half: float
    full: float
    splits: int

    @property
    def ceiling(self) -> float:
        """√full: the correlation a perfect predictor of the measure's expectation would show with
        the measurement itself (classical test theory; approximate for ranks)."""
        return float(np.sqrt(self.full)) if self.full > 0 else float("nan")


def reliability(
    per_sample: Mapping[Measure, np.ndarray], splits: int = DEFAULT_SPLITS, seed: int = 0
) -> tuple[Reliability, ...]:
    """Split-half reliability of each continuous measure (matrices [configuration, sample]).

    The accuracy drop is left out: it moves in steps of one sample, so most configurations tie on
    a half of the data, and rank agreement between halves of tied values says nothing about the
    whole set's noise.
    """
    out = []
    for name, m in per_sample.items():
        if name not in CONTINUOUS:
            continue
        n_configs, n = m.shape
        if n < 4 or n_configs < 3 or splits < 1:
            continue
        rng = np.random.default_rng(seed)
        rhos = []
        for _ in range(splits):
            order = rng.permutation(n)
            a, b = order[: n // 2], order[n // 2 :]
            rhos.append(spearman(m[:, a].mean(axis=1), m[:, b].mean(axis=1)))
        finite = [r for r in rhos if np.isfinite(r)]
        if not finite:
            continue
        rho = float(np.mean(finite))
        out.append(Reliability(name, rho, 2 * rho / (1 + rho) if rho > -1 else float("nan"), splits))
    return tuple(out)
