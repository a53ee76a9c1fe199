"""Small ONNX models built in code, each with a float64 numpy twin, for tests that check fitonnx's maths.

Every builder returns a ``SmallModel``: the ``ModelProto`` (float32, opset 17, symbolic batch axis
``N``), its weights as numpy arrays drawn from a seeded generator, a numpy ``forward`` computing the
same function in float64, and the quantizable tensors fitonnx is expected to report. The forward
runs one sample (a batch of one) and returns the tensor a Fisher loss reads (logits before a final
Softmax or Sigmoid, the raw output otherwise); every quantizable activation passes through a
``Tap``, so a test can perturb it inside the forward (finite differences with respect to an
activation) and read its value.

The reference ops, losses and the central-difference helper below are deliberately plain numpy,
independent of onnxruntime, so comparing them with fitonnx is a check and not a tautology.
Import as ``from tests.models import mlp, finite_differences, ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
BATCH = "N"

# --------------------------------------------------------------------------------------------
# Taps and reference ops (float64 numpy)
# --------------------------------------------------------------------------------------------


@dataclass
class Tap:
    """Additive perturbations of named activations inside a numpy forward, and what the forward saw.

    ``values`` holds each tapped activation (after its perturbation); ``kinks`` records the branch
    taken by every piecewise-linear op (Relu masks, MaxPool argmaxes), so a finite difference can
    check that its two evaluations stayed on the same linear piece as the base point.
    """

    delta: Mapping[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    kinks: list[np.ndarray] = field(default_factory=list)

    def __call__(self, name: str, value: np.ndarray) -> np.ndarray:
        out = value + self.delta[name] if name in self.delta else value
        self.values[name] = out
        return out


def relu(x: np.ndarray, tap: Tap) -> np.ndarray:
    tap.kinks.append(x > 0)
    return np.maximum(x, 0.0)


def activation(kind: str, x: np.ndarray, tap: Tap) -> np.ndarray:
    """``relu`` or ``tanh``, matching the ONNX op of the same name."""
    if kind == "relu":
        return relu(x, tap)
    if kind == "tanh":
        return np.tanh(x)
    raise ValueError(f"expected 'relu' or 'tanh'; found {kind!r}")


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int = 0, stride: int = 1) -> np.ndarray:
    """ONNX Conv (group 1, no dilation) on NCHW by im2col: out[n,o,i,j] = Σ w[o,c,p,q]·xpad[n,c,i·s+p,j·s+q] + b[o]."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # n c i j p q
    return np.einsum("ncijpq,ocpq->noij", windows, w) + b[None, :, None, None]


def pool2d(kind: str, x: np.ndarray, k: int, tap: Tap) -> np.ndarray:
    """Non-overlapping ``k``×``k`` AveragePool or MaxPool (stride ``k``, no padding, floor)."""
    n, c, h, w = x.shape
    ho, wo = h // k, w // k
    blocks = (
        x[:, :, : ho * k, : wo * k].reshape(n, c, ho, k, wo, k).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, k * k)
    )
    if kind == "average":
        return blocks.mean(axis=-1)
    if kind == "max":
        tap.kinks.append(blocks.argmax(axis=-1))
        return blocks.max(axis=-1)
    raise ValueError(f"expected 'average' or 'max'; found {kind!r}")


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


# --------------------------------------------------------------------------------------------
# Reference per-sample losses (the sample's loss is summed over its positions/outputs)
# --------------------------------------------------------------------------------------------


def categorical_loss(z: np.ndarray, labels: np.ndarray, class_axis: int = 1) -> float:
    """Softmax cross-entropy of logits ``z`` against integer ``labels``, summed over positions."""
    logits = np.moveaxis(z, class_axis, -1)
    top = logits.max(axis=-1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_p, labels.reshape(*log_p.shape[:-1], 1).astype(np.int64), axis=-1)
    return float(-picked.sum())


def bernoulli_loss(z: np.ndarray, y: np.ndarray) -> float:
    """Binary cross-entropy of Sigmoid(z) against ``y`` in {0, 1}, written on the logits: softplus(z) − y·z."""
    return float((np.logaddexp(0.0, z) - y * z).sum())


