"""A seeded fuzz of the real CLI: mutated model bytes, malformed graphs, hostile data files and paths.

Every case runs in its own folder (the working directory while it runs) and must end in exit
0 or 2 with at most one ``error:`` line, no traceback, every input byte-identical (and still the
same kind of file), nothing left behind but the outputs it asked for, and valid JSON when it
wrote JSON. The whole run is bounded by ``BUDGET_S``; cases that would hang (FIFOs) run in a
subprocess with a timeout. ``FITONNX_FUZZ_REPORT=path`` writes the findings as Markdown.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fitonnx.cli.main import cli
from fitonnx.files import MARKER

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SEED = 20261203
BUDGET_S = 55.0
SUBPROCESS_TIMEOUT_S = 20.0
FAST = ["--max-samples", "2"]

Setup = Callable[[Path], None]


@dataclass
class Case:
    """One CLI invocation: ``setup`` makes the input files in the case folder, ``args`` are relative to it."""

    name: str
    setup: Setup
    args: list[str]
    outputs: tuple[str, ...] = ()  # what may appear on exit 0 (a folder covers its contents; "x/" must be a folder)
    refuse: bool = False  # the right answer is a one-line refusal (exit 2)


@dataclass
class Outcome:
    case: Case
    code: int | None
    output: str
    noise: list[str] = field(default_factory=list)  # lines written to the file descriptors, past click
    problems: list[str] = field(default_factory=list)


# --- inputs -------------------------------------------------------------------------------------


def _cnn_bytes() -> bytes:
    return (MODELS / "mnist_cnn.onnx").read_bytes()


def _calib(n: int = 8) -> dict[str, np.ndarray]:
    with np.load(MODELS / "mnist_cnn.calib.npz") as z:
        return {"input": z["input"][:n], "labels": z["labels"][:n]}


def _writes(name: str, data: bytes) -> Setup:
    return lambda d: (d / name).write_bytes(data)


def _cnn_with_calib(model: bytes) -> Setup:
    def setup(d: Path) -> None:
        (d / "m.onnx").write_bytes(model)
        np.savez(d / "c.npz", **_calib())

    return setup


def _flip(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Flip a few bytes, mostly in the graph's structure (nodes first, inputs/outputs/opsets last)."""
    buf = bytearray(data)
    k = rng.randint(1, 12)
    for _ in range(k):
        region = rng.random()
        if region < 0.4:
            i = rng.randrange(0, min(3000, len(buf)))
        elif region < 0.7:
            i = rng.randrange(max(0, len(buf) - 2500), len(buf))
        else:
            i = rng.randrange(len(buf))
        buf[i] = rng.randrange(256)
    return f"flip{k}", bytes(buf)


def model_byte_cases(rng: random.Random, n: int) -> list[Case]:
    base, cases = _cnn_bytes(), []
    for i in range(n):
        if i % 4 == 3:
            cut = rng.randrange(len(base))
            how, data = f"truncate{cut}", base[:cut]
        else:
            how, data = _flip(rng, base)
        args = ["score", "m.onnx", "--data", "c.npz", *FAST, "--json", "r.json"]
        cases.append(Case(f"bytes-{i}-{how}", _cnn_with_calib(data), args, ("r.json",)))
    return cases


def _mutated(mutate: Callable[[onnx.ModelProto], None]) -> bytes:
    proto = onnx.load_model(str(MODELS / "mnist_cnn.onnx"))
    mutate(proto)
    return proto.SerializeToString()


def _attr(op: str, name: str, value: object) -> Callable[[onnx.ModelProto], None]:
    def mutate(p: onnx.ModelProto) -> None:
        node = next(n for n in p.graph.node if n.op_type == op)
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)])

    return mutate


def _bad_utf8(p: onnx.ModelProto) -> None:
    p.graph.node[0].name = "conv_NAME_MARK"


def _external(location: str, extra: tuple[tuple[str, str], ...] = ()) -> Callable[[onnx.ModelProto], None]:
    def mutate(p: onnx.ModelProto) -> None:
        t = p.graph.initializer[0]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
        for k, v in extra:
            t.external_data.add(key=k, value=v)

    return mutate


