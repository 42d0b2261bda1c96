"""Worker errors: one base class, one subclass per job error code. Mapped to codes only in `classify`.

Messages are what a client sees on the job (`error.message`); tracebacks go to the log only.
"""

from __future__ import annotations


class WorkerError(Exception):
    code = "internal"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(WorkerError):
    code = "invalid_input"


class OutOfMemory(WorkerError):
    code = "out_of_memory"
    retryable = True


class NumericalError(WorkerError):
    code = "numerical_error"
    retryable = True  # another seed usually works


class StorageError(WorkerError):
    code = "storage_error"
    retryable = True


class Timeout(WorkerError):
    code = "timeout"
    retryable = True


class Canceled(WorkerError):
    """Not a failure: the job was canceled between steps (ends `canceled`, not `failed`)."""

    code = "canceled"


class Internal(WorkerError):
    code = "internal"
    retryable = True


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - the worker always has torch
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


def classify(exc: BaseException) -> WorkerError:
    """Map any exception raised while running a job to the WorkerError that names its job code."""
    from rq.timeouts import JobTimeoutException

    from model import errors as model_errors

    if isinstance(exc, WorkerError):
        return exc
    if isinstance(exc, model_errors.Interrupted):
        return Canceled("canceled while running")
    if isinstance(exc, model_errors.NumericalError):
        return NumericalError(f"the sample became non-finite: {exc}")
    if isinstance(exc, model_errors.InvalidInput):
        return InvalidInput(str(exc))
    if _is_oom(exc):
        return OutOfMemory("the accelerator ran out of memory; try fewer frames, a smaller size, or later")
    if isinstance(exc, (TimeoutError, JobTimeoutException)):
        return Timeout("the job ran past its time limit")
    # Anything else is our bug: a generic message to the client, the traceback to the log.
    return Internal(f"internal error ({type(exc).__name__})")
