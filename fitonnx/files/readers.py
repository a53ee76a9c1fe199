"""Readers that bound their work: regular files only, declared sizes checked before reading.

* ``open_regular`` opens with ``O_NONBLOCK`` and checks ``fstat`` before reading, so a FIFO never
  hangs and a device (``/dev/zero``) is refused instead of read forever.
* ``LazyNpz`` lists an ``.npz`` archive's members with their header-declared shapes and dtypes
  without loading them. A zip member cannot be memory-mapped, but its ``.npy`` payload is a plain
  C-order byte run, so ``read_rows`` seeks to one sample and reads just its bytes (a compressed
  member is decompressed forward and discarded, which costs time, not memory). A Fortran-order
  member can only be read whole, and ``read`` refuses a member whose declared size exceeds the
  limit. Object dtypes are refused from the header: pickle is never involved.
* ``read_tensor_pb`` reads one ONNX ``TensorProto`` (a model-zoo ``input_<k>.pb``) with its
  external data resolved inside the ``.pb``'s own folder.
* ``RandomSamples`` makes ``--random-data N`` samples as they are consumed.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from numpy.lib import format as npy_format
from onnx import external_data_helper, helper, numpy_helper

from fitonnx.errors import DataError, FitonnxError

MiB = 2**20
DEFAULT_LIMIT_MB = 1024
LIMIT_OPTION = "--max-data-mb"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
MAX_HEADER = 10_000  # numpy's own default bound on an .npy header

PathLike = str | os.PathLike[str]


_CURRENT: contextvars.ContextVar[Limit | None] = contextvars.ContextVar("fitonnx_read_limit", default=None)


@dataclass(frozen=True)
class Limit:
    """How many bytes a reader may take in, and the option that raises the bound (for the message)."""

    max_bytes: int = DEFAULT_LIMIT_MB * MiB
    option: str = LIMIT_OPTION

    @classmethod
    def megabytes(cls, mb: float, option: str = LIMIT_OPTION) -> Limit:
        return cls(int(mb * MiB), option)

    @classmethod
    def current(cls) -> Limit:
        """The limit set by ``use`` (the CLI's ``--max-data-mb``), else the default."""
        return _CURRENT.get() or cls()

    def use(self) -> Callable[[], None]:
        """Make this the limit of every reader that is not given one; returns the function that undoes it."""
        token = _CURRENT.set(self)
        return lambda: _CURRENT.reset(token)

    def check(self, n_bytes: int, what: str) -> None:
        """Raise ``DataError`` when ``n_bytes`` exceed the limit, naming the option to raise it."""
        if n_bytes > self.max_bytes:
            raise DataError(
                f"{what}: {_size(n_bytes)} exceeds the {_size(self.max_bytes)} read limit",
                hint=f"raise it with {self.option} {math.ceil(n_bytes / MiB)}, or pass a smaller file",
            )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def open_regular(path: PathLike, what: str) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (symlinks followed); else ``DataError``.

    ``O_NONBLOCK`` makes opening a FIFO return at once, and ``fstat`` on the open descriptor
    decides, so nothing can be swapped in between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"expected {what} at {str(path)!r}; no such file") from None
    except IsADirectoryError:
        raise DataError(f"expected {what} at {str(path)!r}; found a folder") from None
    except OSError as exc:
        raise DataError(f"expected {what} at {str(path)!r}; could not open it ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"expected {what} at {str(path)!r} to be a regular file; found {_kind(mode)}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular_file(path: PathLike, limit: Limit, what: str) -> bytes:
    """The bytes of a regular file no larger than ``limit`` (checked before reading, and while reading)."""
    with open_regular(path, what) as f:
        limit.check(os.fstat(f.fileno()).st_size, f"{what} {str(path)!r}")
        data = f.read(limit.max_bytes + 1)
    limit.check(len(data), f"{what} {str(path)!r}")
    return data


@dataclass(frozen=True)
class Member:
    """One ``.npy`` array of an ``.npz``, as its header declares it (nothing of the payload read)."""

    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes of magic + header before the payload

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def _not_npz_message(path: Path, head: bytes) -> str:
    if head.startswith(NPY_MAGIC):
        return (
            f"expected an .npz archive at {str(path)!r}; found a single .npy array "
            "(save it with np.savez(path, <input name>=array))"
        )
    return f"expected an .npz archive at {str(path)!r}; found a file that is not a zip archive"


class LazyNpz:
    """An ``.npz`` read lazily: ``members`` from the headers, payloads only on ``read``/``read_rows``."""

    def __init__(self, path: PathLike, limit: Limit | None = None) -> None:
        self.path = Path(path)
        self.limit = limit or Limit.current()
        self._file = open_regular(self.path, "a calibration file")
        try:
            head = self._file.read(8)
            if not head.startswith(ZIP_MAGICS):
                raise DataError(_not_npz_message(self.path, head))
            self._file.seek(0)
            self._zip = zipfile.ZipFile(self._file)
            self.members = {m.key: m for m in (self._member(info) for info in self._zip.infolist())}
        except zipfile.BadZipFile as exc:
            self._file.close()
            raise DataError(f"expected an .npz archive at {str(self.path)!r}; it is a damaged zip ({exc})") from None
        except BaseException:
            self._file.close()
            raise

    def _where(self, key: str) -> str:
        return f"{str(self.path)!r} member {key!r}"

    def _member(self, info: zipfile.ZipInfo) -> Member:
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if not info.filename.endswith(".npy"):
            raise DataError(f"expected only .npy arrays in {str(self.path)!r}; found member {info.filename!r}")
        try:
            with self._zip.open(info) as f:
                version = npy_format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = npy_format.read_array_header_1_0(f, max_header_size=MAX_HEADER)
                elif version == (2, 0):
                    shape, fortran, dtype = npy_format.read_array_header_2_0(f, max_header_size=MAX_HEADER)
                else:
                    raise DataError(f"{self._where(key)}: expected .npy format 1.0 or 2.0; found {version}")
                offset = f.tell()
        except DataError:
            raise
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
            raise DataError(f"{self._where(key)}: expected an .npy array header; could not read it ({exc})") from None
        if dtype.hasobject:
            raise DataError(
                f"{self._where(key)} holds an object array (dtype {dtype}), which needs pickle to load; "
                "expected plain numeric arrays"
            )
        member = Member(key, info, tuple(int(d) for d in shape), dtype, bool(fortran), offset)
        if member.offset + member.nbytes > info.file_size:
            raise DataError(
                f"{self._where(key)} declares shape {list(member.shape)} {dtype} ({_size(member.nbytes)}) "
                f"but holds {_size(max(info.file_size - member.offset, 0))}; the archive is truncated or damaged"
            )
        return member

    def num_rows(self, key: str) -> int:
        """Samples on axis 0 of a member (0 for a 0-d array)."""
        shape = self.members[key].shape
        return shape[0] if shape else 0

    def read(self, key: str) -> np.ndarray:
        """A whole member, refused before reading when its declared size exceeds the limit."""
        m = self.members[key]
        self.limit.check(m.nbytes, self._where(key))
        return self._read_span(m, 0, m.nbytes, m.shape, order="F" if m.fortran else "C")

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` of a member, reading only their bytes (whole for Fortran order)."""
        m = self.members[key]
        if not m.shape:
            return self.read(key)
        start, stop = max(0, start), min(stop, m.shape[0])
        stop = max(start, stop)
        if m.fortran and len(m.shape) > 1:
            return self.read(key)[start:stop]
        self.limit.check((stop - start) * m.row_bytes, self._where(key))
        shape = (stop - start, *m.shape[1:])
        return self._read_span(m, start * m.row_bytes, (stop - start) * m.row_bytes, shape, order="C")

    def _read_span(self, m: Member, skip: int, n_bytes: int, shape: tuple[int, ...], order: str) -> np.ndarray:
        out = np.empty(shape, dtype=m.dtype, order=order)
        view = memoryview(out.reshape(-1, order="A")).cast("B") if out.size else memoryview(b"")
        try:
            with self._zip.open(m.info) as f:
                f.seek(m.offset + skip)
                got = 0
                while got < n_bytes:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
            raise DataError(f"{self._where(m.key)}: could not read its data ({exc})") from None
        if got < n_bytes:
            raise DataError(f"{self._where(m.key)}: expected {n_bytes} bytes of data; the archive ends after {got}")
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._zip.close()
        self._file.close()

    def __enter__(self) -> LazyNpz:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _external_bytes(tensor: onnx.TensorProto, pb: Path, limit: Limit) -> bytes:
    """A tensor's external data, resolved against the ``.pb``'s own folder and kept inside it."""
    try:
        info = external_data_helper.ExternalDataInfo(tensor)
        offset, length = int(info.offset or 0), None if info.length is None else int(info.length)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{str(pb)!r}: expected integer external-data offset/length; found ({exc})") from None
    root = pb.parent.resolve()
    location = info.location or ""
    target = (root / location).resolve()
    if not location or os.path.isabs(location) or not target.is_relative_to(root) or target == root:
        raise DataError(f"{str(pb)!r} stores its data at {location!r}; expected a file inside {str(root)!r}")
    if offset < 0 or (length is not None and length < 0):
        raise DataError(f"{str(pb)!r}: expected non-negative external-data offset/length; found {offset}/{length}")
    with open_regular(target, "external tensor data") as f:
        size = os.fstat(f.fileno()).st_size
        n = size - offset if length is None else length
        limit.check(n, f"external data {str(target)!r}")
        f.seek(offset)
        data = f.read(n)
    if len(data) != n:
        raise DataError(
            f"{str(pb)!r}: expected {n} bytes of external data at offset {offset} in {location!r}; found {len(data)}"
        )
    return data


def _np_dtype(tensor: onnx.TensorProto, pb: Path) -> np.dtype:
    if tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise DataError(f"{str(pb)!r}: expected a TensorProto with an element type; found none (empty or not a tensor)")
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{str(pb)!r}: expected a known element type; found data_type {tensor.data_type}") from None


_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _has_values(tensor: onnx.TensorProto) -> bool:
    return bool(tensor.raw_data) or any(len(getattr(tensor, f)) for f in _VALUE_FIELDS)


def read_tensor_pb(path: PathLike, limit: Limit | None = None, *, min_rank: int = 0) -> np.ndarray:
    """One serialized ``TensorProto`` as an array: size-bounded, malformed files refused in one line."""
    pb, limit = Path(path), limit or Limit.current()
    raw = read_regular_file(pb, limit, "a TensorProto file")
    if not raw:
        raise DataError(f"{str(pb)!r}: expected a serialized TensorProto; the file is empty")
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(raw)
    except Exception:  # protobuf's DecodeError and friends
        raise DataError(f"{str(pb)!r}: expected a serialized TensorProto; could not parse it") from None
    dtype = _np_dtype(tensor, pb)
    dims = [int(d) for d in tensor.dims]
    if any(d < 0 for d in dims):
        raise DataError(f"{str(pb)!r}: expected non-negative dims; found {dims}")
    if len(dims) < min_rank:
        raise DataError(
            f"{str(pb)!r}: expected a tensor with at least {min_rank} axes (a batch axis); found dims {dims}"
        )
    limit.check(math.prod(dims) * dtype.itemsize, f"{str(pb)!r} (dims {dims}, {dtype})")
    if external_data_helper.uses_external_data(tensor):
        tensor.raw_data = _external_bytes(tensor, pb, limit)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    if math.prod(dims) > 0 and not _has_values(tensor):
        raise DataError(f"{str(pb)!r}: declares dims {dims} but holds no data; expected {math.prod(dims)} values")
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises ValueError/TypeError for inconsistent fields
        raise DataError(
            f"{str(pb)!r}: expected data matching dims {dims}; could not decode it ({type(exc).__name__})"
        ) from None
    if array.size != math.prod(dims) or (dims and math.prod(dims) > 0 and array.size == 0):
        raise DataError(f"{str(pb)!r}: expected {math.prod(dims)} values for dims {dims}; found {array.size}")
    return array


SampleSpec = Mapping[str, tuple[tuple[int, ...], np.dtype]]


class RandomSamples:
    """``n`` random samples made on demand: sample ``i`` comes from the seed ``(seed, i)``.

    ``specs`` maps input names to (shape of one sample, dtype). Floats are standard normal,
    booleans and integers 0 or 1. Nothing is allocated until a sample is asked for, so
    ``RandomSamples(specs, 5_000_000, 0).head(4)`` costs four samples.
    """

    def __init__(self, specs: SampleSpec, n: int, seed: int) -> None:
        if n < 1:
            raise FitonnxError(f"expected at least one random sample; found {n}")
        if seed < 0:
            raise FitonnxError(f"expected a seed of 0 or more; found {seed}")
        self.specs = {name: (tuple(int(d) for d in shape), np.dtype(dt)) for name, (shape, dt) in specs.items()}
        self.n = n
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index`` (one array per input, each of its per-sample shape)."""
        if not 0 <= index < self.n:
            raise IndexError(f"sample {index} of {self.n}")
        rng = np.random.default_rng([self.seed, index])
        out: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in self.specs.items():
            if np.issubdtype(dtype, np.floating):
                out[name] = rng.standard_normal(shape).astype(dtype)
            else:
                out[name] = rng.integers(0, 2, shape).astype(dtype)
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self.sample(i) for i in range(self.n))

    def head(self, k: int) -> dict[str, np.ndarray]:
        """The first ``min(k, n)`` samples stacked on a new axis 0."""
        k = max(0, min(k, self.n))
        samples = [self.sample(i) for i in range(k)]
        return {
            name: np.stack([s[name] for s in samples]) if samples else np.empty((0, *shape), dtype)
            for name, (shape, dtype) in self.specs.items()
        }


def sniff(path: PathLike, n: int = 8) -> bytes:
    """The first ``n`` bytes of a regular file (for saying what a wrongly given file is)."""
    with open_regular(path, "a file") as f:
        return f.read(n)


__all__ = [
    "DEFAULT_LIMIT_MB",
    "LIMIT_OPTION",
    "LazyNpz",
    "Limit",
    "Member",
    "RandomSamples",
    "open_regular",
    "read_regular_file",
    "read_tensor_pb",
    "sniff",
]