def _set(fn: Callable[[onnx.ModelProto], object]) -> Callable[[onnx.ModelProto], None]:
    def mutate(p: onnx.ModelProto) -> None:
        fn(p)

    return mutate


GRAPH_MUTATIONS: list[tuple[str, Callable[[onnx.ModelProto], None]]] = [
    ("conv-group-0", _attr("Conv", "group", 0)),
    ("conv-group-3", _attr("Conv", "group", 3)),
    ("conv-negative-pads", _attr("Conv", "pads", [-5, -5, -5, -5])),
    ("conv-kernel-shape-wrong", _attr("Conv", "kernel_shape", [5, 5])),
    ("gemm-transB-7", _attr("Gemm", "transB", 7)),
    ("no-outputs", _set(lambda p: p.graph.ClearField("output"))),
    ("output-elem-type-99", _set(lambda p: setattr(p.graph.output[0].type.tensor_type, "elem_type", 99))),
    ("input-elem-type-0", _set(lambda p: setattr(p.graph.input[0].type.tensor_type, "elem_type", 0))),
    ("input-elem-type-int8", _set(lambda p: setattr(p.graph.input[0].type.tensor_type, "elem_type", TensorProto.INT8))),
    ("opset-1", _set(lambda p: setattr(p.opset_import[0], "version", 1))),
    ("initializer-dims-wrong", _set(lambda p: p.graph.initializer[0].dims.__setitem__(0, 3))),
    ("initializer-removed", _set(lambda p: p.graph.initializer.pop(0))),
    ("external-escape", _external("../../outside.bin")),
    ("external-bad-length", _external("w.bin", (("length", "abc"),))),
    ("external-missing", _external("nothere.bin")),
]


def graph_cases() -> list[Case]:
    cases = [
        Case(
            f"graph-{name}",
            _cnn_with_calib(_mutated(m)),
            ["score", "m.onnx", "--data", "c.npz", *FAST, "--json", "r.json"],
            ("r.json",),
        )
        for name, m in GRAPH_MUTATIONS
    ]
    raw = _mutated(_bad_utf8).replace(b"conv_NAME_MARK", b"conv_\xff\xfe_MARK")
    args = ["score", "m.onnx", "--data", "c.npz", *FAST, "--json", "r.json"]
    cases.append(Case("graph-non-utf8-node-name", _cnn_with_calib(raw), args, ("r.json",)))
    raw = _cnn_bytes().replace(b"conv1.weight", b"conv1.w\xffight")
    cases.append(Case("graph-non-utf8-tensor-name", _cnn_with_calib(raw), args, ("r.json",)))
    cases.append(Case("inspect-non-utf8", _cnn_with_calib(raw), ["inspect", "m.onnx", "--json", "r.json"], ("r.json",)))
    return cases


def _data(name: str, make: Callable[[Path], None], extra: tuple[str, ...] = ()) -> Case:
    def setup(d: Path) -> None:
        (d / "m.onnx").write_bytes(_cnn_bytes())
        make(d / "c.npz")

    return Case(
        f"data-{name}", setup, ["score", "m.onnx", "--data", "c.npz", *FAST, *extra, "--json", "r.json"], ("r.json",)
    )


def _truncated(p: Path) -> None:
    np.savez(p, **_calib())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        with open(p, "wb") as f:  # keep the exact name (np.savez would add .npz to other names)
            np.savez(f, **arrays)

    return make


def _zoo(files: dict[str, bytes | None]) -> Setup:
    """A model-zoo folder ``z/test_data_set_0`` with the given files (None makes a FIFO)."""

    def setup(d: Path) -> None:
        (d / "m.onnx").write_bytes(_cnn_bytes())
        folder = d / "z" / "test_data_set_0"
        folder.mkdir(parents=True)
        for name, data in files.items():
            if data is None:
                os.mkfifo(folder / name)
            else:
                (folder / name).write_bytes(data)

    return setup


