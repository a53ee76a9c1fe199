"""Fisher modes as loss heads appended to the model.

Each head turns the model's output into a scalar per-sample loss ℓ whose gradient defines the
Fisher: cross-entropy against true labels (empirical Fisher), or against labels sampled from the
model's own predictive distribution (Monte-Carlo "true" Fisher). Sampling happens inside the
graph from noise fed by the engine (Gumbel-max for categorical, a uniform draw for Bernoulli,
a standard normal for Gaussian), so one forward+backward pass per sample suffices and a seed
makes it reproducible. Sampled labels pass through ArgMax/Less, which carry no gradient.

The exact true Fisher of a categorical output, E_y~p ‖∇ℓ_y‖² = Σ_c p_c·‖∇ℓ_c‖², has no label
sampling noise: the head is the cross-entropy one, and the engine feeds every class c in turn
and weights each pass by p_c = exp(−ℓ_c) (one backward pass per class). A Bernoulli output holding
one probability per sample is the two-class case: the head is the binary cross-entropy one, labels
y = 0 and y = 1 weighted by exp(−ℓ_y) = 1 − p and p (two passes; p(1 − p)·‖∂z/∂t‖² on logits z).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fitonnx.errors import DataError, InternalError, ModelError, UnsupportedError
from fitonnx.model.graph import FLOAT_TYPES, PREPARE_PASSTHROUGH, default_opset
from fitonnx.model.graph import producers as producer_map

PREFIX = "fitonnx__"
LOSS = PREFIX + "loss"
LABELS = PREFIX + "labels"
NOISE = PREFIX + "noise"


class FisherMode(str, Enum):
    EMPIRICAL = "empirical"
    MC = "mc"
    EXACT = "exact"  # the true Fisher summed over classes: categorical, or one Bernoulli probability per sample


class Likelihood(str, Enum):
    CATEGORICAL = "categorical"  # logits (or Softmax probabilities) over a class axis
    BERNOULLI = "bernoulli"  # a Sigmoid output: independent probabilities per element
    GAUSSIAN = "gaussian"  # real values, unit-variance Gaussian around them


class Noise(str, Enum):
    GUMBEL = "gumbel"
    UNIFORM = "uniform"
    NORMAL = "normal"


@dataclass(frozen=True)
class OutputTarget:
    """Which tensor the loss reads and how it is interpreted."""

    output: str  # the model output the user chose
    tap: str  # the tensor the loss reads (a Softmax/Sigmoid's input, else the output itself)
    likelihood: Likelihood
    class_axis: int | None  # non-negative axis, categorical only
    rank: int | None
    probabilities: bool = False  # read from probabilities: no Sigmoid/Softmax in front to tap
    reason: str = ""  # why this likelihood, for the report
    guessed: bool = False  # read by a guess (rank-3 heads, hidden states): the report notes it


@dataclass(frozen=True)
class LossHead:
    """Nodes and constants computing ``LOSS`` from ``target.tap`` plus what the engine must feed."""

    nodes: tuple[onnx.NodeProto, ...]
    initializers: tuple[onnx.TensorProto, ...]
    target: OutputTarget
    mode: FisherMode
    noise: Noise | None  # fed as NOISE, shaped like the tap after ``perm``
    perm: tuple[int, ...] | None  # transpose applied to the tap (class axis moved to 1)
    needs_labels: bool
    enumerate_labels: bool = False  # EXACT: the engine feeds each class as LABELS, weighted by p_c
    noise_input: str = NOISE  # the graph input the noise is fed as
    parts: tuple[LossHead, ...] = ()  # a loss over several outputs: one head per output, summed

    @property
    def heads(self) -> tuple[LossHead, ...]:
        """The per-output heads: the parts of a combined head, else the head itself."""
        return self.parts or (self,)

    @property
    def targets(self) -> tuple[OutputTarget, ...]:
        return tuple(h.target for h in self.heads)

    def noise_shape(self, tap_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tap_shape if self.perm is None else tuple(tap_shape[i] for i in self.perm)


def resolve_output(
    model: onnx.ModelProto,
    ranks: dict[str, int],
    output: str | None,
    likelihood: Likelihood | None,
    labels: np.ndarray | None,
    class_axis: int | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> OutputTarget:
    """Pick the output the loss reads and how to interpret it (see README: "Which loss").

    In steps: the output; the tensor in front of it to tap (a Softmax's or Sigmoid's input); else a
    likelihood guessed from the labels and the output's rank; last, the class axis checked.
    ``shapes``: the tensors' real (runtime) shapes, which win over the declared ones (an old export
    may declare a stale output shape)."""
    output = pick_output(model, output)
    dims = _Dims(model, shapes or {})
    rank = len(shapes[output]) if shapes and output in shapes else ranks.get(output)
    read = _read_producer(model, output, rank, likelihood, class_axis)
    guessed = False
    if read is None:
        if likelihood is Likelihood.BERNOULLI or (likelihood is None and _mean_of_sigmoids(model, output)):
            why = "asked for" if likelihood is not None else "a mean of Sigmoid outputs"
            return OutputTarget(output, output, Likelihood.BERNOULLI, None, rank, probabilities=True, reason=why)
        why = "asked for"
        if likelihood is None:
            likelihood, why, guessed = _guess_likelihood(dims, output, rank, labels, class_axis)
        read = (output, class_axis, likelihood, why)
    tap, axis, likelihood, why = read
    if likelihood is Likelihood.CATEGORICAL:
        rank, axis = _class_axis(dims, output, rank, axis)
    return OutputTarget(
        output=output,
        tap=tap,
        likelihood=likelihood,
        class_axis=axis if likelihood is Likelihood.CATEGORICAL else None,
        rank=rank,
        reason=why,
        guessed=guessed,
    )


def pick_output(model: onnx.ModelProto, output: str | None) -> str:
    """The output named by ``--output``, else the first float output."""
    names = [o.name for o in model.graph.output]
    if output is None:
        # The first float output: converters such as skl2onnx put an integer label output first.
        floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
        if not floats:
            raise ModelError(f"expected a float output to define the loss; the outputs {names} are not float")
        return floats[0]
    if output not in names:
        raise ModelError(f"expected --output to be one of the model outputs {names}; found {output!r}")
    return output


def _read_producer(
    model: onnx.ModelProto, output: str, rank: int | None, likelihood: Likelihood | None, axis: int | None
) -> tuple[str, int | None, Likelihood, str] | None:
    """(tap, class axis, likelihood, why) when a (converted) Softmax or a Sigmoid produces ``output`` and the
    requested likelihood allows reading its input; else None."""
    restored = _converted_softmax(model, output, rank)
    if restored is not None and likelihood in (None, Likelihood.CATEGORICAL) and axis in (None, restored[1]):
        return restored[0], restored[1], Likelihood.CATEGORICAL, "a converted Softmax produces it"
    producer = _through_layout(model, output)
    if producer is None:
        return None
    if producer.op_type in ("Softmax", "LogSoftmax") and likelihood in (None, Likelihood.CATEGORICAL):
        default = -1 if default_opset(model) >= 13 else 1
        axis = next((a.i for a in producer.attribute if a.name == "axis"), default) if axis is None else axis
        return producer.input[0], axis, Likelihood.CATEGORICAL, f"a {producer.op_type} produces it"
    if producer.op_type == "Sigmoid" and likelihood in (None, Likelihood.BERNOULLI):
        return producer.input[0], axis, Likelihood.BERNOULLI, "a Sigmoid produces it"
    return None


def _guess_likelihood(
    dims: _Dims, output: str, rank: int | None, labels: np.ndarray | None, axis: int | None
) -> tuple[Likelihood, str, bool]:
    """(likelihood, why, guessed): categorical for integer labels (or, without labels, an output of
    rank >= 2 with classes), else Gaussian. Rank-3 outputs and hidden states are guesses."""
    if labels is not None:
        if np.issubdtype(labels.dtype, np.integer):
            return Likelihood.CATEGORICAL, "the labels are class indices", False
        return Likelihood.GAUSSIAN, "the labels are real values", False
    if rank is None or rank < 2:
        return Likelihood.GAUSSIAN, f"a rank-{rank if rank is not None else '?'} real value", False
    if dims.get(output, 1 if axis is None else axis) == 1:
        # one "class": a softmax over it is constant, its Fisher 0
        return Likelihood.GAUSSIAN, "one value per sample on its class axis: a real value", False
    hidden = dims.hidden_reason(output)
    if hidden is not None:
        return Likelihood.GAUSSIAN, hidden, True
    if rank >= 3:
        where = f"axis {axis}" if axis is not None else "its last axis"
        return Likelihood.CATEGORICAL, f"rank {rank}: read as logits over {where}", True
    return Likelihood.CATEGORICAL, "class scores (rank 2, no Softmax in front)", False


def _class_axis(dims: _Dims, output: str, rank: int | None, axis: int | None) -> tuple[int, int]:
    """The rank and the non-negative class axis of a categorical output, checked to hold 2 or more classes."""
    rank = rank if rank is not None else 2
    if axis is None:
        axis = -1 if rank == 3 else 1
    if not -rank <= axis < rank:
        raise ModelError(f"expected a class axis within the output's {rank} axes; found {axis}")
    axis %= rank
    if rank < 2:
        raise ModelError(
            f"expected a categorical output with a batch and a class axis; {output!r} has rank {rank}",
            hint="use --likelihood gaussian for real-valued outputs",
        )
    if dims.get(output, axis) == 1:
        raise ModelError(
            f"expected at least 2 classes on axis {axis} of {output!r}; found 1 (a softmax over one class "
            "is constant, so every Fisher trace would be 0)",
            hint="use --likelihood bernoulli for a probability, gaussian for a real value, or --class-axis",
        )
    return rank, axis


_LAYOUT = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def _through_layout(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    """The producer of ``name``, looking through reshapes (a Sigmoid whose output is reshaped is
    still a Sigmoid output). Softmax is seen through Identity (skl2onnx ends in one) and fixed
    quantizers only: a reshape may move its class axis."""
    producers = producer_map(model.graph.node)
    node = producers.get(name)
    # Identity moves no axis, nor does a QDQ model's fixed quantizer (prepare marks its nodes): the
    # loss reads the distribution in front of the output's rounding (its logits, not 1/255 steps).
    while node is not None and (node.op_type == "Identity" or node.doc_string == PREPARE_PASSTHROUGH):
        node = producers.get(node.input[0])
    while node is not None and node.op_type in _LAYOUT:
        inner = producers.get(node.input[0])
        if inner is None or inner.op_type not in ("Sigmoid", *_LAYOUT):
            break
        node = inner
    return node


# Ops whose output is a weighted mean of their input's values: a mean of probabilities is one.
_MEANS = frozenset({"ReduceMean", "GlobalAveragePool", "AveragePool"})


def _source(producers: Mapping[str, onnx.NodeProto], name: str) -> str:
    """``name`` before any fixed quantizer (prepare's passthrough-marked nodes) that rounds it."""
    node = producers.get(name)
    while node is not None and node.doc_string == PREPARE_PASSTHROUGH:
        name = node.input[0]
        node = producers.get(name)
    return name


def _unquantized(producers: Mapping[str, onnx.NodeProto], name: str) -> onnx.NodeProto | None:
    """The producer of ``name`` seen through fixed quantizers (a QDQ model rounds every op's output)."""
    return producers.get(_source(producers, name))


def _converted_softmax(model: onnx.ModelProto, name: str, rank: int | None) -> tuple[str, int] | None:
    """(logits, class axis) when ``name`` is onnx.version_converter's form of an opset < 13
    Softmax/LogSoftmax over the last axis of a tensor whose rank it did not know:
    Reshape(Softmax(Flatten(x, axis=k), axis=-1), Shape(x)). That is a softmax over x's last axis
    exactly when k = rank − 1 (x has the output's rank, restored by the Reshape); a smaller k
    normalizes over several axes at once, which no categorical likelihood here reads."""
    producers = producer_map(model.graph.node)
    reshape = _unquantized(producers, name)
    if rank is None or reshape is None or reshape.op_type != "Reshape":
        return None
    softmax = _unquantized(producers, reshape.input[0])
    shape = producers.get(reshape.input[1])
    if softmax is None or softmax.op_type not in ("Softmax", "LogSoftmax") or shape is None or shape.op_type != "Shape":
        return None
    flatten = _unquantized(producers, softmax.input[0])
    if (
        flatten is None
        or flatten.op_type != "Flatten"
        or _source(producers, flatten.input[0]) != _source(producers, shape.input[0])
    ):
        return None
    if next((a.i for a in softmax.attribute if a.name == "axis"), -1) not in (-1, 1):
        return None
    k = next((a.i for a in flatten.attribute if a.name == "axis"), 1)
    if k % rank != rank - 1:
        return None
    return flatten.input[0], rank - 1


def _mean_of_sigmoids(model: onnx.ModelProto, name: str) -> bool:
    """Whether ``name`` is a Sigmoid output seen through reshapes and means (silero-vad's speech
    probability is the time-mean of per-frame sigmoids): probabilities with no Sigmoid to tap."""
    producers = producer_map(model.graph.node)
    node, through_mean = producers.get(name), False
    while node is not None and node.op_type in _LAYOUT | _MEANS:
        through_mean = through_mean or node.op_type in _MEANS
        node = producers.get(node.input[0])
    return through_mean and node is not None and node.op_type == "Sigmoid"


# Producers whose output is a hidden state rather than class scores, and output names that say so.
_HIDDEN_OPS = frozenset({"LayerNormalization", "SkipLayerNormalization", "Tanh"})
_HIDDEN_WORDS = ("hidden", "pooler", "embedding", "feature", "encoder_out", "last_state")
_BOX_WORDS = ("box", "regress", "coord", "delta", "offset")


class _Dims:
    """Tensor sizes: the measured runtime shapes first, else what the model declares."""

    def __init__(self, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.model, self.shapes = model, shapes

    def get(self, name: str, axis: int) -> int | None:
        """The size of ``axis`` of tensor ``name`` (None where unknown)."""
        if name in self.shapes:
            shape = self.shapes[name]
            return shape[axis] if -len(shape) <= axis < len(shape) else None
        return _static_dim(self.model, name, axis)

    def hidden_reason(self, name: str) -> str | None:
        """Why ``name`` looks like hidden states (its name, or a normalization/activation producing it), or None."""
        lowered = name.lower()
        box = next((w for w in _BOX_WORDS if w in lowered), None)
        if box is not None:
            return f"boxes or regression (its name says {box!r}): Gaussian, a guess"
        word = next((w for w in _HIDDEN_WORDS if w in lowered), None)
        if word is not None:
            return f"hidden states (its name says {word!r}): Gaussian, a guess"
        producer = _through_layout(self.model, name)
        if producer is not None and producer.op_type in _HIDDEN_OPS:
            return f"hidden states (a {producer.op_type} produces it): Gaussian, a guess"
        return None


def _static_dim(model: onnx.ModelProto, name: str, axis: int) -> int | None:
    """The static size of ``axis`` of tensor ``name`` where the model declares it, else None."""
    infos = [*model.graph.output, *model.graph.value_info]
    info = next((v for v in infos if v.name == name and v.type.tensor_type.HasField("shape")), None)
    if info is None:
        return None
    dims = info.type.tensor_type.shape.dim
    if not -len(dims) <= axis < len(dims):
        return None
    d = dims[axis]
    return d.dim_value if d.HasField("dim_value") else None


# Rows of a categorical output that sum to 1 within this (float32 softmax rounding is far smaller)
# and have no negative entry are probabilities, whatever computed them.
PROBABILITY_SUM_TOL = 1e-4
# Clips keeping log p finite when an output is read as probabilities (``damage`` uses the same).
CATEGORICAL_EPS = 1e-12
BERNOULLI_EPS = 1e-6


def check_probabilities(target: OutputTarget, tap_value: np.ndarray) -> OutputTarget:
    """A categorical output read from its own values (no Softmax found in front of it) is taken as
    class probabilities when a sample's values are non-negative and sum to 1 over the class axis:
    a softmax computed by hand (Exp/ReduceSum/Div), or behind ops the resolver does not look
    through. The loss then reads log p, whose softmax is p itself."""
    if target.likelihood is not Likelihood.CATEGORICAL or target.tap != target.output or target.class_axis is None:
        return target
    v = np.asarray(tap_value, np.float64)
    if v.ndim <= target.class_axis or v.shape[target.class_axis] < 2 or not np.all(np.isfinite(v)) or v.min() < 0:
        return target
    if np.max(np.abs(v.sum(axis=target.class_axis) - 1.0)) > PROBABILITY_SUM_TOL:
        return target
    return dataclasses.replace(target, probabilities=True)


def default_mode(labels: np.ndarray | None) -> FisherMode:
    return FisherMode.EMPIRICAL if labels is not None else FisherMode.MC


def build_head(target: OutputTarget, mode: FisherMode, labels_dtype: np.dtype | None) -> LossHead:
    """Nodes computing the per-sample loss (reduction: sum over the sample's outputs)."""
    if mode is FisherMode.EXACT:
        if target.likelihood is Likelihood.GAUSSIAN:
            raise UnsupportedError(
                f"expected a categorical or Bernoulli output for --fisher exact; found {target.likelihood.value}",
                hint="use --fisher mc",
            )
        head = build_head(target, FisherMode.EMPIRICAL, np.dtype(np.int64))  # Bernoulli: Cast to float
        return dataclasses.replace(head, mode=FisherMode.EXACT, needs_labels=False, enumerate_labels=True)
    if mode is FisherMode.EMPIRICAL and labels_dtype is None:
        raise DataError("expected 'labels' in the data for --fisher empirical; found none", hint="use --fisher mc")
    if target.likelihood is Likelihood.CATEGORICAL:
        return _categorical_head(target, mode, labels_dtype)
    if target.likelihood is Likelihood.BERNOULLI:
        if target.probabilities:
            return _bernoulli_on_probabilities(target.tap, mode, target)
        return _bernoulli_head(target, mode)
    return _gaussian_head(target, mode)


def _categorical_head(target: OutputTarget, mode: FisherMode, labels_dtype: np.dtype | None) -> LossHead:
    """Cross-entropy over the class axis (moved to 1) against the labels or Gumbel-max samples."""
    n = helper.make_node
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = target.tap
    noise: Noise | None = None
    if mode is FisherMode.EMPIRICAL and not np.issubdtype(labels_dtype, np.integer):
        raise DataError(f"expected integer class labels for a categorical output; found {labels_dtype}")
    axis = target.class_axis
    if axis is None or target.rank is None:
        raise InternalError("categorical target without class axis")
    perm: tuple[int, ...] | None = None
    if target.probabilities:  # log p: its softmax is p (a clip keeps log 0 finite)
        inits += [
            numpy_helper.from_array(np.array(CATEGORICAL_EPS, np.float32), PREFIX + "p_eps"),
            numpy_helper.from_array(np.array(1.0, np.float32), PREFIX + "p_one"),
        ]
        nodes += [
            n("Clip", [x, PREFIX + "p_eps", PREFIX + "p_one"], [PREFIX + "p_clipped"]),
            n("Log", [PREFIX + "p_clipped"], [PREFIX + "log_p"]),
        ]
        x = PREFIX + "log_p"
    if axis != 1:
        perm = (0, axis, *[i for i in range(1, target.rank) if i != axis])
        nodes.append(n("Transpose", [x], [PREFIX + "logits"], perm=list(perm)))
        x = PREFIX + "logits"
    label = LABELS
    if mode is FisherMode.EMPIRICAL:
        nodes.append(n("Cast", [LABELS], [PREFIX + "labels64"], to=TensorProto.INT64))
        label = PREFIX + "labels64"
    else:
        noise = Noise.GUMBEL
        nodes.append(n("Add", [x, NOISE], [PREFIX + "perturbed"]))
        nodes.append(n("ArgMax", [PREFIX + "perturbed"], [PREFIX + "sampled"], axis=1, keepdims=0))
        label = PREFIX + "sampled"
    # log_prob must be an output of the node for ORT to build its gradient.
    nodes.append(n("SoftmaxCrossEntropyLoss", [x, label], [LOSS, PREFIX + "log_prob"], reduction="sum"))
    return LossHead(tuple(nodes), tuple(inits), target, mode, noise, perm, mode is FisherMode.EMPIRICAL)


def _bernoulli_head(target: OutputTarget, mode: FisherMode) -> LossHead:
    """Binary cross-entropy on logits (a Sigmoid's input) against the labels or uniform-draw samples."""
    # loss = softplus(z) - y*z, with softplus(z) = relu(z) + log(1 + exp(-|z|)) for stability;
    # built from ops that have gradients (Softplus has none in this ORT).
    n = helper.make_node
    x = target.tap
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), PREFIX + "one")]
    noise: Noise | None = None
    if mode is FisherMode.EMPIRICAL:
        # Labels are shaped like the output, which may be a reshape of the tapped logits.
        nodes = [
            n("Cast", [LABELS], [PREFIX + "y_flat"], to=TensorProto.FLOAT),
            n("Shape", [x], [PREFIX + "tap_shape"]),
            n("Reshape", [PREFIX + "y_flat", PREFIX + "tap_shape"], [PREFIX + "y"]),
        ]
    else:
        noise = Noise.UNIFORM
        nodes = [
            n("Sigmoid", [x], [PREFIX + "p"]),
            n("Less", [NOISE, PREFIX + "p"], [PREFIX + "yb"]),
            n("Cast", [PREFIX + "yb"], [PREFIX + "y"], to=TensorProto.FLOAT),
        ]
    nodes += [
        n("Relu", [x], [PREFIX + "relu"]),
        n("Abs", [x], [PREFIX + "abs"]),
        n("Neg", [PREFIX + "abs"], [PREFIX + "nabs"]),
        n("Exp", [PREFIX + "nabs"], [PREFIX + "exp"]),
        n("Add", [PREFIX + "exp", PREFIX + "one"], [PREFIX + "exp1"]),
        n("Log", [PREFIX + "exp1"], [PREFIX + "log1p"]),
        n("Add", [PREFIX + "relu", PREFIX + "log1p"], [PREFIX + "softplus"]),
        n("Mul", [PREFIX + "y", x], [PREFIX + "yz"]),
        n("Sub", [PREFIX + "softplus", PREFIX + "yz"], [PREFIX + "elementwise"]),
        n("ReduceSum", [PREFIX + "elementwise"], [LOSS], keepdims=0),
    ]
    return LossHead(tuple(nodes), tuple(inits), target, mode, noise, None, mode is FisherMode.EMPIRICAL)


