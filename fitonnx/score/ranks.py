"""Rank statistics: Spearman's ρ, Kendall's τ-b and bootstrap intervals over paired samples.

Written here because numpy has none and scipy is not a dependency. Every statistic is computed
from the matrices sign(x_i − x_j), so ties get mid-ranks (ρ) and the τ-b correction, and a
bootstrap resample is a gather of those matrices rather than a re-sort. Used by ``validate``
(predictors against measured damage), ``score`` (ranking stability) and ``compare`` (agreement
between exports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.errors import InternalError


@dataclass(frozen=True)
class Correlation:
    """Rank agreement of one predictor with one measure over the configurations."""

    predictor: str
    measure: str
    spearman: float
    spearman_ci: tuple[float, float]
    kendall: float
    kendall_ci: tuple[float, float]


def _signs(x: np.ndarray) -> np.ndarray:
    """sign(x_i − x_j) as an int8 matrix: every rank statistic below is computed from these."""
    return np.sign(x[:, None] - x[None, :]).astype(np.int8)


@dataclass(frozen=True)
class _SignStats:
    """Sign matrices [batch, n, n], centred mid-ranks [batch, n] and untied pair counts [batch]."""

    signs: np.ndarray
    ranks: np.ndarray
    untied: np.ndarray

    @staticmethod
    def of(signs: np.ndarray) -> _SignStats:
        # The mid-rank of x_i is (Σ_j sign(x_i − x_j) + n + 1)/2; centring removes the constant.
        ranks = signs.sum(axis=-1, dtype=np.int64).astype(np.float64)
        ranks -= ranks.mean(axis=-1, keepdims=True)
        return _SignStats(signs, ranks, np.count_nonzero(signs, axis=(-1, -2)))


def _rho_tau(x: _SignStats, y: _SignStats) -> tuple[np.ndarray, np.ndarray]:
    """Spearman ρ (Pearson's r of mid-ranks) and Kendall τ-b = Σ sx·sy / √(untied_x · untied_y)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (x.ranks * y.ranks).sum(axis=-1) / np.sqrt((x.ranks**2).sum(axis=-1) * (y.ranks**2).sum(axis=-1))
        tau = (x.signs * y.signs).sum(axis=(-1, -2), dtype=np.int64) / np.sqrt(x.untied.astype(np.float64) * y.untied)
    return rho, tau


def _pair(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(ρ, τ-b) of two paired samples; NaN for fewer than two pairs."""
    if len(x) != len(y):
        raise InternalError(f"expected paired samples of one length; found {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan, math.nan
    rho, tau = _rho_tau(
        _SignStats.of(_signs(np.asarray(x, np.float64))), _SignStats.of(_signs(np.asarray(y, np.float64)))
    )
    return float(rho), float(tau)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's ρ with mid-ranks for ties (NaN if either side is constant or has < 2 values)."""
    return _pair(x, y)[0]


def kendall(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall's τ-b (tie-corrected; NaN if either side is constant or has < 2 values)."""
    return _pair(x, y)[1]


def rank_correlations(
    predictors: Mapping[str, np.ndarray],
    measures: Mapping[str, np.ndarray],
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[Correlation, ...]:
    """ρ and τ-b of every predictor with every measure, with percentile bootstrap intervals.

    The bootstrap resamples configurations with replacement, the same resamples for every pair,
    so intervals of different predictors are comparable.
    """
    signs = {k: _signs(np.asarray(v, np.float64)) for k, v in {**predictors, **measures}.items()}
    n = len(next(iter(signs.values())))
    full = {k: _SignStats.of(v) for k, v in signs.items()}
    boot: dict[tuple[str, str], tuple[list[np.ndarray], list[np.ndarray]]] = {
        (p, m): ([], []) for m in measures for p in predictors
    }
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // max(n * n, 1))  # bounds the int8 gathers to a few MB
    for start in range(0, resamples if n >= 3 else 0, chunk):
        idx = rng.integers(0, n, (min(chunk, resamples - start), n))
        stats = {k: _SignStats.of(v[idx[:, :, None], idx[:, None, :]]) for k, v in signs.items()}
        for (p, m), (rhos, taus) in boot.items():
            rho, tau = _rho_tau(stats[p], stats[m])
            rhos.append(rho)
            taus.append(tau)
    q = ((1 - level) / 2, (1 + level) / 2)

    def interval(values: list[np.ndarray]) -> tuple[float, float]:
        v = np.concatenate(values) if values else np.zeros(0)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return (math.nan, math.nan)
        lo, hi = np.quantile(v, q)
        return float(lo), float(hi)

    out = []
    for (p, m), (rhos, taus) in boot.items():
        rho, tau = _rho_tau(full[p], full[m])
        out.append(Correlation(p, m, float(rho), interval(rhos), float(tau), interval(taus)))
    return tuple(out)
