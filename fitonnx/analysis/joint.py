"""Enumerated projections for the ``joint`` predictors: every outcome of the output fed as the label.

When the output holds one distribution per sample (a categorical output with a few classes, or a
Bernoulli output of one element), the error pass runs once per outcome c with the label c and the
empirical head, keeping per sample the projection s_c = ∂ℓ_c/∂t · e_t(b) of every tensor and choice
and the loss ℓ_c itself (p_c = exp(−ℓ_c)). Since ∂ℓ_c = −∂ log p_c, −Σ_t s_c is the linearised shift
of log p_c, centred (Σ_c p_c·s_c = 0): the output's whole first-order move under a configuration,
which gives the exact second-order KL ½·Σ_c p_c·(Σ_t s_c)² and the KL of the moved output itself
(``predictors.Projections``). A Bernoulli output is the two-class case (log p, log(1 − p)).
Costs one calibration pass per outcome.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from fitonnx.analysis import simulate
from fitonnx.analysis.choices import Choice
from fitonnx.analysis.error_model import simulated_error_model
from fitonnx.analysis.predictors import Projections, stack_projections
from fitonnx.fisher import engine, losses
from fitonnx.fisher import session as api
from fitonnx.fisher.instrument import GradientModel
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset

MAX_OUTCOMES = 16  # more classes than this: one pass each is too dear, the Fisher's own labels are used
LOSS64 = losses.PREFIX + "joint_loss64"

# Runs a gradient model over a data set, fetching the named extra outputs.
RunOn = Callable[[GradientModel, Dataset, Sequence[str]], engine.FisherTraces]


def outcome_labels(gm: GradientModel) -> tuple[losses.Likelihood, tuple[int, ...], int] | None:
    """(likelihood, one feed's label shape, outcomes) when the loss reads one output holding one
    distribution per feed with at most ``MAX_OUTCOMES`` outcomes; else None."""
    if len(gm.head.heads) != 1:
        return None
    head = gm.head.heads[0]
    shape = gm.sample_shapes.get(head.target.tap)
    if shape is None:
        return None
    likelihood = head.target.likelihood
    if likelihood is losses.Likelihood.BERNOULLI:
        return (likelihood, tuple(shape), 2) if int(np.prod(shape)) == 1 else None
    if likelihood is not losses.Likelihood.CATEGORICAL or len(shape) < 2:
        return None
    moved = shape if head.perm is None else tuple(shape[i] for i in head.perm)
    labels = (moved[0], *moved[2:])
    if int(np.prod(labels)) != 1 or moved[1] > MAX_OUTCOMES:
        return None
    return likelihood, labels, int(moved[1])


def labelled(s: api.Session, likelihood: losses.Likelihood, label_shape: tuple[int, ...], c: int) -> Dataset:
    """The session's data with every sample labelled outcome ``c`` (categorical: class c; Bernoulli:
    c = 0 is y = 1, c = 1 is y = 0, so that outcome 0 is log p and outcome 1 log(1 − p))."""
    d = s.data
    per = label_shape if d.whole_samples(s.specs) else label_shape[1:]
    if likelihood is losses.Likelihood.CATEGORICAL:
        labels = np.full((d.num_samples, *per), c, np.int64)
    else:
        labels = np.full((d.num_samples, *per), 1.0 - c, np.float32)
    return Dataset(dict(d.arrays), labels, f"{d.source} (label {c})")


def _with_loss(gm: GradientModel) -> GradientModel:
    """``gm`` also giving its per-sample loss as a float64 scalar (``LOSS64``)."""
    model = onnx.load_from_string(gm.model_bytes)
    g = model.graph
    g.node.extend(
        [
            helper.make_node("ReduceSum", [losses.LOSS], [LOSS64 + "_sum"], keepdims=0),
            helper.make_node("Cast", [LOSS64 + "_sum"], [LOSS64], to=TensorProto.DOUBLE),
        ]
    )
    g.output.append(helper.make_tensor_value_info(LOSS64, TensorProto.DOUBLE, []))
    return dataclasses.replace(gm, model_bytes=model.SerializeToString())


def enumerated_projections(
    s: api.Session,
    opts: FisherOptions,
    gm: GradientModel,
    simulator: simulate.Simulator,
    rows: tuple[Sequence[str], Sequence[Choice]],
    choices: tuple[Sequence[Choice], Sequence[Choice]],
    run_on: RunOn,
) -> Projections | None:
    """Per sample and outcome, every tensor's projection at every candidate choice (``rows``: the
    tables' tensor names and columns; ``choices``: weights', activations'), one pass per outcome of
    the output read by ``gm`` (the default Fisher's model, for its shapes); None when the output is
    not one small distribution per sample."""
    found = outcome_labels(gm)
    if found is None:
        return None
    likelihood, label_shape, outcomes = found
    per_key: dict[tuple[str, Choice], list[np.ndarray]] = {}
    loss = []
    empirical = opts.replace(fisher=losses.FisherMode.EMPIRICAL)
    for c in range(outcomes):
        sc = dataclasses.replace(s, data=labelled(s, likelihood, label_shape, c))
        gc, _, _ = api.gradient_model(sc, empirical, keep_gradients=True)
        gm2, outs = simulated_error_model(gc, simulator, *choices)
        traces = run_on(_with_loss(gm2), sc.data, [*outs.projection.values(), LOSS64])
        extra = traces.extra or {}
        for key, name in outs.projection.items():
            per_key.setdefault(key, []).append(np.asarray(extra[name], np.float64))
        loss.append(np.asarray(extra[LOSS64], np.float64))
    p = np.exp(-np.stack(loss, axis=1))
    p /= p.sum(axis=1, keepdims=True)
    stacked = {key: np.stack(v, axis=1) for key, v in per_key.items()}
    return stack_projections(rows[0], rows[1], stacked, p, enumerated=True)
