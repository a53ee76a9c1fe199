"""The two error roots of fitonnx.

``FitonnxError`` is a user error: bad input, unsupported model, impossible request. The CLI
catches it once and prints it as one line with a hint. ``InternalError`` is a bug in fitonnx:
it is never caught, so its traceback reaches the person who must fix it.
"""

from __future__ import annotations


class FitonnxError(Exception):
    """Something the user can fix: the message says what was expected and what was found."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"

    def __reduce__(self) -> tuple:
        # Raised in a worker process (--workers, --ray), it crosses back to the driver whole, hint included.
        return (type(self), (self.message, self.hint))


class ModelError(FitonnxError):
    """The model file is missing, corrupt, unsafe or uses something fitonnx cannot handle."""


class DataError(FitonnxError):
    """Calibration data does not fit the model (names, shapes, dtypes, labels, NaN)."""


class UnsupportedError(FitonnxError):
    """The model is valid but needs an op or construct the gradient engine cannot handle."""


class WorkerError(FitonnxError):
    """Workers of a parallel run (``--workers``, ``--ray``) died or vanished after their retries."""


REPORT_BUGS = "this is a bug in fitonnx: please report it with the command line and this traceback"


class InternalError(Exception):
    """A bug in fitonnx: an assumption of its own code did not hold. Its message says how to report it."""

    def __str__(self) -> str:
        return f"{super().__str__()} ({REPORT_BUGS})"