def data_cases() -> list[Case]:
    x, y = _calib()["input"], _calib()["labels"]
    cases = [
        _data("truncated-npz", _truncated),
        _data("npy-not-npz", lambda p: p.write_bytes(_npy_bytes(x))),
        _data("text-not-npz", lambda p: p.write_text("input,labels\n1,2\n")),
        _data("empty-file", lambda p: p.write_bytes(b"")),
        _data("object-array", _npz(input=np.array([{"a": 1}] * 8, dtype=object))),
        _data("wrong-shape", _npz(input=x[:, :, :14, :])),
        _data("wrong-rank", _npz(input=x[:, 0])),
        _data("wrong-dtype", _npz(input=x.astype(np.float64))),
        _data("nan", _npz(input=np.where(np.arange(x.size).reshape(x.shape) % 7 == 0, np.nan, x).astype(np.float32))),
        _data("labels-out-of-range", _npz(input=x, labels=y + 100)),
        _data("labels-wrong-count", _npz(input=x, labels=y[:3])),
        _data("labels-nan", _npz(input=x, labels=np.full(8, np.nan))),
        _data("zero-samples", _npz(input=x[:0])),
        _data("only-labels", _npz(labels=y)),
        _data("constant-zero-input", _npz(input=np.zeros_like(x), labels=y)),
        _data("saturated-input", _npz(input=np.full_like(x, 1e30), labels=y)),
    ]
    good = numpy_helper.from_array(x[:1]).SerializeToString()
    for name, data in {
        "empty": b"",
        "typeless": TensorProto(dims=[1, 1, 28, 28]).SerializeToString(),
        "0-d": numpy_helper.from_array(np.float32(1)).SerializeToString(),
        "dims-without-data": TensorProto(dims=[1, 1, 28, 28], data_type=TensorProto.FLOAT).SerializeToString(),
        "garbage": b"\x08\x01\x12\xff\xff\xff",
    }.items():
        args = ["score", "m.onnx", "--data", "z", *FAST, "--json", "r.json"]
        cases.append(Case(f"zoo-{name}", _zoo({"input_0.pb": data}), args, ("r.json",)))
    args = ["score", "m.onnx", "--data", "z", *FAST, "--json", "r.json"]
    cases.append(Case("zoo-input_x", _zoo({"input_0.pb": good, "input_x.pb": good}), args, ("r.json",)))
    cases.append(Case("zoo-fifo", _zoo({"input_0.pb": None}), args, ("r.json",), refuse=True))
    cases.append(
        Case(
            "data-fifo",
            lambda d: (_writes("m.onnx", _cnn_bytes())(d), os.mkfifo(d / "c.npz")),
            ["score", "m.onnx", "--data", "c.npz", *FAST],
            (),
            refuse=True,
        )
    )
    return cases


# --- hostile paths --------------------------------------------------------------------------------


def _mlp(d: Path) -> None:
    (d / "m.onnx").write_bytes((MODELS / "digits_mlp.onnx").read_bytes())
    (d / "c.npz").write_bytes((MODELS / "digits_mlp.calib.npz").read_bytes())


def _cnn_full(d: Path) -> None:
    """The CNN with its whole calibration set (a run long enough to be interrupted in the middle)."""
    (d / "m.onnx").write_bytes(_cnn_bytes())
    (d / "c.npz").write_bytes((MODELS / "mnist_cnn.calib.npz").read_bytes())


def _plus(*steps: Setup) -> Setup:
    def setup(d: Path) -> None:
        for step in steps:
            step(d)

    return setup


def _symlink(name: str, target: str) -> Setup:
    return lambda d: (d / name).symlink_to(target)


def _fifo(name: str) -> Setup:
    return lambda d: os.mkfifo(d / name)


def _external_model(d: Path) -> None:
    proto = onnx.load_model(str(MODELS / "digits_mlp.onnx"))
    onnx.save_model(proto, str(d / "m.onnx"), save_as_external_data=True, location="m.bin", size_threshold=0)
    (d / "c.npz").write_bytes((MODELS / "digits_mlp.calib.npz").read_bytes())