def _gaussian_head(target: OutputTarget, mode: FisherMode) -> LossHead:
    """Unit-variance Gaussian: ½‖f − y‖² against the labels, or the MC surrogate −Σ ε⊙f."""
    # For the MC Fisher, y = f + ε with f held constant, whose gradient −εᵀ∂f/∂θ equals that of the
    # surrogate −Σ ε⊙f; the surrogate needs no stop-gradient op, and only the gradient (never the
    # loss value) is used.
    n = helper.make_node
    x = target.tap
    inits: list[onnx.TensorProto] = []
    noise: Noise | None = None
    if mode is FisherMode.EMPIRICAL:
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), PREFIX + "half"))
        nodes = [
            n("Cast", [LABELS], [PREFIX + "y"], to=TensorProto.FLOAT),
            n("Sub", [x, PREFIX + "y"], [PREFIX + "residual"]),
            n("Mul", [PREFIX + "residual", PREFIX + "residual"], [PREFIX + "sq"]),
            n("ReduceSum", [PREFIX + "sq"], [PREFIX + "sum"], keepdims=0),
            n("Mul", [PREFIX + "sum", PREFIX + "half"], [LOSS]),
        ]
    else:
        noise = Noise.NORMAL
        nodes = [
            n("Mul", [x, NOISE], [PREFIX + "weighted"]),
            n("ReduceSum", [PREFIX + "weighted"], [LOSS], keepdims=0),
        ]
    return LossHead(tuple(nodes), tuple(inits), target, mode, noise, None, mode is FisherMode.EMPIRICAL)