def gaussian_loss(f: np.ndarray, y: np.ndarray) -> float:
    """Unit-variance Gaussian negative log-likelihood up to a constant: ½‖f − y‖²."""
    return float(0.5 * np.square(f - y).sum())


# --------------------------------------------------------------------------------------------
# SmallModel and central differences
# --------------------------------------------------------------------------------------------

Forward = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], Tap], np.ndarray]


@dataclass(frozen=True)
class SmallModel:
    """An ONNX model, its float32 weights, a float64 numpy twin and what fitonnx should report.

    ``forward(weights, feed, tap)`` evaluates one sample (``feed`` holds batch-of-one inputs) and
    returns the tensor the loss reads; ``final`` is the op the ONNX model applies after it
    ("softmax", "sigmoid" or None). ``weights`` lists the quantizable weights (initializer names)
    and ``activations`` the quantizable activations (tensor names); ``params`` holds every
    initializer, biases included. ``sample_shape`` is the shape of one sample of the model's single
    input (without the batch axis), ``class_axis`` the class axis of a categorical output.
    """

    proto: onnx.ModelProto
    params: dict[str, np.ndarray]
    forward: Forward
    weights: tuple[str, ...]
    activations: tuple[str, ...]
    sample_shape: tuple[int, ...]  # one sample of the single input, without the batch axis
    final: str | None = None
    class_axis: int = 1

    @property
    def input_name(self) -> str:
        return self.proto.graph.input[0].name

    def predict(self, feed: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The ONNX model's output for one sample, in float64."""
        z = self.forward(as64(params if params is not None else self.params), as64(feed), Tap())
        if self.final == "softmax":
            return softmax(z, axis=self.class_axis)
        if self.final == "sigmoid":
            return sigmoid(z)
        return z

    @property
    def tensors(self) -> set[tuple[str, str]]:
        """(name, kind) of every quantizable tensor, kinds spelled as fitonnx's ``Kind`` values."""
        return {(w, "weight") for w in self.weights} | {(a, "activation") for a in self.activations}


def as64(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float arrays promoted to float64; integer arrays (token ids) unchanged."""
    return {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}


class KinkError(AssertionError):
    """A finite difference straddled a Relu or MaxPool kink, so it is not a derivative there."""


def finite_differences(
    model: SmallModel,
    feed: Mapping[str, np.ndarray],
    fn: Callable[[np.ndarray], np.ndarray | float],
    eps: float,
    params: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Central differences of ``fn(forward(...))`` w.r.t. every element of every quantizable tensor.

    Returns name -> array of shape ``shape(fn output) + shape(tensor)``: the gradient of a scalar
    ``fn`` (a loss), or the Jacobian of a vector ``fn`` (e.g. the identity for ∂z/∂t). Weights are
    perturbed in a float64 copy of ``params``; activations through the forward's ``Tap``, so the
    derivative is the total one, every consumer included. Raises ``KinkError`` if a perturbation
    changes any Relu mask or MaxPool argmax (the function would not be linear between the points).
    """
    base_params = as64(params if params is not None else model.params)
    x = as64(feed)
    base = Tap()
    out0 = np.asarray(fn(model.forward(base_params, x, base)), np.float64)

    def evaluate(p: Mapping[str, np.ndarray], tap: Tap) -> np.ndarray:
        out = np.asarray(fn(model.forward(p, x, tap)), np.float64)
        if len(tap.kinks) != len(base.kinks) or any(
            not np.array_equal(a, b) for a, b in zip(tap.kinks, base.kinks, strict=True)
        ):
            raise KinkError("a finite-difference step crossed a Relu/MaxPool kink; pick another seed or a smaller eps")
        return out

    grads: dict[str, np.ndarray] = {}
    for name in model.weights:
        w = base_params[name]
        g = np.zeros(out0.shape + w.shape)
        for k in range(w.size):
            idx = np.unravel_index(k, w.shape)
            plus, minus = w.copy(), w.copy()
            plus[idx] += eps
            minus[idx] -= eps
            up = evaluate({**base_params, name: plus}, Tap())
            down = evaluate({**base_params, name: minus}, Tap())
            g[(..., *idx)] = (up - down) / (2 * eps)
        grads[name] = g
    for name in model.activations:
        shape = base.values[name].shape
        g = np.zeros(out0.shape + shape)
        for k in range(int(np.prod(shape))):
            idx = np.unravel_index(k, shape)
            d = np.zeros(shape)
            d[idx] = eps
            up = evaluate(base_params, Tap(delta={name: d}))
            down = evaluate(base_params, Tap(delta={name: -d}))
            g[(..., *idx)] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


def with_value_info(model: SmallModel) -> SmallModel:
    """The same model with ONNX shape inference's ``value_info`` stored, symbolic batch dims included.

    Exporters often write such value_info; a tool that makes shapes concrete must cope with it.
    """
    return replace(model, proto=onnx.shape_inference.infer_shapes(model.proto, strict_mode=True))


# --------------------------------------------------------------------------------------------
# ONNX construction helpers
# --------------------------------------------------------------------------------------------


def _finish(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    output: onnx.ValueInfoProto,
    params: dict[str, np.ndarray],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, inputs, [output], initializer=[numpy_helper.from_array(v, k) for k, v in params.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fitonnx-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _float_io(name: str, *dims: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH, *dims])


def _randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _final(kind: str, src: str, dst: str) -> list[onnx.NodeProto]:
    if kind == "softmax":
        return [helper.make_node("Softmax", [src], [dst], axis=-1)]
    if kind == "sigmoid":
        return [helper.make_node("Sigmoid", [src], [dst])]
    raise ValueError(f"expected 'softmax' or 'sigmoid'; found {kind!r}")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def mlp(
    seed: int = 0,
    *,
    n_in: int = 5,
    hidden: int = 7,
    n_out: int = 4,
    act: str = "tanh",
    final: str | None = None,
) -> SmallModel:
    """x ─MatMul(W1)─Add(b1)─act─► h ─Gemm(W2, b2, transB=1)─► z [─Softmax/Sigmoid─► y].

    Quantizable: activations ``x`` and ``h``, weights ``W1`` ([n_in, hidden]) and ``W2``
    ([n_out, hidden], stored transposed as Gemm transB=1 reads it).
    """
    rng = np.random.default_rng(seed)
    params = {
        "W1": _randn(rng, n_in, hidden, scale=1 / np.sqrt(n_in)),
        "b1": _randn(rng, hidden, scale=0.1),
        "W2": _randn(rng, n_out, hidden, scale=1.5 / np.sqrt(hidden)),
        "b2": _randn(rng, n_out, scale=0.1),
    }
    out = "z" if final is None else "y"
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["a1"]),
        helper.make_node(act.capitalize(), ["a1"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["z"], transB=1),
    ]
    if final is not None:
        nodes += _final(final, "z", "y")

    def forward(p: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray], tap: Tap) -> np.ndarray:
        x = tap("x", feed["x"])
        h = tap("h", activation(act, x @ p["W1"] + p["b1"], tap))
        return h @ p["W2"].T + p["b2"]

    proto = _finish("mlp", nodes, [_float_io("x", n_in)], _float_io(out, n_out), params)
    return SmallModel(proto, params, forward, ("W1", "W2"), ("x", "h"), (n_in,), final=final)


def regression(seed: int = 0, *, n_in: int = 4, hidden: int = 6, n_out: int = 3) -> SmallModel:
    """A real-valued regressor: x ─Gemm(W1, b1)─Tanh─► h ─Gemm(W2, b2, alpha=0.5, beta=2)─► f.

    Both Gemms keep transB=0 (weights [in, out]); the second exercises alpha and beta.
    Quantizable: ``x``, ``W1``, ``h``, ``W2``.
    """
    rng = np.random.default_rng(seed)
    params = {
        "W1": _randn(rng, n_in, hidden, scale=1 / np.sqrt(n_in)),
        "b1": _randn(rng, hidden, scale=0.1),
        "W2": _randn(rng, hidden, n_out, scale=2 / np.sqrt(hidden)),
        "b2": _randn(rng, n_out, scale=0.1),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["a1"]),
        helper.make_node("Tanh", ["a1"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["f"], alpha=0.5, beta=2.0),
    ]

    def forward(p: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray], tap: Tap) -> np.ndarray:
        x = tap("x", feed["x"])
        h = tap("h", np.tanh(x @ p["W1"] + p["b1"]))
        return 0.5 * (h @ p["W2"]) + 2.0 * p["b2"]

    proto = _finish("regression", nodes, [_float_io("x", n_in)], _float_io("f", n_out), params)
    return SmallModel(proto, params, forward, ("W1", "W2"), ("x", "h"), (n_in,))


