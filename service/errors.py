"""Errors the service raises on purpose; each knows its HTTP status and becomes JSON only at the edge.

Every 4xx/5xx the API answers has the body `{"error": {"type", "code", "message", "param"}}`.
`type` is the family (`invalid_request_error`, `not_found_error`, ...), `code` the specific reason.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Base class. Subclasses fix `status`, `type` and a default `code`."""

    status: int = 500
    type: str = "api_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "code": self.code, "message": self.message, "param": self.param}}


class InvalidRequest(ApiError):
    status = 422
    type = "invalid_request_error"
    code = "invalid_value"


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class InvalidTransition(Conflict):
    """A job cannot move from its current status to the one asked for (e.g. cancel a finished job)."""

    code = "invalid_state"

    def __init__(self, job_id: str, current: str, target: str, message: str | None = None) -> None:
        super().__init__(message or f"job {job_id} is {current}; it cannot become {target}")
        self.job_id = job_id
        self.current = current
        self.target = target


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class InternalError(ApiError):
    status = 500
    type = "api_error"
    code = "internal_error"


class ServiceUnavailable(ApiError):
    status = 503
    type = "unavailable_error"
    code = "unavailable"


class StorageError(ApiError):
    """Object storage failed (unreachable, denied, missing bucket)."""

    status = 503
    type = "unavailable_error"
    code = "storage_unavailable"
