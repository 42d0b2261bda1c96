"""Errors of the job domain. They name what went wrong (`code`, `param`); they know nothing of HTTP.

The API maps them to status codes at its edge (service/api/errors.py); the worker maps them to its own
outcomes. One base class, small named subclasses.
"""

from __future__ import annotations


class JobsError(Exception):
    """Base class. `code` is the specific reason (also the API's `error.code`), `param` the field at fault,
    `retry_after_seconds` when trying again later is the remedy."""

    code: str = "internal_error"
    retry_after_seconds: int | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(JobsError):
    """A request the served model or the server's limits refuse."""

    code = "invalid_value"


class NotFound(JobsError):
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class Conflict(JobsError):
    code = "conflict"


class InvalidTransition(Conflict):
    """A job cannot move from its current status to the one asked for (e.g. cancel a finished job)."""

    code = "invalid_state"

    def __init__(self, job_id: str, current: str, target: str, message: str | None = None) -> None:
        super().__init__(message or f"job {job_id} is {current}; it cannot become {target}")
        self.job_id = job_id
        self.current = current
        self.target = target


class JobStopping(Conflict):
    """A running job was asked to stop and has not yet: the request that needs it stopped can be repeated."""

    code = "job_stopping"
    retry_after_seconds = 2


class RunSuperseded(InvalidTransition):
    """A run's write was refused because another run (or the reaper) owns the job now: the run must stop."""

    code = "run_superseded"


class JobExpired(InvalidTransition):
    """The job waited in the queue past its expiry: it must not start (it fails `expired`)."""

    code = "job_expired"


class StorageError(JobsError):
    """Object storage failed (unreachable, denied, missing bucket)."""

    code = "storage_unavailable"


class Refused(JobsError):
    """Admission control turned a submission away (rate limit, a queue cap): retry after `retry_after_seconds`."""

    code = "rate_limited"

    def __init__(self, message: str, *, code: str, retry_after_seconds: int) -> None:
        super().__init__(message, code=code)
        self.retry_after_seconds = retry_after_seconds