def path_cases(recommendation: Path) -> list[Case]:
    score = ["score", "m.onnx", "--data", "c.npz", *FAST]
    rec = lambda d: (d / "rec.json").write_bytes(recommendation.read_bytes())  # noqa: E731
    export = ["export", "m.onnx", "--recommendation", "rec.json", "--data", "c.npz"]
    recommend = ["recommend", "m.onnx", "--data", "c.npz", *FAST, "--avg-bits", "4"]
    sub = lambda d: (d / "sub").mkdir()  # noqa: E731
    hard = lambda d: os.link(d / "m.onnx", d / "h.json")  # noqa: E731
    other = lambda d: (d / "o.json").write_text("keep")  # noqa: E731
    refused = [
        ("json-is-model", _mlp, [*score, "--json", "m.onnx"]),
        ("csv-is-data", _mlp, [*score, "--csv", "c.npz"]),
        ("json-dotdot-model", _plus(_mlp, sub), [*score, "--json", "sub/../m.onnx"]),
        ("json-hardlink-model", _plus(_mlp, hard), [*score, "--json", "h.json"]),
        ("json-symlink-model", _plus(_mlp, _symlink("l.json", "m.onnx")), [*score, "--json", "l.json"]),
        ("json-symlink-other", _plus(_mlp, other, _symlink("l.json", "o.json")), [*score, "--json", "l.json"]),
        ("json-fifo", _plus(_mlp, _fifo("f.json")), [*score, "--json", "f.json"]),
        ("json-folder", _plus(_mlp, sub), [*score, "--json", "sub"]),
        ("json-empty", _mlp, [*score, "--json", ""]),
        ("json-missing-folder", _mlp, [*score, "--json", "nope/r.json"]),
        ("json-and-csv-same", _mlp, [*score, "--json", "r", "--csv", "r"]),
        ("plot-dash", _mlp, ["validate", "m.onnx", "--data", "c.npz", *FAST, "--plot", "-"]),
        ("inspect-json-is-model", _mlp, ["inspect", "m.onnx", "--json", "m.onnx"]),
        ("seed-negative", _mlp, ["score", "m.onnx", "--random-data", "4", "--seed", "-1"]),
        ("recommend-out-empty", _mlp, [*recommend, "--out", ""]),
        ("recommend-out-is-model-folder", _mlp, [*recommend, "--out", "."]),
        ("recommend-out-file", _plus(_mlp, other), [*recommend, "--out", "o.json"]),
        (
            "recommend-out-foreign-folder",
            _plus(_mlp, sub, lambda d: (d / "sub" / "x").write_text("x")),
            [*recommend, "--out", "sub"],
        ),
        ("export-out-is-model", _plus(_mlp, rec), [*export, "--format", "qdq", "--out", "m.onnx"]),
        ("export-out-is-external", _plus(_external_model, rec), [*export, "--format", "qdq", "--out", "m.bin"]),
        ("export-out-is-recommendation", _plus(_mlp, rec), [*export, "--format", "overrides", "--out", "rec.json"]),
    ]
    cases = [Case(f"path-{name}", setup, args, refuse=True) for name, setup, args in refused]
    cases += [
        Case("path-json-dash", _mlp, [*score, "--json", "-"]),
        Case(
            "path-export-out-newdir-slash",
            _plus(_mlp, rec),
            [*export, "--format", "overrides", "--out", "new/"],
            ("new/",),
        ),
        Case("path-recommend-out-new", _mlp, [*recommend, "--out", "out"], ("out/",)),
        Case(
            "path-json-symlink-force",
            _plus(_mlp, other, _symlink("l.json", "o.json")),
            [*score, "--json", "l.json", "--force"],
            ("o.json",),
        ),
    ]
    return cases


INT_VALUES = [0, -1, 1, 2, 3, 7, 2**31 - 1, -(2**31)]
INTS_VALUES = [[], [0], [0, 0], [-1, -1], [1, 1, 1, 1], [-3, -3, -3, -3], [1000, 1000], [2**31 - 1, 1]]
OP_SWAPS = ["Relu", "Sigmoid", "Softmax", "Conv", "Gemm", "MatMul", "Flatten", "NotAnOp", "Identity", "Reshape"]