def cnn(
    seed: int = 0,
    *,
    channels_in: int = 2,
    size: int = 6,
    channels: tuple[int, int] = (3, 2),
    classes: int = 4,
    act: str = "tanh",
    pool: str = "average",
    symbolic_hw: bool = False,
) -> SmallModel:
    """x ─Conv(C1, pad 1)─act─Pool 2×2─► p ─Conv(C2, pad 1, stride 2)─act─Flatten─► f ─Gemm(Wf, transB=1)─► z.

    ``pool`` is "average" (AveragePool) or "max" (MaxPool); ``symbolic_hw`` declares the input's
    height and width as symbolic dims ``H``, ``W`` (the data still has ``size``). Quantizable: activations ``x`` (NCHW),
    ``p`` (the pooled map read by the second Conv) and ``f`` (the flattened map read by Gemm);
    weights ``C1``, ``C2``, ``Wf``.
    """
    rng = np.random.default_rng(seed)
    c1, c2 = channels
    s2 = (size // 2 + 2 - 3) // 2 + 1
    params = {
        "C1": _randn(rng, c1, channels_in, 3, 3, scale=1 / np.sqrt(9 * channels_in)),
        "c1b": _randn(rng, c1, scale=0.1),
        "C2": _randn(rng, c2, c1, 3, 3, scale=1.5 / np.sqrt(9 * c1)),
        "c2b": _randn(rng, c2, scale=0.1),
        "Wf": _randn(rng, classes, c2 * s2 * s2, scale=2 / np.sqrt(c2 * s2 * s2)),
        "bf": _randn(rng, classes, scale=0.1),
    }
    op_act = act.capitalize()
    op_pool = {"average": "AveragePool", "max": "MaxPool"}[pool]
    nodes = [
        helper.make_node("Conv", ["x", "C1", "c1b"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node(op_act, ["c1"], ["r1"]),
        helper.make_node(op_pool, ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "C2", "c2b"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node(op_act, ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "Wf", "bf"], ["z"], transB=1),
    ]

    def forward(prm: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray], tap: Tap) -> np.ndarray:
        x = tap("x", feed["x"])
        r1 = activation(act, conv2d(x, prm["C1"], prm["c1b"], pad=1), tap)
        p = tap("p", pool2d(pool, r1, 2, tap))
        r2 = activation(act, conv2d(p, prm["C2"], prm["c2b"], pad=1, stride=2), tap)
        f = tap("f", r2.reshape(r2.shape[0], -1))
        return f @ prm["Wf"].T + prm["bf"]

    hw: tuple[int | str, int | str] = ("H", "W") if symbolic_hw else (size, size)
    proto = _finish("cnn", nodes, [_float_io("x", channels_in, *hw)], _float_io("z", classes), params)
    return SmallModel(proto, params, forward, ("C1", "C2", "Wf"), ("x", "p", "f"), (channels_in, size, size))


def embedding(
    seed: int = 0, *, vocab: int = 6, dim: int = 3, length: int = 4, classes: int = 3, reduce: str = "mean"
) -> SmallModel:
    """tokens (int64 [N, T]) ─Gather(E)─► e [N, T, D], then by ``reduce``:

    - "mean":    e ─ReduceMean(axis 1)─► m [N, D] ─MatMul(W)─► z [N, C]
    - "flatten": e ─Flatten─► m [N, T·D] ─MatMul(W)─► z [N, C]
    - "none":    e ─MatMul(W)─► z [N, T, C] (per-token logits, class axis -1, labels [N, T])

    Quantizable: weights ``E`` (the table) and ``W``; activation ``m`` (``e`` for "none").
    """
    rng = np.random.default_rng(seed)
    width = {"mean": dim, "flatten": length * dim, "none": dim}[reduce]
    params = {"E": _randn(rng, vocab, dim), "W": _randn(rng, width, classes, scale=1.5 / np.sqrt(width))}
    act_name = "e" if reduce == "none" else "m"
    nodes = [helper.make_node("Gather", ["E", "tokens"], ["e"], axis=0)]
    if reduce == "mean":
        nodes.append(helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0))
    elif reduce == "flatten":
        nodes.append(helper.make_node("Flatten", ["e"], ["m"], axis=1))
    nodes.append(helper.make_node("MatMul", [act_name, "W"], ["z"]))

    def forward(p: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray], tap: Tap) -> np.ndarray:
        e = p["E"][feed["tokens"]]
        if reduce == "mean":
            e = e.mean(axis=1)
        elif reduce == "flatten":
            e = e.reshape(e.shape[0], -1)
        return tap(act_name, e) @ p["W"]

    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [BATCH, length])]
    out_dims = [BATCH, length, classes] if reduce == "none" else [BATCH, classes]
    output = helper.make_tensor_value_info("z", TensorProto.FLOAT, out_dims)
    proto = _finish(f"embedding_{reduce}", nodes, inputs, output, params)
    axis = 2 if reduce == "none" else 1
    return SmallModel(proto, params, forward, ("E", "W"), (act_name,), (length,), class_axis=axis)


