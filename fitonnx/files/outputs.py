"""One output layer for every writer: checked before any work, written atomically, folders staged.

``OutputPlan`` is built from a command's inputs and checks each output path before anything is
computed: an output may not be (or resolve to, or be a hard link of) an input, nor a special
file, nor an existing symlink unless ``force``; its folder must exist and be writable. Files are
written to a temporary file beside the destination, fsynced and renamed into place, with the
user's umask. ``StagedFolder`` builds a whole ``--out DIR`` in a sibling folder and renames it
into place only when complete; SIGINT/SIGTERM while writing raise ``Interrupted`` so the staging
is cleaned up and the CLI exits 128 + signal number (130/143).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper

from fitonnx.errors import FitonnxError

STDOUT = "-"
MARKER = ".fitonnx-output"  # written into every folder fitonnx stages; only such folders are replaced
MAX_FOLDER_FILES = 10_000  # files of an input folder registered as inputs (a zoo test-data folder)

PathLike = str | os.PathLike[str]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while an output was being written; ``exit_code`` is 128 + signum.

    A ``KeyboardInterrupt`` (not an error root): ``except Exception`` blocks never swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restored)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise ``Interrupted`` (so cleanup runs); handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Defer SIGINT/SIGTERM across a few renames that must happen together."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _content_bytes(content: bytes | str | Callable[[io.TextIOBase], None]) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    buffer = io.StringIO(newline="")
    content(buffer)
    return buffer.getvalue().encode("utf-8")


def _destination(path: Path) -> Path:
    """Where a write to ``path`` lands: through a symlink to its target; special files refused."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(st.st_mode):
        return _destination(Path(os.path.realpath(path)))
    if not stat.S_ISREG(st.st_mode):
        raise FitonnxError(f"{path}: expected a regular file to write; found {_describe_mode(st.st_mode)}")
    return path


def write_atomic(path: PathLike, content: bytes | str | Callable[[io.TextIOBase], None]) -> None:
    """Write ``content`` (bytes, text, or a function writing text) to a temporary file beside
    ``path``, fsync, rename: never a half-written file, and never a FIFO or device replaced.
    ``path`` ``-`` is standard output (``OutputPlan`` allows it only for JSON and CSV).

    The file gets mode ``0o666 & ~umask`` like any file the user creates (mkstemp alone gives
    0600). An existing symlink is written through to its target (``OutputPlan`` refuses one unless
    ``force``).
    """
    data = _content_bytes(content)
    if str(path) == STDOUT:
        sys.stdout.write(data.decode("utf-8"))
        sys.stdout.flush()
        return
    path = _destination(Path(path))
    with interrupts_raise():
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            raise FitonnxError(f"{path}: could not create a file in {str(path.parent)!r} ({exc.strerror})") from None
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise FitonnxError(f"{path}: could not write it ({exc.strerror or exc})") from None
            raise
    _fsync_folder(path.parent)


def _describe_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def model_inputs(model: PathLike) -> list[tuple[str, Path]]:
    """The model and the external-data files it names, as (role, path) inputs of an ``OutputPlan``."""
    path = Path(model)
    found = [("the model", path)]
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
        tensors = list(external_data_helper._get_all_tensors(proto))  # onnx's own (private) walker
    except Exception:  # unreadable models are refused by the loader; here they just name no files
        return found
    seen: set[str] = set()
    for tensor in tensors:
        if external_data_helper.uses_external_data(tensor):
            # the raw entries: ExternalDataInfo would raise on a malformed offset/length (the loader refuses those)
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if isinstance(location, str) and location and location not in seen:
                seen.add(location)
                found.append((f"the model's external data {location!r}", path.parent / location))
    return found


@dataclass(frozen=True)
class Target:
    """A checked output: a file (``path``), standard output (``path`` None) or a staged folder."""

    option: str
    raw: str
    path: Path | None
    folder: bool = False
    create_parent: bool = False

    @property
    def stdout(self) -> bool:
        return self.path is None

    def write(self, content: bytes | str) -> None:
        """Write the whole content to this target (standard output for ``-``)."""
        if self.path is None:
            if isinstance(content, bytes):
                sys.stdout.buffer.write(content)
            else:
                sys.stdout.write(content)
            sys.stdout.flush()
            return
        if self.folder:
            raise FitonnxError(f"{self.option} {self.raw}: is a folder; write into it with StagedFolder")
        made = False
        if self.create_parent and not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o777)
            made = True
        try:
            write_atomic(self.path, content)
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()
            raise

    def describe(self) -> str:
        return "standard output" if self.path is None else str(self.path)