def _bernoulli_on_probabilities(p: str, mode: FisherMode, target: OutputTarget) -> LossHead:
    """Binary cross-entropy on probabilities p (an output that is not itself a Sigmoid, e.g. a mean
    of sigmoids): ℓ = −Σ y·log p + (1 − y)·log(1 − p), with p clipped away from 0 and 1."""
    n = helper.make_node
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), PREFIX + "one"),
        numpy_helper.from_array(np.array(BERNOULLI_EPS, np.float32), PREFIX + "eps"),
        numpy_helper.from_array(np.array(1 - BERNOULLI_EPS, np.float32), PREFIX + "one_minus_eps"),
    ]
    nodes = [n("Clip", [p, PREFIX + "eps", PREFIX + "one_minus_eps"], [PREFIX + "pc"])]
    if mode is FisherMode.EMPIRICAL:
        nodes += [
            n("Cast", [LABELS], [PREFIX + "y_flat"], to=TensorProto.FLOAT),
            n("Shape", [p], [PREFIX + "tap_shape"]),
            n("Reshape", [PREFIX + "y_flat", PREFIX + "tap_shape"], [PREFIX + "y"]),
        ]
        noise = None
    else:
        noise = Noise.UNIFORM
        nodes += [
            n("Less", [NOISE, PREFIX + "pc"], [PREFIX + "yb"]),
            n("Cast", [PREFIX + "yb"], [PREFIX + "y"], to=TensorProto.FLOAT),
        ]
    nodes += [
        n("Log", [PREFIX + "pc"], [PREFIX + "log_p"]),
        n("Sub", [PREFIX + "one", PREFIX + "pc"], [PREFIX + "q"]),
        n("Log", [PREFIX + "q"], [PREFIX + "log_q"]),
        n("Sub", [PREFIX + "one", PREFIX + "y"], [PREFIX + "not_y"]),
        n("Mul", [PREFIX + "y", PREFIX + "log_p"], [PREFIX + "a"]),
        n("Mul", [PREFIX + "not_y", PREFIX + "log_q"], [PREFIX + "b"]),
        n("Add", [PREFIX + "a", PREFIX + "b"], [PREFIX + "ll"]),
        n("ReduceSum", [PREFIX + "ll"], [PREFIX + "sum_ll"], keepdims=0),
        n("Neg", [PREFIX + "sum_ll"], [LOSS]),
    ]
    return LossHead(tuple(nodes), tuple(inits), target, mode, noise, None, mode is FisherMode.EMPIRICAL)


def draw_noise(kind: Noise, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Noise for one sample's in-graph label sampling."""
    if kind is Noise.GUMBEL:
        return rng.gumbel(size=shape).astype(np.float32)
    if kind is Noise.UNIFORM:
        return rng.random(shape, dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32)
