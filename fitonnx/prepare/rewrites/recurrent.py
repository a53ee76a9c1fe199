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


@rewrite("LSTM", "GRU", "RNN")
def rewrite_recurrent(b: Builder) -> str:
    op = b.node.op_type
    x = b.input(0)
    steps = b.static_dim(x, 0, f"{op} is unrolled over its time steps")
    _check(b, op, steps)
    hidden = int(b.attr("hidden_size"))
    gates = GATES[op]
    direction = b.attr("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    gh = gates * hidden
    linear_before_reset = op == "GRU" and int(b.attr("linear_before_reset", 0)) != 0

    # Input projection of every step at once: [T, 1, B, in] @ [D, in, G·H] -> [T, D, B, G·H].
    x4 = b.passthrough(b.unsqueeze(x, [1]))
    xw = b.op("MatMul", [x4, b.op("Transpose", [b.input(1)], perm=[0, 2, 1])], "xw")
    r_t = b.op("Transpose", [b.input(2)], perm=[0, 2, 1])  # [D, H, G·H]
    recurrent_bias = None
    if b.input(3):
        bias = b.require_constant(b.input(3), f"{op}'s bias B").astype(np.float64)
        wb, rb = bias[:, :gh], bias[:, gh:]
        input_bias = wb + rb
        if linear_before_reset:  # Rb_h stays inside r ⊙ (H·R_hᵀ + Rb_h)
            input_bias[:, 2 * hidden :] = wb[:, 2 * hidden :]
            recurrent_bias = b.const(rb[:, None, 2 * hidden :].astype(b.dtype()), "rbh")
        xw = b.op("Add", [xw, b.const(input_bias[:, None, :].astype(b.dtype()), "bias")])
    reverse = list(range(steps - 1, -1, -1))
    if direction == "reverse":
        xw = b.op("Gather", [xw, b.ints(reverse, "reverse")], axis=0)
    elif dirs == 2:
        fwd = b.op("Slice", [xw, b.ints([0]), b.ints([1]), b.ints([1])])
        bwd = b.op("Gather", [b.op("Slice", [xw, b.ints([1]), b.ints([2]), b.ints([1])]), b.ints(reverse)], axis=0)
        xw = b.op("Concat", [fwd, bwd], axis=1)

    # Without initial states they are zero: the first step has no recurrent MatMul (a constant
    # operand there would read as a weight).
    zeros = b.const(np.zeros((dirs, 1, hidden)), "zeros")
    h: str | None = b.input(5) or None
    c = (b.input(6) or zeros) if op == "LSTM" else None
    states: list[str] = []

    def plus(a: str, other: str | None) -> str:
        return a if other is None else b.op("Add", [a, other])

    def split(value: str, parts: int) -> list[str]:
        return b.ops("Split", [value, b.ints([hidden] * parts)], outputs=parts, axis=-1)

    def part(value: str, k: int) -> str:
        return b.op("Slice", [value, b.ints([k * hidden]), b.ints([(k + 1) * hidden]), b.ints([-1])], "gate")

    for t in range(steps):
        x_t = b.squeeze(b.op("Gather", [xw, b.ints([t])], f"x{t}", axis=0), [0])  # [D, B, G·H]
        rec = _weights_only(b, b.op("MatMul", [h, r_t], f"hr{t}")) if h is not None else None
        if op == "LSTM":
            i_g, o_g, f_g, c_g = split(plus(x_t, rec), 4)
            keep = b.op("Mul", [b.op("Sigmoid", [f_g]), c])
            c = b.op("Add", [keep, b.op("Mul", [b.op("Sigmoid", [i_g]), b.op("Tanh", [c_g])])], f"c{t}")
            h = b.op("Mul", [b.op("Sigmoid", [o_g]), b.op("Tanh", [c])], f"h{t}")
        elif op == "GRU":
            # Slices, not Split: a Split with an unused output has a wrong gradient.
            xz, xr, xh = (part(x_t, k) for k in range(3))
            z = b.op("Sigmoid", [plus(xz, part(rec, 0) if rec is not None else None)])
            r = b.op("Sigmoid", [plus(xr, part(rec, 1) if rec is not None else None)])
            if linear_before_reset:
                inner = plus(part(rec, 2), recurrent_bias) if rec is not None else recurrent_bias
                cand = b.op("Tanh", [plus(xh, b.op("Mul", [r, inner]) if inner is not None else None)])
            else:
                rh = None
                if h is not None:
                    reset = _weights_only(b, b.op("MatMul", [b.op("Mul", [r, h]), r_t], f"rh{t}"))
                    rh = part(reset, 2)
                cand = b.op("Tanh", [plus(xh, rh)])
            # H = (1 − z)·h̃ + z·H_prev = h̃ + z·(H_prev − h̃)
            previous = h if h is not None else zeros
            h = b.op("Add", [cand, b.op("Mul", [z, b.op("Sub", [previous, cand])])], f"h{t}")
        else:
            h = b.op("Tanh", [plus(x_t, rec)], f"h{t}")
        states.append(b.unsqueeze(h, [0]))

    y = b.op("Concat", states, "y", axis=0) if steps > 1 else states[0]  # [T, D, B, H] in step order
    if direction == "reverse":
        y = b.op("Gather", [y, b.ints(reverse)], axis=0)
    elif dirs == 2:
        fwd = b.op("Slice", [y, b.ints([0]), b.ints([1]), b.ints([1])])
        bwd = b.op("Gather", [b.op("Slice", [y, b.ints([1]), b.ints([2]), b.ints([1])]), b.ints(reverse)], axis=0)
        y = b.op("Concat", [fwd, bwd], axis=1)
    if h is None:
        raise InternalError("the unrolled recurrence produced no hidden state")
    for k, value in enumerate([y, h, c]):
        if k < len(b.node.output) and b.output(k) and value is not None:
            b.finish(b.op("Identity", [value]), k)
    return f"unrolled over {steps} steps ({direction}) into MatMul/Sigmoid/Tanh/Mul/Add"


def _weights_only(b: Builder, tensor: str) -> str:
    """Mark a recurrent MatMul: its weight (R) is quantizable, its hidden-state input is not."""
    for node in b.nodes:
        if tensor in node.output:
            node.doc_string = PREPARE_WEIGHTS_ONLY
    return tensor