def _random_mutation(rng: random.Random) -> tuple[str, Callable[[onnx.ModelProto], None]]:
    """One random change to one node of the CNN: an attribute value, a new attribute, or its op type."""
    node_index, choice, pick = rng.randrange(10), rng.random(), rng.randrange(1000)

    def mutate(p: onnx.ModelProto) -> None:
        node = p.graph.node[node_index]
        if choice < 0.6 and node.attribute:
            a = node.attribute[pick % len(node.attribute)]
            if a.type == onnx.AttributeProto.INT:
                a.i = INT_VALUES[pick % len(INT_VALUES)]
            elif a.type == onnx.AttributeProto.INTS:
                del a.ints[:]
                a.ints.extend(INTS_VALUES[pick % len(INTS_VALUES)])
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = [0.0, -1.0, float("nan"), float("inf"), 1e30][pick % 5]
        elif choice < 0.8:
            node.attribute.append(helper.make_attribute(["axis", "group", "bogus", "transA"][pick % 4], pick % 5 - 2))
        else:
            node.op_type = OP_SWAPS[pick % len(OP_SWAPS)]

    return f"node{node_index}-{'attr' if choice < 0.6 else 'new-attr' if choice < 0.8 else 'op'}-{pick}", mutate


def mutation_cases(rng: random.Random, n: int) -> list[Case]:
    args = ["score", "m.onnx", "--data", "c.npz", *FAST, "--json", "r.json"]
    cases = []
    for i in range(n):
        name, mutate = _random_mutation(rng)
        cases.append(Case(f"mutate-{i}-{name}", _cnn_with_calib(_mutated(mutate)), args, ("r.json",)))
    return cases


# --- running and checking -------------------------------------------------------------------------

WORKER_MEMORY = 6 * 2**30  # an address-space cap, so a runaway allocation fails instead of exhausting the machine


