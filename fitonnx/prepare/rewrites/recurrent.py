"""LSTM, GRU and RNN unrolled over a static sequence length into MatMul/Sigmoid/Tanh/Mul/Add.

onnxruntime-training 1.19 has no gradient for the ONNX recurrent ops (measured), and no library
pass unrolls them, so it is written here from the equations of the ONNX spec. Both directions of
a bidirectional op advance in lockstep as a batch of two. The input projection X·Wᵀ of every step
is one MatMul reading ``X`` and ``W`` (through Unsqueeze/Transpose only), and each step's
recurrent MatMul reads ``R`` through a Transpose, so W, R and X stay the quantizable tensors a
toolchain sees; the hidden states feeding the recurrent MatMuls are marked as not quantizable.

Covered: default activations, no peepholes, no clip, input_forget 0, layout 0, sequence_lens
absent or all equal to the (static) sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fitonnx.errors import InternalError
from fitonnx.model.graph import PREPARE_WEIGHTS_ONLY
from fitonnx.prepare.rewrites.base import Builder, NoRewrite, rewrite

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"], "RNN": ["tanh"]}
MAX_STEPS = 1024


def _check(b: Builder, op: str, steps: int) -> None:
    acts = b.attr("activations")
    if acts is not None:
        names = [a.lower() for a in acts]
        expected = DEFAULT_ACTIVATIONS[op] * (len(names) // max(len(DEFAULT_ACTIVATIONS[op]), 1))
        if names != expected:
            raise NoRewrite(f"expected the default activations {DEFAULT_ACTIVATIONS[op]}; found {list(acts)}")
    if b.attr("clip") is not None:
        raise NoRewrite("expected no clip")
    if int(b.attr("input_forget", 0)):
        raise NoRewrite("expected input_forget 0")
    if int(b.attr("layout", 0)):
        raise NoRewrite("expected layout 0 (time-major)")
    if op == "LSTM" and b.input(7):
        raise NoRewrite("expected no peephole weights")
    if b.input(4):
        lens = b.constant_value(b.input(4))
        if lens is None or not np.all(lens == steps):
            raise NoRewrite("expected sequence_lens absent or constant and equal to the sequence length")
    if steps < 1 or steps > MAX_STEPS:
        raise NoRewrite(f"expected 1 to {MAX_STEPS} time steps to unroll; found {steps}")


@dataclass
class _Unroll:
    """One recurrent node being unrolled: its attributes and the tensors every step reads."""

    b: Builder
    op: str
    steps: int
    hidden: int
    direction: str
    linear_before_reset: bool
    r_t: str = ""  # R transposed: [D, H, G·H]
    recurrent_bias: str | None = None  # GRU with linear_before_reset: Rb_h
    zeros: str = ""

    @property
    def dirs(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    def plus(self, a: str, other: str | None) -> str:
        return a if other is None else self.b.op("Add", [a, other])

    def split(self, value: str, parts: int) -> list[str]:
        return self.b.ops("Split", [value, self.b.ints([self.hidden] * parts)], outputs=parts, axis=-1)

    def part(self, value: str, k: int) -> str:
        b, n = self.b, self.hidden
        return b.op("Slice", [value, b.ints([k * n]), b.ints([(k + 1) * n]), b.ints([-1])], "gate")

    def time_order(self, value: str, reverse_hint: str = "i") -> str:
        """Reverse the time axis of the reverse direction (step order <-> sequence order)."""
        b = self.b
        reverse = list(range(self.steps - 1, -1, -1))
        if self.direction == "reverse":
            return b.op("Gather", [value, b.ints(reverse, reverse_hint)], axis=0)
        if self.dirs == 2:
            fwd = b.op("Slice", [value, b.ints([0]), b.ints([1]), b.ints([1])])
            back = b.op("Slice", [value, b.ints([1]), b.ints([2]), b.ints([1])])
            bwd = b.op("Gather", [back, b.ints(reverse)], axis=0)
            return b.op("Concat", [fwd, bwd], axis=1)
        return value


@rewrite("LSTM", "GRU", "RNN")
def rewrite_recurrent(b: Builder) -> str:
    op = b.node.op_type
    x = b.input(0)
    steps = b.static_dim(x, 0, f"{op} is unrolled over its time steps")
    _check(b, op, steps)
    u = _Unroll(
        b,
        op,
        steps,
        hidden=int(b.attr("hidden_size")),
        direction=b.attr("direction", "forward"),
        linear_before_reset=op == "GRU" and int(b.attr("linear_before_reset", 0)) != 0,
    )
    xw = _input_projection(u, x)
    # Without initial states they are zero: the first step has no recurrent MatMul (a constant
    # operand there would read as a weight).
    u.zeros = b.const(np.zeros((u.dirs, 1, u.hidden)), "zeros")
    h: str | None = b.input(5) or None
    c = (b.input(6) or u.zeros) if op == "LSTM" else None
    states: list[str] = []
    for t in range(steps):
        x_t = b.squeeze(b.op("Gather", [xw, b.ints([t])], f"x{t}", axis=0), [0])  # [D, B, G·H]
        rec = _weights_only(b, b.op("MatMul", [h, u.r_t], f"hr{t}")) if h is not None else None
        if op == "LSTM":
            h, c = _lstm_step(u, t, u.plus(x_t, rec), c)
        elif op == "GRU":
            h = _gru_step(u, t, x_t, rec, h)
        else:
            h = b.op("Tanh", [u.plus(x_t, rec)], f"h{t}")
        states.append(b.unsqueeze(h, [0]))

    y = b.op("Concat", states, "y", axis=0) if steps > 1 else states[0]  # [T, D, B, H] in step order
    y = u.time_order(y)
    if h is None:
        raise InternalError("the unrolled recurrence produced no hidden state")
    for k, value in enumerate([y, h, c]):
        if k < len(b.node.output) and b.output(k) and value is not None:
            b.finish(b.op("Identity", [value]), k)
    return f"unrolled over {steps} steps ({u.direction}) into MatMul/Sigmoid/Tanh/Mul/Add"


def _input_projection(u: _Unroll, x: str) -> str:
    """X·Wᵀ (+ biases) of every step at once, in step order: [T, 1, B, in] @ [D, in, G·H] -> [T, D, B, G·H].

    Also sets ``u.r_t`` and, for a GRU with linear_before_reset, ``u.recurrent_bias``."""
    b, hidden = u.b, u.hidden
    gh = GATES[u.op] * hidden
    x4 = b.passthrough(b.unsqueeze(x, [1]))
    xw = b.op("MatMul", [x4, b.op("Transpose", [b.input(1)], perm=[0, 2, 1])], "xw")
    u.r_t = b.op("Transpose", [b.input(2)], perm=[0, 2, 1])  # [D, H, G·H]
    if b.input(3):
        bias = b.require_constant(b.input(3), f"{u.op}'s bias B").astype(np.float64)
        wb, rb = bias[:, :gh], bias[:, gh:]
        input_bias = wb + rb
        if u.linear_before_reset:  # Rb_h stays inside r ⊙ (H·R_hᵀ + Rb_h)
            input_bias[:, 2 * hidden :] = wb[:, 2 * hidden :]
            u.recurrent_bias = b.const(rb[:, None, 2 * hidden :].astype(b.dtype()), "rbh")
        xw = b.op("Add", [xw, b.const(input_bias[:, None, :].astype(b.dtype()), "bias")])
    return u.time_order(xw, "reverse")


def _lstm_step(u: _Unroll, t: int, gates: str, c: str | None) -> tuple[str, str]:
    """One LSTM step from its pre-activations (iofc order): the new hidden and cell states."""
    b = u.b
    i_g, o_g, f_g, c_g = u.split(gates, 4)
    keep = b.op("Mul", [b.op("Sigmoid", [f_g]), c])
    c = b.op("Add", [keep, b.op("Mul", [b.op("Sigmoid", [i_g]), b.op("Tanh", [c_g])])], f"c{t}")
    h = b.op("Mul", [b.op("Sigmoid", [o_g]), b.op("Tanh", [c])], f"h{t}")
    return h, c


def _gru_step(u: _Unroll, t: int, x_t: str, rec: str | None, h: str | None) -> str:
    """One GRU step (zrh order): the new hidden state."""
    b = u.b
    # Slices, not Split: a Split with an unused output has a wrong gradient.
    xz, xr, xh = (u.part(x_t, k) for k in range(3))
    z = b.op("Sigmoid", [u.plus(xz, u.part(rec, 0) if rec is not None else None)])
    r = b.op("Sigmoid", [u.plus(xr, u.part(rec, 1) if rec is not None else None)])
    if u.linear_before_reset:
        inner = u.plus(u.part(rec, 2), u.recurrent_bias) if rec is not None else u.recurrent_bias
        cand = b.op("Tanh", [u.plus(xh, b.op("Mul", [r, inner]) if inner is not None else None)])
    else:
        rh = None
        if h is not None:
            reset = _weights_only(b, b.op("MatMul", [b.op("Mul", [r, h]), u.r_t], f"rh{t}"))
            rh = u.part(reset, 2)
        cand = b.op("Tanh", [u.plus(xh, rh)])
    # H = (1 − z)·h̃ + z·H_prev = h̃ + z·(H_prev − h̃)
    previous = h if h is not None else u.zeros
    return b.op("Add", [cand, b.op("Mul", [z, b.op("Sub", [previous, cand])])], f"h{t}")


def _weights_only(b: Builder, tensor: str) -> str:
    """Mark a recurrent MatMul: its weight (R) is quantizable, its hidden-state input is not."""
    for node in b.nodes:
        if tensor in node.output:
            node.doc_string = PREPARE_WEIGHTS_ONLY
    return tensor