class OutputPlan:
    """The inputs of one command, against which every output path is checked before any work."""

    def __init__(self, inputs: Iterable[tuple[str, PathLike | None]], *, force: bool = False) -> None:
        self.force = force
        self._real: dict[Path, str] = {}
        self._inodes: dict[tuple[int, int], str] = {}
        self._folders: list[tuple[Path, str]] = []
        self.targets: list[Target] = []
        for role, path in inputs:
            if path is not None and str(path) not in ("", STDOUT):
                self.add_input(role, path)

    def add_input(self, role: str, path: PathLike) -> None:
        """Register one input (a folder registers the files inside it, up to ``MAX_FOLDER_FILES``)."""
        p = Path(path)
        self._register(role, p)
        if p.is_dir():
            self._folders.append((p.resolve(), role))
            for i, child in enumerate(p.rglob("*")):
                if i >= MAX_FOLDER_FILES:
                    break
                self._register(role, child)

    def _register(self, role: str, p: Path) -> None:
        self._real[p.resolve()] = role
        with contextlib.suppress(OSError):
            st = p.stat()
            self._inodes[(st.st_dev, st.st_ino)] = role

    def _refuse(self, option: str, raw: str, why: str) -> FitonnxError:
        return FitonnxError(f"{option} {raw}: {why}")

    def _check_not_input(self, option: str, raw: str, real: Path) -> None:
        role = self._real.get(real)
        if role is None:
            with contextlib.suppress(OSError):
                st = real.stat()
                role = self._inodes.get((st.st_dev, st.st_ino))
        if role is not None:
            raise self._refuse(
                option, raw, f"refusing to overwrite an input of this command ({role}); choose another path"
            )
        for other in self.targets:
            if other.path is not None and other.path.resolve() == real:
                raise self._refuse(option, raw, f"is also the output of {other.option}; choose another path")

    def _follow(self, option: str, raw: str, path: Path, expect: str) -> Path:
        """The path to write: refuses special files and, without ``force``, an existing symlink."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return path
        except OSError as exc:
            raise self._refuse(option, raw, f"expected {expect}; could not look at it ({exc.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            if not self.force:
                raise self._refuse(
                    option,
                    raw,
                    f"expected {expect}; found a symbolic link to {str(target)!r} (pass --force to write through it)",
                )
            path = target
            try:
                st = path.stat()
            except FileNotFoundError:
                return path
        wanted = stat.S_ISDIR if expect == "a folder" else stat.S_ISREG
        if not wanted(st.st_mode):
            raise self._refuse(option, raw, f"expected {expect}; found {_describe_mode(st.st_mode)}")
        return path

    def _check_parent(self, option: str, raw: str, folder: Path) -> None:
        if not folder.is_dir():
            raise self._refuse(option, raw, f"expected an existing folder {str(folder)!r} to write into; found none")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise self._refuse(option, raw, f"expected a writable folder; {str(folder)!r} is not writable")

    def file(
        self, option: str, raw: str | None, *, stdout_ok: bool = False, default_name: str | None = None
    ) -> Target | None:
        """Check a file output (``None`` when the option was not given) and remember it.

        ``-`` is standard output when ``stdout_ok``. With ``default_name``, a path ending in ``/`` or
        naming an existing folder means that folder (created if missing) and the file ``default_name``.
        """
        if raw is None:
            return None
        if raw == "":
            raise self._refuse(option, "''", "expected a path; found an empty string")
        if raw == STDOUT:
            if not stdout_ok:
                raise self._refuse(option, raw, "expected a file path; standard output is only for JSON and CSV")
            taken = next((t.option for t in self.targets if t.stdout), None)
            if taken is not None:
                raise self._refuse(option, raw, f"standard output is already the output of {taken}; choose a file")
            target = Target(option, raw, None)
            self.targets.append(target)
            return target
        path, create_parent = Path(raw), False
        as_folder = raw.endswith(("/", os.sep)) or path.is_dir()
        if as_folder and default_name is None:
            raise self._refuse(option, raw, "expected a file path; found a folder")
        if as_folder:
            folder = self._follow(option, raw, Path(raw.rstrip("/" + os.sep) or "/"), "a folder")
            create_parent = not folder.exists()
            path = folder / default_name  # type: ignore[operator]
        path = self._follow(option, raw, path, "a regular file")
        if create_parent:
            self._check_parent(option, raw, path.parent.parent)
            self._check_not_input(option, raw, path.parent.resolve())
        else:
            self._check_parent(option, raw, path.parent)
        real = path.parent.resolve() / path.name
        self._check_not_input(option, raw, real)
        target = Target(option, raw, path, create_parent=create_parent)
        self.targets.append(target)
        return target

    def folder(self, option: str, raw: str | None) -> Target | None:
        """Check an output folder: new, empty, or an earlier fitonnx output (it is replaced whole)."""
        if raw is None:
            return None
        if raw in ("", STDOUT):
            raise self._refuse(option, repr(raw) if raw == "" else raw, f"expected a folder path; found {raw!r}")
        path = self._follow(option, raw, Path(raw.rstrip("/" + os.sep) or "/"), "a folder")
        self._check_parent(option, raw, _existing_ancestor(path.parent))
        real = path.resolve()
        self._check_not_input(option, raw, real)
        for input_real, role in self._real.items():
            if input_real.is_relative_to(real):
                raise self._refuse(
                    option, raw, f"the folder holds an input of this command ({role}); choose another folder"
                )
        if path.is_dir() and not (path / MARKER).is_file() and any(path.iterdir()):
            raise self._refuse(
                option,
                raw,
                f"expected a new or empty folder, or one fitonnx wrote (it has {MARKER}); found other files",
            )
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise self._refuse(option, raw, f"expected a writable folder; {str(path)!r} is not writable")
        target = Target(option, raw, path, folder=True)
        self.targets.append(target)
        return target


def _existing_ancestor(folder: Path) -> Path:
    """``folder`` or its nearest ancestor that exists (missing ones are created when writing)."""
    while not folder.exists() and folder != folder.parent and not folder.is_symlink():
        folder = folder.parent
    return folder


class StagedFolder:
    """Build an output folder beside its destination; rename it into place only when complete.

    ``with StagedFolder(path) as staging:`` write every file into ``staging``. On success the
    folder replaces ``path`` whole (an earlier fitonnx output is removed, so no stale files stay);
    on any error, SIGINT or SIGTERM the staging folder is removed and ``path`` is untouched.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.staging: Path | None = None
        self._interrupts: contextlib.ExitStack | None = None
        self._made: list[Path] = []  # missing parent folders created for the output, deepest last

    def __enter__(self) -> Path:
        self._interrupts = contextlib.ExitStack()
        self._interrupts.enter_context(interrupts_raise())
        try:
            top = _existing_ancestor(self.path.parent)
            self._made = [p for p in reversed(self.path.parent.parents) if p.is_relative_to(top) and p != top]
            self._made += [] if self.path.parent == top else [self.path.parent]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._make_staging()
            os.chmod(self.staging, 0o777 & ~current_umask())
            (self.staging / MARKER).write_text("written by fitonnx; the folder is replaced whole on the next run\n")
        except BaseException as exc:
            self._cleanup()
            self._unmake()
            if isinstance(exc, OSError):
                raise FitonnxError(f"{self.path}: could not create a folder beside it ({exc.strerror})") from None
            raise
        return self.staging

    def _make_staging(self) -> None:
        """Make the staging folder, its name recorded before it exists: a signal at any point leaves
        nothing ``_cleanup`` misses (``tempfile.mkdtemp`` gives the name only after the folder is made,
        and blocking signals in this thread does not defer one that another thread takes)."""
        for attempt in range(100):
            self.staging = self.path.parent / f".{self.path.name}.{secrets.token_hex(6)}.staging"
            try:
                self.staging.mkdir(mode=0o700)
                return
            except FileExistsError:
                self.staging = None  # another's folder: never removed as ours
                if attempt == 99:
                    raise

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        committed = False
        try:
            if kind is None:
                self._commit()
                committed = True
        finally:
            self._cleanup()
            if not committed:
                self._unmake()

    def _unmake(self) -> None:
        """Remove the parent folders made for a failed output (only if still empty)."""
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _commit(self) -> None:
        assert self.staging is not None
        with _signals_blocked():
            old: Path | None = None
            if self.path.is_dir() and not self.path.is_symlink():
                if any(self.path.iterdir()) and not (self.path / MARKER).is_file():
                    raise FitonnxError(
                        f"{self.path}: expected a folder fitonnx wrote (with {MARKER}); found other files"
                    )
                old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".old"))
                os.replace(self.path, old)
            try:
                os.replace(self.staging, self.path)
            except OSError as exc:
                if old is not None:
                    os.replace(old, self.path)
                raise FitonnxError(
                    f"{self.path}: could not move the finished folder into place ({exc.strerror})"
                ) from None
            self.staging = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            _fsync_folder(self.path.parent)

    def _cleanup(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._interrupts is not None:
            self._interrupts.close()
            self._interrupts = None


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(allow_nan=False)`` accepts: NaN/±inf become None,
    numpy scalars and arrays become Python values, strings with lone surrogates are escaped."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, bytes):  # a protobuf string field that is not valid UTF-8
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if value is None:
        return None
    if isinstance(value, dict):
        return {safe_text(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, Sequence | set | frozenset):
        return [json_safe(v) for v in value]
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def safe_text(text: str) -> str:
    """``text`` encodable as UTF-8: lone surrogates (undecodable bytes of a name) become ``\\udcXX``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def json_text(value: Any, indent: int | None = 2) -> str:
    """Always-valid JSON (RFC 8259: no NaN; ASCII, non-ASCII escaped) for ``value``, with a final newline."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n"


def nonfinite_paths(value: Any, where: str = "$") -> list[str]:
    """Where ``value`` holds NaN or ±inf (JSON-path-like), to warn about what ``json_safe`` nulls."""
    if isinstance(value, float | np.floating):
        return [] if math.isfinite(value) else [where]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nonfinite_paths(v, f"{where}.{k}")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in nonfinite_paths(v, f"{where}[{i}]")]
    return []
