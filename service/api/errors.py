"""HTTP errors: each knows its status and becomes JSON at the edge. Domain errors (service/jobs/errors.py)
are mapped to these by `from_domain`.

Every 4xx/5xx the API answers has the body `{"error": {"type", "code", "message", "param"}}`.
`type` is the family (`invalid_request_error`, `not_found_error`, ...), `code` the specific reason.
"""

from __future__ import annotations

from typing import Any

from service.jobs import errors as domain


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

class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

class Conflict(ApiError):
    status = 409
    type = "conflict_error"
    code = "conflict"

class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"

class UnsupportedMediaType(ApiError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class UriTooLong(ApiError):
    status = 414
    type = "invalid_request_error"
    code = "uri_too_long"


class HeadersTooLarge(ApiError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class RangeNotSatisfiable(ApiError):
    status = 416
    type = "invalid_request_error"
    code = "range_not_satisfiable"


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

# Domain error class -> HTTP error class; the first match in this order wins (subclasses first).
_FROM_DOMAIN: tuple[tuple[type[domain.JobsError], type[ApiError]], ...] = (
    (domain.InvalidRequest, InvalidRequest),
    (domain.NotFound, NotFound),
    (domain.Conflict, Conflict),
    (domain.StorageError, ServiceUnavailable),
    (domain.Refused, RateLimited),
)

def from_domain(exc: domain.JobsError) -> ApiError:
    """The HTTP answer to a domain error: same code, message and param; the status its class implies."""
    headers = {"Retry-After": str(exc.retry_after_seconds)} if exc.retry_after_seconds is not None else None
    for domain_class, http_class in _FROM_DOMAIN:
        if isinstance(exc, domain_class):
            return http_class(exc.message, code=exc.code, param=exc.param, headers=headers)
    return InternalError(exc.message, code=exc.code, param=exc.param)