def _snapshot(folder: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``folder``: its kind and, for regular files, the hash of its bytes (FIFOs never opened)."""
    snap: dict[str, tuple[str, str]] = {}
    for p in sorted(folder.rglob("*")):
        mode = p.lstat().st_mode
        rel = str(p.relative_to(folder))
        if stat.S_ISLNK(mode):
            snap[rel] = ("symlink", os.readlink(p))
        elif stat.S_ISREG(mode):
            snap[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            snap[rel] = ("dir" if stat.S_ISDIR(mode) else f"special{stat.S_IFMT(mode)}", "")
    return snap


def _invoke_here(args: list[str], folder: Path) -> tuple[int, str]:
    """Run the CLI in-process in ``folder`` (the worker's side); an uncaught exception becomes a traceback."""
    import traceback

    from fitonnx.cli.main import cli

    old = Path.cwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)
    output = result.output
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        output += "\nTraceback (uncaught, last lines):\n" + text[-1500:]
    return result.exit_code, output


def _worker_main(fd: int) -> None:
    """Serve cases from stdin (one JSON line each), answering on ``fd``; stdout and stderr are the log."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    with os.fdopen(fd, "w") as answers:
        for line in sys.stdin:
            request = json.loads(line)
            code, output = _invoke_here(request["args"], Path(request["folder"]))
            print(f"=== end of case {request['folder']}", flush=True)
            answers.write(json.dumps({"code": code, "output": output}) + "\n")
            answers.flush()


class Worker:
    """A fitonnx process that runs cases one after another; replaced when a case crashes or hangs."""

    def __init__(self, log: Path) -> None:
        read, write = os.pipe()
        self.log = open(log, "ab")  # noqa: SIM115  # closed in close()
        self.offset = self.log.tell()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(write)],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(write,),
            env=env,
            text=True,
            start_new_session=True,
        )
        os.close(write)
        self.answers = os.fdopen(read)

    def run(self, args: list[str], folder: Path, timeout: float) -> tuple[int | None, str] | None:
        """The case's (exit code, output); None and a dead worker when it crashed or hung."""
        import select

        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"args": args, "folder": str(folder)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.answers], [], [], timeout)
        line = self.answers.readline() if ready else ""
        if not line:
            return None
        answer = json.loads(line)
        return answer["code"], answer["output"]

    def death(self) -> str:
        """Why the worker stopped answering: killed after a hang, or the signal that crashed it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            return f"hung for more than {CASE_TIMEOUT_S:.0f} s"
        rc = self.proc.returncode
        return f"crashed (signal {-rc})" if rc < 0 else f"worker exited {rc}"

    def noise(self) -> list[str]:
        """Lines written straight to the file descriptors since the last call (onnxruntime's log, ...)."""
        self.log.flush()
        with open(self.log.name, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode("utf-8", "replace")
            self.offset = f.tell()
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("=== end of case")]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.answers.close()
        self.log.close()


CASE_TIMEOUT_S = 15.0  # a case takes well under a second (on shared cores, a few); a FIFO read waits forever


def _degenerate(folder: Path, name: str) -> bool:
    """A score report whose traces are all zero or not finite."""
    try:
        report = json.loads((folder / name).read_text(encoding="utf-8"))
        traces = [t.get("ef_trace") for t in report.get("tensors", [])]
    except (ValueError, OSError, AttributeError):
        return False
    return bool(traces) and all(not isinstance(t, float | int) or t == 0 or not np.isfinite(t) for t in traces)


def _check_outputs(case: Case, folder: Path, code: int | None, output: str) -> list[str]:
    problems = []
    for name in case.outputs if code == 0 else ():
        p = folder / name.rstrip("/")
        if name.endswith("/") and not p.is_dir():
            problems.append(f"{name} is not a folder")
        if name.endswith(".json") and p.is_file():
            try:
                json.loads(p.read_text(encoding="utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
            except (ValueError, UnicodeDecodeError) as exc:
                problems.append(f"invalid JSON ({str(exc)[:60]})")
            if _degenerate(folder, name) and "warning:" not in output:
                problems.append("all traces zero or non-finite, without a warning")
    return problems


def _check(case: Case, folder: Path, before: dict[str, tuple[str, str]], code: int | None, output: str) -> list[str]:
    problems = []
    if code not in (0, 2):
        problems.append(f"exit {code}")
    elif case.refuse and code != 2:
        problems.append("accepted (expected a one-line refusal)")
    errors = [line for line in output.splitlines() if line.lower().startswith("error:")]
    if len(errors) > 1 or (code == 2 and not errors):
        problems.append(f"{len(errors)} error lines")
    if "Traceback" in output:
        problems.append("traceback")
    after = _snapshot(folder)
    allowed = [o.rstrip("/") for o in case.outputs] if code == 0 else []
    changed = [k for k, v in before.items() if after.get(k) != v and k not in allowed]
    if changed:
        problems.append(f"inputs changed: {changed}")
    stray = [k for k in after if k not in before and not any(k == o or k.startswith(o + "/") for o in allowed)]
    if stray:
        problems.append(f"left behind: {stray}")
    return problems + _check_outputs(case, folder, code, output)


def run_cases(cases: list[Case], root: Path, budget: float) -> tuple[list[Outcome], int]:
    """Run ``cases`` in one worker (replaced after a crash or hang) until ``budget`` seconds have passed."""
    start, outcomes = time.monotonic(), []
    worker = Worker(root / "worker.log")
    try:
        for i, case in enumerate(cases):
            if time.monotonic() - start > budget:
                return outcomes, len(cases) - i
            folder = root / f"{i:03d}"
            folder.mkdir()
            case.setup(folder)
            before = _snapshot(folder)
            answer = worker.run(case.args, folder, CASE_TIMEOUT_S)
            if answer is None:
                code, output = None, worker.death()
                worker.close()
                worker = Worker(root / "worker.log")
            else:
                code, output = answer
            noise = worker.noise()
            outcomes.append(Outcome(case, code, output, noise, _check(case, folder, before, code, output)))
    finally:
        worker.close()
    return outcomes, 0


def _check_signal(
    case: Case, folder: Path, before: dict[str, tuple[str, str]], code: int, output: str, want: int
) -> list[str]:
    """After a signal: exit 0 (finished first) or 128 + signum, no traceback, inputs kept, nothing partial."""
    problems = [] if code in (0, want) else [f"exit {code} (expected {want} or 0)"]
    if "Traceback" in output:
        problems.append("traceback")
    after = _snapshot(folder)
    if [k for k, v in before.items() if after.get(k) != v]:
        problems.append("inputs changed")
    # a signal that lands just after the folder was moved into place cannot undo it: then it must be whole
    whole = {"out/recommendation.json", "out/m.annotated.onnx", f"out/{MARKER}"} <= set(after)
    kept = code == 0 or (code == want and whole)
    stray = [k for k in after if k not in before and not (kept and (k == "out" or k.startswith("out/")))]
    if stray:
        problems.append(f"left behind: {stray}")
    return problems


def signal_cases(rng: random.Random, root: Path, n: int) -> list[Outcome]:
    """``recommend`` in a real process, sent SIGTERM or SIGINT a seeded delay after it started: exit 130/143
    (or 0 when it finished first), nothing partial left."""
    import signal

    outcomes = []
    for i in range(n):
        sig = [signal.SIGTERM, signal.SIGINT][i % 2]
        delay = rng.uniform(0.0, 1.5)  # after the command started staging its output
        folder = root / f"sig{i}"
        folder.mkdir()
        _cnn_full(folder)
        before = _snapshot(folder)
        case = Case(
            f"signal-{sig.name}-{delay:.2f}s",
            _cnn_full,
            ["recommend", "m.onnx", "--avg-bits", "4", "--data", "c.npz", "--out", "out"],
            ("out/",),
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        code_text = "from fitonnx.cli.main import main; main()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code_text, *case.args],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not any(folder.glob(".out.*.staging")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the command has started: its output folder is being staged
        time.sleep(delay)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
        code = proc.returncode
        problems = _check_signal(case, folder, before, code, output, 128 + sig)
        outcomes.append(Outcome(case, code, output, [], problems))
    return outcomes


def all_cases(recommendation: Path, rng: random.Random) -> list[Case]:
    return (
        path_cases(recommendation)
        + graph_cases()
        + data_cases()
        + mutation_cases(rng, 150)
        + model_byte_cases(rng, 400)
    )


def report(outcomes: list[Outcome], skipped: int) -> str:
    """The figures of a run and one line per failing case."""
    bad = [o for o in outcomes if o.problems]
    count = lambda word: sum(any(word in p for p in o.problems) for o in outcomes)  # noqa: E731
    lines = [
        f"cases {len(outcomes)} (+{skipped} not run: time budget); exit 0: {sum(o.code == 0 for o in outcomes)}; "
        f"clean refusals (exit 2, one error line): {sum(o.code == 2 and not o.problems for o in outcomes)}; "
        f"tracebacks: {count('traceback')}; crashes/hangs/other exits: {count('exit ') + count('crashed') + count('hung')}; "
        f"inputs changed: {count('inputs changed')}; files left behind: {count('left behind')}; "
        f"accepted instead of refused: {count('accepted')}; invalid JSON: {count('invalid JSON')}; "
        f"silent degenerate results: {count('without a warning')}; cases with fd-level log noise: "
        f"{sum(bool(o.noise) for o in outcomes)}; failing cases: {len(bad)}",
        "",
    ]
    for o in bad:
        last = next((ln for ln in reversed(o.output.strip().splitlines()) if ln.strip()), "")
        lines.append(
            f"- `{o.case.name}` (`{' '.join(o.case.args)}`): exit {o.code}; {'; '.join(o.problems)}; last line: `{last[:160]}`"
        )
    noisy = [o for o in outcomes if o.noise]
    lines += ["", "Lines written straight to the file descriptors (not asserted):"] if noisy else []
    lines += [f"- `{o.case.name}`: `{o.noise[0][:200]}`" for o in noisy]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def recommendation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "out"
    args = ["recommend", str(MODELS / "digits_mlp.onnx"), *FAST, "--avg-bits", "4", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out / "recommendation.json"


def test_fuzz_cli(tmp_path: Path, recommendation: Path) -> None:
    """The seeded fuzz: no traceback, no changed input, no stray file, exit 0 or 2 with one error line."""
    rng = random.Random(SEED)
    cases = all_cases(recommendation, rng)
    assert len({c.name for c in cases}) == len(cases)
    cases_root, signals_root = tmp_path / "cases", tmp_path / "signals"
    cases_root.mkdir()
    signals_root.mkdir()
    outcomes, skipped = run_cases(cases, cases_root, BUDGET_S - 12)
    outcomes += signal_cases(rng, signals_root, 3)
    text = report(outcomes, skipped)
    if os.environ.get("FITONNX_FUZZ_REPORT"):
        Path(os.environ["FITONNX_FUZZ_REPORT"]).write_text(text + "\n", encoding="utf-8")
    assert len(outcomes) >= len(cases) // 2, f"only {len(outcomes)} of {len(cases)} cases ran in {BUDGET_S} s"
    assert not [o for o in outcomes if o.problems], text


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(int(sys.argv[2]))