def shared_activation(
    seed: int = 0, *, n_in: int = 4, dim: int = 5, classes: int = 3, tied: bool = False
) -> SmallModel:
    """An activation with several consumers: h = Tanh(x·W0); r = h·A + h·B + h; z = Gemm(r, W3, transB=1).

    ``h`` is read by two MatMuls (quantizable consumers) and by the residual Add (not quantizable);
    its gradient must be the total derivative through all three. With ``tied`` the second MatMul
    reuses ``A`` (one weight, two consumers) instead of ``B``.
    Quantizable: ``x``, ``W0``, ``h``, ``A`` (and ``B``), ``r``, ``W3``.
    """
    rng = np.random.default_rng(seed)
    params = {
        "W0": _randn(rng, n_in, dim, scale=1 / np.sqrt(n_in)),
        "A": _randn(rng, dim, dim, scale=1 / np.sqrt(dim)),
        "W3": _randn(rng, classes, dim, scale=1 / np.sqrt(dim)),
        "b3": _randn(rng, classes, scale=0.1),
    }
    second = "A" if tied else "B"
    if not tied:
        params["B"] = _randn(rng, dim, dim, scale=1 / np.sqrt(dim))
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a0"]),
        helper.make_node("Tanh", ["a0"], ["h"]),
        helper.make_node("MatMul", ["h", "A"], ["u"]),
        helper.make_node("MatMul", ["h", second], ["v"]),
        helper.make_node("Add", ["u", "v"], ["s"]),
        helper.make_node("Add", ["s", "h"], ["r"]),
        helper.make_node("Gemm", ["r", "W3", "b3"], ["z"], transB=1),
    ]

    def forward(p: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray], tap: Tap) -> np.ndarray:
        x = tap("x", feed["x"])
        h = tap("h", np.tanh(x @ p["W0"]))
        r = tap("r", h @ p["A"] + h @ p[second] + h)
        return r @ p["W3"].T + p["b3"]

    proto = _finish("shared", nodes, [_float_io("x", n_in)], _float_io("z", classes), params)
    weights = ("W0", "A", "W3") if tied else ("W0", "A", "B", "W3")
    return SmallModel(proto, params, forward, weights, ("x", "h", "r"), (n_in,))
